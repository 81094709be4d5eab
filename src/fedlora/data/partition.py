"""Seeded partitions of a training set over federated clients.

Protocol
--------
Every partitioner returns ``parts``: one list of example indices per client, each sorted
ascending. The lists are disjoint and their union is ``range(n)`` (every example is used by
exactly one client), and the same arguments always give the same partition (NumPy's
``default_rng(seed)`` / ``random.Random(seed)``; nothing global).

* :func:`iid`: a seeded shuffle cut into ``n_clients`` near-equal parts (sizes differ by <= 1).
* :func:`dirichlet`: label skew as in flwr-datasets' ``DirichletPartitioner`` (Hsu et al. 2019):
  for each group value (e.g. the problem category) draw client proportions ``p ~ Dir(alpha)``
  and cut that group's shuffled indices at ``cumsum(p)``; redraw everything until every client
  has at least ``min_size`` examples. Small ``alpha`` (0.1) gives each client few groups; as
  ``alpha -> inf`` every client gets each group in proportion to its size (IID); ``alpha=inf``
  is allowed and uses equal proportions.
* :func:`k_classes` (alias :func:`shards`): every client holds examples of ``k`` groups. The
  groups are shuffled and client ``c`` takes groups ``c*k .. c*k+k-1`` (cyclically), so every
  group is held by someone (``n_clients * k >= #groups`` is required) and each group's examples
  are split evenly among its holders. ``k`` larger than the number of groups is clipped to it.
  A group with fewer examples than holders leaves some holders with fewer than ``k`` groups.
* :func:`natural`: one client per group value (in sorted order of the values).

:func:`matched_test_sets` draws, for personalised evaluation, each client's test set from the
held-out split with the client's own group mix (see there).

:func:`partition_report` summarises a partition (sizes, per-client group histograms, and the
mean total-variation distance between each client's group mix and the global one, 0 = IID,
near 1 = disjoint groups); :func:`plot_partition` draws it as stacked bars (a PNG, Agg backend).
"""

from __future__ import annotations

import math
import os
import random
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from fedlora import atomic

Parts = list[list[int]]


def _check_clients(n_examples: int, n_clients: int) -> None:
    if n_clients < 1:
        raise ValueError(f"n_clients must be >= 1, got {n_clients}")
    if n_examples < n_clients:
        raise ValueError(f"cannot give {n_clients} clients at least one of {n_examples} examples each")


def iid(n_examples: int, n_clients: int, seed: int) -> Parts:
    """A uniformly random split into ``n_clients`` parts of near-equal size."""
    _check_clients(n_examples, n_clients)
    order = list(range(n_examples))
    random.Random(f"iid:{seed}").shuffle(order)
    bounds = [round(c * n_examples / n_clients) for c in range(n_clients + 1)]
    return [sorted(order[bounds[c] : bounds[c + 1]]) for c in range(n_clients)]


def _group_indices(groups: Sequence[str]) -> dict[str, list[int]]:
    by: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        by.setdefault(str(g), []).append(i)
    return dict(sorted(by.items()))


def dirichlet(
    groups: Sequence[str],
    n_clients: int,
    alpha: float,
    seed: int,
    min_size: int = 1,
    *,
    max_tries: int = 10_000,
) -> Parts:
    """Dirichlet label skew over the group of each example (see the module docstring).

    Raises ``ValueError`` when ``alpha <= 0``, when ``n_clients * min_size`` exceeds the data,
    or when ``max_tries`` draws all leave some client below ``min_size`` (raise ``alpha`` or
    lower ``min_size``).
    """
    n = len(groups)
    _check_clients(n, n_clients)
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0 (got {alpha}); for fully skewed splits use 'natural' or 'k_classes'")
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    if n_clients * min_size > n:
        raise ValueError(f"{n_clients} clients x min_size {min_size} exceeds the {n} examples")
    rng = np.random.default_rng(seed)
    by_group = _group_indices(groups)
    for _ in range(max_tries):
        parts: Parts = [[] for _ in range(n_clients)]
        for idx in by_group.values():
            shuffled = rng.permutation(np.asarray(idx))
            if math.isinf(alpha):
                p = np.full(n_clients, 1.0 / n_clients)
            else:
                g = rng.gamma(alpha, 1.0, size=n_clients)
                total = g.sum()
                # tiny alpha can underflow every gamma draw to 0: all mass on one client
                p = g / total if total > 0 else np.eye(n_clients)[rng.integers(n_clients)]
            cuts = (np.cumsum(p)[:-1] * len(shuffled)).astype(int)
            for c, chunk in enumerate(np.split(shuffled, cuts)):
                parts[c].extend(int(i) for i in chunk)
        if min(len(p) for p in parts) >= min_size:
            return [sorted(p) for p in parts]
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) split of {n} examples over {n_clients} clients gave every client "
        f">= {min_size} examples in {max_tries} draws; raise alpha or lower min_size / n_clients"
    )


def k_classes(groups: Sequence[str], n_clients: int, k: int, seed: int) -> Parts:
    """Every client gets examples of (at most) ``k`` groups (see the module docstring)."""
    n = len(groups)
    _check_clients(n, n_clients)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    by_group = _group_indices(groups)
    names = list(by_group)
    rng = random.Random(f"k_classes:{seed}")
    rng.shuffle(names)
    n_groups = len(names)
    k = min(k, n_groups)
    if n_clients * k < n_groups:
        raise ValueError(f"{n_clients} clients x k={k} groups cannot cover all {n_groups} groups; raise k or n_clients")
    holders: dict[str, list[int]] = {g: [] for g in names}
    for c in range(n_clients):
        for j in range(k):
            holders[names[(c * k + j) % n_groups]].append(c)
    parts: Parts = [[] for _ in range(n_clients)]
    for g in names:
        idx = list(by_group[g])
        rng.shuffle(idx)
        hs = holders[g]
        bounds = [round(h * len(idx) / len(hs)) for h in range(len(hs) + 1)]
        for h, c in enumerate(hs):
            parts[c].extend(idx[bounds[h] : bounds[h + 1]])
    return [sorted(p) for p in parts]


shards = k_classes


def natural(groups: Sequence[str]) -> Parts:
    """One client per distinct group value, clients in sorted order of the values."""
    if not groups:
        raise ValueError("no examples to partition")
    return [idx for _, idx in _group_indices(groups).items()]


def matched_test_sets(
    train_groups: Sequence[str], parts: Sequence[Sequence[int]], test_groups: Sequence[str], size: int, seed: int
) -> Parts:
    """Per-client test sets drawn from the shared held-out split with each client's group mix.

    Client ``c`` with train group proportions ``p_g`` (over groups that occur in the test split)
    gets ``n_c = min(size, min_g avail_g / p_g)`` test examples, ``round(n_c p_g)`` of group ``g``
    (largest remainders), sampled without replacement with a seed per client: the largest set
    with exactly its mix that the test split can supply. With one group per client (``natural``)
    that is every test example of the client's group (up to ``size``). The test split is disjoint
    from every client's training data; sets of different clients may overlap. A client none of
    whose groups occur in the test split gets an empty set.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    by_group = _group_indices(test_groups)
    out: Parts = []
    for c, part in enumerate(parts):
        hist = Counter(str(train_groups[i]) for i in part)
        hist = Counter({g: n for g, n in hist.items() if g in by_group})
        total = sum(hist.values())
        if not total:
            out.append([])
            continue
        props = {g: n / total for g, n in sorted(hist.items())}
        n_c = min([float(size)] + [len(by_group[g]) / p for g, p in props.items()])
        n_c = math.floor(n_c + 1e-9)
        alloc = {g: math.floor(n_c * p) for g, p in props.items()}
        spare = n_c - sum(alloc.values())
        by_remainder = sorted(props, key=lambda g: (-(n_c * props[g] - alloc[g]), g))
        for g in by_remainder:
            if spare <= 0:
                break
            if alloc[g] < len(by_group[g]):
                alloc[g] += 1
                spare -= 1
        rng = random.Random(f"matched-test:{seed}:{c}")
        chosen = [i for g in sorted(alloc) for i in rng.sample(by_group[g], alloc[g])]
        out.append(sorted(chosen))
    return out


# ---- reports -----------------------------------------------------------------------------------
def partition_report(groups: Sequence[str], parts: Sequence[Sequence[int]]) -> dict[str, Any]:
    """Per-client sizes and group histograms, plus how far the clients are from IID.

    ``{"num_clients", "num_examples", "groups": [sorted names], "sizes": [...],
    "clients": [{"client": i, "size": n, "groups": {name: count}}],
    "label_skew": mean total-variation distance of client mixes to the global mix}``.
    """
    names = sorted({str(g) for g in groups})
    total = Counter(str(g) for g in groups)
    n = len(groups)
    clients = []
    tv = []
    for c, idx in enumerate(parts):
        hist = Counter(str(groups[i]) for i in idx)
        clients.append({"client": c, "size": len(idx), "groups": {g: hist[g] for g in names if hist[g]}})
        if idx:
            tv.append(0.5 * sum(abs(hist[g] / len(idx) - total[g] / n) for g in names))
    return {
        "num_clients": len(parts),
        "num_examples": sum(len(p) for p in parts),
        "groups": names,
        "sizes": [len(p) for p in parts],
        "clients": clients,
        "label_skew": float(np.mean(tv)) if tv else 0.0,
    }


def plot_partition(report: dict[str, Any], path: str | os.PathLike[str], title: str | None = None) -> None:
    """Stacked bars of each client's examples by group, saved as a PNG at ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = report["groups"]
    clients = report["clients"]
    fig = Figure(figsize=(max(4.0, 0.5 * len(clients) + 2.5), 3.6), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    xs = np.arange(len(clients))
    bottom = np.zeros(len(clients))
    cmap = _colors(len(names))
    for j, g in enumerate(names):
        h = np.array([c["groups"].get(g, 0) for c in clients], dtype=float)
        ax.bar(xs, h, bottom=bottom, color=cmap[j], label=g, width=0.8, linewidth=0)
        bottom += h
    ax.set_xlabel("client")
    ax.set_ylabel("examples")
    if len(clients) <= 40:
        ax.set_xticks(xs, [str(c["client"]) for c in clients])
    default = f"{report['num_examples']} examples over {len(clients)} clients"
    if "label_skew" in report:
        default += f" (label skew {report['label_skew']:.2f})"
    ax.set_title(title or default, fontsize=10)
    if len(names) <= 20:
        ax.legend(fontsize=7, frameon=False, bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    atomic.save_figure(os.fspath(path), fig, format="png")


def _colors(k: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab20" if k > 10 else "tab10"]
    return [cmap(i % cmap.N) for i in range(k)]


__all__ = ["dirichlet", "iid", "k_classes", "natural", "partition_report", "plot_partition", "shards"]
