"""Pictures and tables of finished (or interrupted) simulation runs.

* :func:`write_plots` draws one run's ``curves.png`` (the runner calls it at the end of a run), and
  its ``momentum.png`` when the records have the ``momentum`` section (:func:`momentum_by_round`).
* :func:`load_run` reads a run folder (``metrics.jsonl`` + ``summary.json`` + ``config.yaml``).
* :func:`compare_runs` prints one table row per run and optionally draws all runs on shared axes.
* The record readers (:func:`train_records`, :func:`eval_series`, :func:`primary_metric`, ...) and
  figure helpers (:func:`new_figure`, :data:`STYLE`, ...) are public: ``fedlora.study.report``
  builds its tables and plots of many runs on them.

The headline number of a run is its FINAL metric: the value at the last evaluated round. The best
round's value is shown next to it (with the round it occurred in) for reference only: reporting
the running maximum over rounds picks the best checkpoint on the test set, which is an evaluation
bug, not a result.

Everything here reads plain JSON records and needs no model, torch or GPU.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlora import atomic

log = logging.getLogger("fedlora")

MB = 1e6
# "Lower is better" metrics (best = min, not max): names containing one of the words, or having one
# of the tokens as a ``_``/``-``/``.``/``@`` separated part (so "answer_match" is not a word error rate).
_LOWER_WORDS = ("loss", "perplexity", "error", "distance")
_LOWER_TOKENS = frozenset({"ppl", "mse", "mae", "rmse", "wer", "cer", "nll"})
_STACK = (("train", "local training"), ("aggregate", "aggregation"), ("eval", "evaluation"))
_STACK_COLORS = ("#4c72b0", "#dd8452", "#55a868")
STYLE = {
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.titlesize": 11,
    "axes.titleweight": "bold",
    "axes.labelsize": 10,
    "legend.fontsize": 8.5,
    "legend.framealpha": 0.85,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
}


# ---- reading runs ---------------------------------------------------------------------------------
@dataclass
class RunData:
    """One run folder, read: its metrics records (file order), its summary (``{}`` if absent)."""

    name: str
    method: str
    records: list[dict[str, Any]]
    summary: dict[str, Any] = field(default_factory=dict)
    path: Path = field(default_factory=Path)


def load_run(run_dir: Path | str) -> RunData:
    """Read ``run_dir`` (a ``runs/<name>/`` folder, or its ``metrics.jsonl`` itself).

    ``summary.json`` and ``config.yaml`` are optional (an interrupted run has no summary); the name
    and method then come from ``config.yaml``, else the folder name / ``"?"``. Raises
    ``FileNotFoundError`` when there is no ``metrics.jsonl``, ``ValueError`` on a corrupt line other
    than a partially written last one (which is skipped with a warning).
    """
    path = Path(run_dir)
    if path.is_file() and path.name == "metrics.jsonl":
        path = path.parent
    metrics = path / "metrics.jsonl"
    if not path.is_dir():
        raise FileNotFoundError(f"run folder {path} does not exist (expected a runs/<name>/ folder with metrics.jsonl)")
    if not metrics.is_file():
        raise FileNotFoundError(
            f"{path} has no metrics.jsonl: not a fedlora run folder, or the run never started "
            f"(expected {metrics}, written by `fedlora run`)"
        )
    records = _read_jsonl(metrics)
    summary: dict[str, Any] = {}
    if (path / "summary.json").is_file():
        try:
            summary = json.loads((path / "summary.json").read_text())
        except json.JSONDecodeError as exc:
            log.warning("ignoring unreadable %s: %s", path / "summary.json", exc)
    config = _read_config(path / "config.yaml")
    name = summary.get("name") or config.get("name") or path.name
    method = summary.get("method") or (config.get("method") or {}).get("name") or "?"
    return RunData(name=str(name), method=str(method), records=records, summary=summary, path=path)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    lines = [(i + 1, line) for i, line in enumerate(path.read_text().splitlines()) if line.strip()]
    records = []
    for pos, (lineno, line) in enumerate(lines):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            if pos == len(lines) - 1:  # a run killed mid-write: the last line may be cut short
                log.warning("%s:%d: skipping a partially written last line", path, lineno)
                break
            raise ValueError(f"{path}:{lineno}: not a JSON record: {exc}") from exc
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
        records.append(rec)
    return records


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        import yaml

        data = yaml.safe_load(path.read_text())
    except Exception as exc:  # a broken config must not hide the metrics
        log.warning("ignoring unreadable %s: %s", path, exc)
        return {}
    return data if isinstance(data, dict) else {}


# ---- record helpers -------------------------------------------------------------------------------
def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _finite(v: Any) -> bool:
    return _is_num(v) and math.isfinite(v)


def metrics_of(ev: Any) -> dict[str, float]:
    """The numeric metrics of one eval dict, in order, without counts (``n``, ``n_tokens``, ``n_passed``...)."""
    if not isinstance(ev, dict):
        return {}
    return {k: float(v) for k, v in ev.items() if k != "n" and not k.startswith("n_") and _is_num(v)}


def baseline_metrics(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    base = next((r for r in records if r.get("phase") == "baseline"), None)
    return metrics_of(base.get("eval")) if base else {}


def train_records(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Round records (phase "train", or no phase and round >= 1); a round recorded twice keeps its last line."""
    by_round: dict[int, dict[str, Any]] = {}
    for r in records:
        phase = r.get("phase")
        rnd = r.get("round")
        if phase == "baseline" or not _is_num(rnd) or (phase not in (None, "train")) or rnd < 1:
            continue
        by_round[int(rnd)] = r
    return [by_round[k] for k in sorted(by_round)]


def metric_keys(records: Sequence[dict[str, Any]]) -> list[str]:
    """Every metric name in the eval dicts (first-seen order; baseline first, as in the file)."""
    keys: dict[str, None] = {}
    for r in records:
        for k in metrics_of(r.get("eval")):
            keys.setdefault(k, None)
    return list(keys)


def primary_metric(records: Sequence[dict[str, Any]], summary: dict[str, Any] | None = None) -> str | None:
    keys = metric_keys(records)
    if keys:
        return keys[0]
    for key in ("final", "baseline"):
        m = metrics_of((summary or {}).get(key))
        if m:
            return next(iter(m))
    return None


def lower_is_better(metric: str) -> bool:
    """Whether the best value of ``metric`` is its minimum (losses, perplexities, error rates)."""
    m = metric.lower()
    return any(w in m for w in _LOWER_WORDS) or not _LOWER_TOKENS.isdisjoint(re.split(r"[^a-z0-9]+", m))


def eval_series(train: Sequence[dict[str, Any]], metric: str) -> list[tuple[int, float, float]]:
    """(round, cumulative MB, value) of every evaluated round that has ``metric``."""
    out = []
    for r in train:
        v = metrics_of(r.get("eval")).get(metric)
        if v is not None:
            out.append((int(r["round"]), float(r.get("bytes_total") or 0) / MB, v))
    return out


PERSONAL = ("weighted", "unweighted")


def _personal_evals(train: Sequence[dict[str, Any]], metric: str, which: str) -> list[tuple[int, float, float]]:
    """(round, cumulative MB, value) of the clients' own models (``personal[which]``, which is
    ``weighted`` or ``unweighted``) in every round that evaluated them."""
    out = []
    for r in train:
        v = metrics_of((r.get("personal") or {}).get(which)).get(metric)
        if v is not None:
            out.append((int(r["round"]), float(r.get("bytes_total") or 0) / MB, v))
    return out


def _final_and_best(
    train: Sequence[dict[str, Any]], metric: str
) -> tuple[tuple[int, float] | None, tuple[int, float] | None]:
    """(round, value) at the last evaluated round, and at the best one (earliest on ties); NaN never wins."""
    ev = eval_series(train, metric)
    if not ev:
        return None, None
    final = (ev[-1][0], ev[-1][2])
    finite = [(rnd, v) for rnd, _, v in ev if math.isfinite(v)]
    if not finite:
        return final, None
    sign = -1.0 if lower_is_better(metric) else 1.0
    best = max(finite, key=lambda rv: (sign * rv[1], -rv[0]))
    return final, best


# Training momentum (``momentum`` in the train records, see fedlora.engine.momentum): a run's three
# headline numbers, by key: the words they are shown under and their format.
MOMENTUM_KEYS = ("aggregation_error", "path_efficiency", "update_cosine")
"""The per-round ``momentum`` numbers a run summary (and a study's cells) keeps."""
MOMENTUM_SUMMARY = {
    "aggregation_error": ("mean aggregation error", ".2e"),
    "aggregation_error_first": ("aggregation error, first quarter of rounds", ".2e"),
    "aggregation_error_last": ("aggregation error, last quarter", ".2e"),
    "path_efficiency": ("final path efficiency", ".3f"),
    "update_cosine": ("mean update cosine (rounds ≥ 2)", ".3f"),
}


def momentum_by_round(records: Sequence[dict[str, Any]]) -> dict[int, dict[str, float]]:
    """Round -> the finite numbers of its ``momentum`` section (``energy`` flattened to
    ``energy.kept``, ...; nulls left out); rounds without a section (older runs) are absent."""
    out: dict[int, dict[str, float]] = {}
    for r in train_records(records):
        section = r.get("momentum")
        if not isinstance(section, dict):
            continue
        flat: dict[str, float] = {}
        for key, value in section.items():
            inner = value if isinstance(value, dict) else {"": value}
            flat.update({f"{key}.{k}" if k else key: float(v) for k, v in inner.items() if _finite(v)})
        out[int(r["round"])] = flat
    return out


def momentum_series(by_round: dict[int, dict[str, float]], key: str) -> list[tuple[int, float]]:
    """(round, value) of ``key`` in every round of :func:`momentum_by_round`'s result that has it."""
    return [(rnd, nums[key]) for rnd, nums in sorted(by_round.items()) if key in nums]


def momentum_summary(by_round: dict[int, dict[str, float]]) -> dict[str, float | None]:
    """The :data:`MOMENTUM_SUMMARY` numbers: the mean aggregation error over the rounds that have
    one, and over the first and the last quarter of the run's rounds (does it grow?), the path
    efficiency at the last round that has one, the mean update cosine over rounds >= 2 (``None``
    where there is nothing)."""

    def mean(pts: list[tuple[int, float]]) -> float | None:
        return sum(v for _, v in pts) / len(pts) if pts else None

    path = momentum_series(by_round, "path_efficiency")
    error = momentum_series(by_round, "aggregation_error")
    last = max(by_round, default=0)
    return {
        "aggregation_error": mean(error),
        "aggregation_error_first": mean([(r, v) for r, v in error if 4 * r <= last]),
        "aggregation_error_last": mean([(r, v) for r, v in error if 4 * r > 3 * last]),
        "path_efficiency": path[-1][1] if path else None,
        "update_cosine": mean([(r, v) for r, v in momentum_series(by_round, "update_cosine") if r >= 2]),
    }


# ---- one run's curves ---------------------------------------------------------------------------
def use_agg_backend() -> None:
    """Make Agg the backend for headless runs, without switching one a process has already set up.

    The figures here are ``matplotlib.figure.Figure`` objects rendered by Agg, never pyplot
    figures, so once pyplot is imported (a notebook, an interactive session) its backend, and the
    figures it holds open, are left alone.
    """
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")


def new_figure(nrows: int, ncols: int, size: tuple[float, float]):
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=110, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def int_ticks(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


def _note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="0.45", fontsize=10)


def fmt_value(v: float | None, digits: int = 4) -> str:
    if v is None:
        return "-"
    if not math.isfinite(v):
        return str(v)
    return f"{v:.{digits}f}" if abs(v) < 1e4 else f"{v:.4g}"


def _split_axes(metrics: list[str], values: dict[str, list[float]]) -> tuple[list[str], list[str]]:
    """Metrics sharing the primary metric's y axis, and those on a right-hand axis (other scale)."""
    if not metrics:
        return [], []

    def span(m: str) -> float:
        vs = [abs(v) for v in values.get(m, []) if math.isfinite(v)]
        return max(vs) if vs else 0.0

    p = span(metrics[0])
    left, right = [metrics[0]], []
    for m in metrics[1:]:
        s = span(m)
        same = (s <= 1.0 and p <= 1.0) or (s > 0 and p > 0 and 0.2 <= s / p <= 5.0) or s == p
        (left if same else right).append(m)
    return left, right


def _shade_skipped(ax, skipped: Iterable[int]) -> None:
    for i, rnd in enumerate(skipped):
        ax.axvspan(rnd - 0.5, rnd + 0.5, color="0.88", zorder=0, lw=0, label="skipped round" if i == 0 else None)


def _metric_panel(ax, train, base, metrics, colors, *, x: str, skipped: list[int]) -> None:
    """Panel (a) (x="round") or (b) (x="mb"): every metric over the run, baseline dashed."""
    from matplotlib.lines import Line2D

    values = {m: [v for *_, v in eval_series(train, m)] + ([base[m]] if m in base else []) for m in metrics}
    left, right = _split_axes(metrics, values)
    twin = ax.twinx() if right else None
    if twin is not None:
        twin.grid(False)
        twin.spines["right"].set_visible(True)
    if x == "round":
        _shade_skipped(ax, skipped)
    drew = False
    for m in metrics:
        target = twin if m in right else ax
        color = colors[m]
        ev = eval_series(train, m)
        xs = [r for r, _, _ in ev] if x == "round" else [mb for _, mb, _ in ev]
        ys = [v for *_, v in ev]
        if ev:
            label = m + (" (right axis)" if m in right else "")
            target.plot(xs, ys, marker="o", ms=4.5, lw=1.8, color=color, label=label, zorder=3)
            target.annotate(
                f"final {fmt_value(ys[-1], 3)}",
                (xs[-1], ys[-1]),
                textcoords="offset points",
                xytext=(-5, 7),
                ha="right",
                fontsize=8,
                color=color,
                zorder=4,
            )
            drew = True
        for which, style in zip(PERSONAL, (":", "-.")):
            pe = _personal_evals(train, m, which)
            if pe:
                px = [r for r, _, _ in pe] if x == "round" else [mb for _, mb, _ in pe]
                label = f"{m}: clients' own models, {which}"
                target.plot(px, [v for *_, v in pe], ls=style, marker="s", ms=3.5, lw=1.4, color=color, label=label)
                drew = True
        if m in base:
            target.axhline(base[m], ls="--", lw=1.3, color=color, alpha=0.8, zorder=2)
            # the untuned base is the model at round 0, before any byte was sent
            target.plot([0], [base[m]], marker="o", ms=6, mfc="white", mec=color, mew=1.5, ls="none", zorder=3)
            drew = True
    if base:
        label = "untuned base" if len(metrics) == 1 else "untuned base (dashed, metric colour)"
        color = colors[metrics[0]] if len(metrics) == 1 else "0.35"
        ax.add_line(Line2D([], [], ls="--", lw=1.3, color=color, marker="o", mfc="white", mec=color, label=label))
    if not drew:
        _note(ax, "no evaluation recorded")
    if x == "round":
        ax.set_xlabel("round (0 = untuned base model)" if base else "round")
        hi = max((int(r["round"]) for r in train), default=1)
        ax.set_xlim(-0.4 if base else 0.5, hi + 0.5)
        int_ticks(ax)
    else:
        ax.set_xlabel("cumulative communication (MB, up + down)")
        mb_hi = max((float(r.get("bytes_total") or 0) / MB for r in train), default=0.0)
        if base or not any(eval_series(train, m) for m in metrics):
            ax.set_xlim(-0.03 * (mb_hi or 1.0), 1.04 * (mb_hi or 1.0))
    ax.set_ylabel(", ".join(left) if left else "metric")
    if twin is not None:
        twin.set_ylabel(", ".join(right))
    handles, labels = ax.get_legend_handles_labels()
    if twin is not None:
        h2, l2 = twin.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    order = sorted(range(len(labels)), key=lambda i: labels[i].startswith("untuned base"))
    handles, labels = [handles[i] for i in order], [labels[i] for i in order]
    if handles:
        # on top of the twin axis too, which is drawn after ax
        (twin or ax).legend(handles, labels, loc="best")


def _loss_panel(ax, train, skipped: list[int]) -> None:
    """Panel (c): mean train loss per round, each client's loss as faint dots."""
    _shade_skipped(ax, skipped)
    cx, cy = [], []
    for r in train:
        for stats in (r.get("train") or {}).values():
            loss = stats.get("loss") if isinstance(stats, dict) else None
            if _finite(loss):
                cx.append(int(r["round"]))
                cy.append(float(loss))
    mean = [(int(r["round"]), float(r["train_loss"])) for r in train if _finite(r.get("train_loss"))]
    if cx:
        ax.scatter(cx, cy, s=14, color="0.35", alpha=0.3, lw=0, label="one client", zorder=2)
    if mean:
        ms = 4.5 if len(mean) <= 40 else 0
        ax.plot(*zip(*mean), marker="o", ms=ms, lw=1.8, color="#c44e52", label="mean over clients", zorder=3)
    rejected = [int(r["round"]) for r in train if r.get("rejected")]
    if rejected:
        ax.scatter(
            rejected,
            [1.0] * len(rejected),
            transform=ax.get_xaxis_transform(),
            marker="v",
            s=40,
            color="#8172b2",
            clip_on=False,
            label="round with rejected / failed updates",
            zorder=4,
        )
    if not cx and not mean:
        _note(ax, "no training loss recorded")
    ax.set_xlabel("round")
    ax.set_ylabel("local training loss")
    ax.set_xlim(0.5, max((int(r["round"]) for r in train), default=1) + 0.5)
    int_ticks(ax)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best")


def _time_panel(ax, records, train) -> None:
    """Panel (d): seconds per round, stacked train / aggregate / eval (baseline eval at round 0)."""
    rows: list[tuple[int, dict[str, float]]] = []
    base = next((r for r in records if r.get("phase") == "baseline"), None)
    if base is not None and _finite(base.get("eval_seconds")):
        rows.append((0, {"eval": float(base["eval_seconds"])}))
    for r in train:
        secs = r.get("seconds") if isinstance(r.get("seconds"), dict) else {}
        rows.append((int(r["round"]), {k: float(v) for k, v in secs.items() if _finite(v)}))
    if not any(s for _, s in rows):
        _note(ax, "no timings recorded")
    else:
        xs = [rnd for rnd, _ in rows]
        bottom = [0.0] * len(rows)
        dense = len(rows) > 60  # bars that thin alias into stripes: draw stacked steps instead
        for (key, label), color in zip(_STACK, _STACK_COLORS):
            h = [s.get(key, 0.0) for _, s in rows]
            if any(h):
                top = [b + v for b, v in zip(bottom, h)]
                if dense:
                    ax.fill_between(xs, bottom, top, step="mid", color=color, label=label, lw=0)
                else:
                    ax.bar(xs, h, width=0.8, bottom=bottom, color=color, label=label, lw=0)
                bottom = top
        ax.set_ylim(0, 1.22 * max(bottom))  # headroom for the legend row
        ax.legend(loc="upper center", ncols=3)
        ax.set_title(f"(d) wall time per round (total {sum(bottom):,.1f} s)")
    ax.set_xlabel("round (0 = untuned-base evaluation)" if base is not None else "round")
    ax.set_ylabel("seconds")
    int_ticks(ax)


def _headline(records: Sequence[dict[str, Any]]) -> str:
    """One line under the title: rounds, final (vs base and best) of the primary metric, MB."""
    train = train_records(records)
    parts = [f"{len(train)} round{'s' if len(train) != 1 else ''}"]
    skipped = sum(1 for r in train if r.get("skipped"))
    if skipped:
        parts.append(f"{skipped} skipped")
    metric = primary_metric(records)
    if metric:
        base = baseline_metrics(records).get(metric)
        final, best = _final_and_best(train, metric)
        if final:
            s = f"final {metric} {fmt_value(final[1])} (round {final[0]})"
            if base is not None:
                s += f", untuned base {fmt_value(base)}"
            if best and best[0] != final[0]:
                s += f"; best round {best[0]}: {fmt_value(best[1])} (not the headline)"
            parts.append(s)
        elif base is not None:
            parts.append(f"untuned base {metric} {fmt_value(base)}, no evaluation after training")
    mb = max((float(r.get("bytes_total") or 0) for r in train), default=0.0) / MB
    parts.append(f"{mb:,.2f} MB communicated")
    return "  ·  ".join(parts)


# ---- one run's momentum -----------------------------------------------------------------------------
# momentum key -> (legend label, colour, line style)
_MOMENTUM_LINES = {
    "update_cosine": ("cos(update t, update t-1)", "#4c72b0", "-"),
    "path_efficiency": ("‖Σ updates‖ / Σ ‖updates‖", "#55a868", "-"),
    "aggregation_error": ("‖update − clients' exact mean‖ / ‖exact mean‖", "#c44e52", "-"),
    "energy.kept": ("kept in the LoRA", "#4c72b0", "-"),
    "energy.merged": ("merged into the backbone", "#55a868", "-"),
    "energy.dropped": ("dropped", "#c44e52", "-"),
    "energy.dropped_of_change": ("dropped / the round's change", "0.3", "--"),
    "update_norm": ("‖global update‖", "#4c72b0", "-"),
    "client_update_norm": ("‖clients' exact mean update‖", "#dd8452", "--"),
}
_ENERGY = ("energy.kept", "energy.merged", "energy.dropped", "energy.dropped_of_change")


def _momentum_lines(ax, by_round, keys: Sequence[str], rounds: int, *, empty: str, positive: bool = False) -> None:
    """One line per momentum key (see ``_MOMENTUM_LINES``) against round; ``empty`` noted when no
    key has a value (``positive``: only values > 0 count, for a log axis)."""
    drew = False
    for key in keys:
        pts = [(r, v) for r, v in momentum_series(by_round, key) if v > 0 or not positive]
        if pts:
            label, color, ls = _MOMENTUM_LINES[key]
            ms = 4.5 if len(pts) <= 40 else 0
            ax.plot(*zip(*pts), marker="o", ms=ms, lw=1.8, ls=ls, color=color, label=label, zorder=3)
            drew = True
    if not drew:
        _note(ax, empty)
    ax.set_xlabel("round")
    ax.set_xlim(0.5, rounds + 0.5)
    int_ticks(ax)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best")


def _aggregation_error_panel(ax, by_round, rounds: int) -> None:
    """Panel (c): the aggregation error on a log axis; says why when there is nothing to draw."""
    values = [v for _, v in momentum_series(by_round, "aggregation_error")]
    log_axis = any(v > 0 for v in values)
    if log_axis:
        ax.set_yscale("log")
    empty = (
        "aggregation error 0 in every round"
        if values
        else "no aggregation error recorded\n(the uploads do not determine the clients' own updates)"
    )
    _momentum_lines(ax, by_round, ["aggregation_error"], rounds, empty=empty, positive=True)
    ax.set_ylabel("relative error (log scale)" if log_axis else "relative error")


def _momentum_headline(by_round) -> str:
    summary = momentum_summary(by_round)
    parts = [
        f"{label} {format(summary[k], fmt)}" for k, (label, fmt) in MOMENTUM_SUMMARY.items() if summary[k] is not None
    ]
    return "  ·  ".join(parts) or "no momentum numbers recorded"


def _momentum_plot(records, out: Path, title: str, skipped: list[int]) -> Path:
    """``out``: a run's training momentum (``momentum`` in its train records) against round."""
    import matplotlib

    by_round = momentum_by_round(records)
    rounds = max((int(r["round"]) for r in train_records(records)), default=1)
    energy = any(k in nums for nums in by_round.values() for k in _ENERGY)
    with matplotlib.rc_context(STYLE):
        fig, axes = new_figure(2, 2, (13, 9))
        (a, b), (c, d) = axes
        for ax in (a, b, c, d):
            _shade_skipped(ax, skipped)
        a.axhline(0.0, lw=0.8, color="0.5", zorder=1)
        _momentum_lines(a, by_round, ["update_cosine"], rounds, empty="no update cosine recorded")
        a.set(title="(a) cosine of consecutive global updates", ylabel="cosine", ylim=(-1.05, 1.05))
        _momentum_lines(b, by_round, ["path_efficiency"], rounds, empty="no path efficiency recorded")
        b.set(title="(b) path efficiency (1 = a straight path)", ylabel="path efficiency", ylim=(0.0, 1.05))
        _aggregation_error_panel(c, by_round, rounds)
        c.set_title("(c) aggregation error against the exact mean of the clients' updates")
        if energy:
            _momentum_lines(d, by_round, _ENERGY, rounds, empty="no energy split recorded")
            d.set(title="(d) where the aggregate's energy went", ylabel="share of the energy")
        else:
            _momentum_lines(d, by_round, ["update_norm", "client_update_norm"], rounds, empty="no norms recorded")
            d.set(title="(d) update norms", ylabel="Frobenius norm")
        fig.suptitle(f"{title}: training momentum\n{_momentum_headline(by_round)}", fontsize=12)
        atomic.save_figure(out, fig, dpi=110)
    return out


def write_plots(records: list[dict], run_dir: Path, title: str) -> list[Path]:
    """Draw ``run_dir/curves.png`` from a run's metrics records; return the written paths.

    A 2x2 figure: (a) every eval metric (but ``n``) against round, the untuned base model dashed
    (and, for methods with client-local parts, the clients' own models dotted / dash-dotted);
    (b) the same against cumulative MB communicated; (c) mean local training loss per round with
    each client's loss as faint dots (rounds with rejected updates marked on top); (d) seconds per
    round stacked by phase. Skipped rounds are shaded grey. Copes with no evaluations, one round
    and skipped rounds.

    When the train records have a ``momentum`` section (runs from before it have none), also
    ``run_dir/momentum.png``, against round: (a) the cosine of consecutive global updates, (b) the
    path efficiency, (c) the aggregation error (log axis), (d) the method's energy split where it
    reports one (FedMomentum), else the norms of the global update and of the clients' exact mean.
    """
    use_agg_backend()
    import matplotlib

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    train = train_records(records)
    base = baseline_metrics(records)
    metrics = metric_keys(records)
    palette = matplotlib.colormaps["tab10"]
    colors = {m: palette(i % 10) for i, m in enumerate(metrics)}
    skipped = [int(r["round"]) for r in train if r.get("skipped")]
    out = run_dir / "curves.png"
    with matplotlib.rc_context(STYLE):
        fig, axes = new_figure(2, 2, (13, 9))
        (a, b), (c, d) = axes
        _metric_panel(a, train, base, metrics, colors, x="round", skipped=skipped)
        a.set_title("(a) evaluation metric by round")
        _metric_panel(b, train, base, metrics, colors, x="mb", skipped=[])
        b.set_title("(b) evaluation metric by communication")
        _loss_panel(c, train, skipped)
        c.set_title("(c) local training loss")
        _time_panel(d, records, train)
        if not d.get_title():
            d.set_title("(d) wall time per round")
        fig.suptitle(f"{title}\n{_headline(records)}", fontsize=12)
        atomic.save_figure(out, fig, dpi=110)
    if not any(isinstance(r.get("momentum"), dict) for r in train):
        return [out]
    return [out, _momentum_plot(records, run_dir / "momentum.png", title, skipped)]


# ---- several runs ---------------------------------------------------------------------------------
@dataclass
class _Row:
    run: RunData
    train: list[dict[str, Any]]
    primary: str | None


def _run_rounds(run: RunData, train: list[dict[str, Any]]) -> int:
    r = run.summary.get("rounds")
    return int(r) if _is_num(r) else max((int(t["round"]) for t in train), default=0)


def _run_mb(run: RunData, train: list[dict[str, Any]]) -> float:
    b = run.summary.get("bytes_total")
    if not _is_num(b):
        b = max((float(t.get("bytes_total") or 0) for t in train), default=0.0)
    return float(b) / MB


def _run_seconds(run: RunData, train: list[dict[str, Any]]) -> float:
    s = run.summary.get("seconds")
    if _is_num(s):
        return float(s)
    total = sum(float(v) for t in train for v in (t.get("seconds") or {}).values() if _finite(v))
    base = next((r for r in run.records if r.get("phase") == "baseline"), None)
    if base is not None and _finite(base.get("eval_seconds")):
        total += float(base["eval_seconds"])
    return total


def _run_rejected(run: RunData, train: list[dict[str, Any]]) -> int:
    r = run.summary.get("rejected")
    return int(r) if _is_num(r) else sum(len(t.get("rejected") or []) for t in train)


def _run_skipped(run: RunData, train: list[dict[str, Any]]) -> int:
    r = run.summary.get("skipped_rounds")
    return int(r) if _is_num(r) else sum(1 for t in train if t.get("skipped"))


def _metric_cells(row: _Row, metric: str) -> list[str]:
    base = baseline_metrics(row.run.records).get(metric)
    if base is None:
        base = metrics_of(row.run.summary.get("baseline")).get(metric)
    final, best = _final_and_best(row.train, metric)
    if final is None:  # no evaluated round in the records; the summary may still have one
        v = metrics_of(row.run.summary.get("final")).get(metric)
        if v is not None:
            final = (_run_rounds(row.run, row.train), v)
    return [
        fmt_value(base),
        fmt_value(final[1]) if final else "-",
        fmt_value(best[1]) if best else "-",
        str(best[0]) if best else "-",
    ]


def _table(header: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [line(header), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    return [s.rstrip() for s in out]


# Task settings that choose which examples a task's test set holds (the union over the tasks; a key a
# run's task does not have is skipped). Code evaluates a fixed problem file: only its own keys count.
_TEST_SET_SETTINGS = (
    "dataset",
    "datasets",
    "source",
    "sources",
    "test_source",
    "hub_config",
    "hub_configs",
    "split_test",
    "test_splits",
    "columns",
    "categories",
    "generated_subtasks",
    "files",
    "plays",
    "roles",
    "min_speeches",
    "num_roles",
    "test_fraction",
    "max_test_per_role",
    "n_test",
)
_TEST_SET_SETTINGS_OF = {"code": ("eval_set", "n_eval")}
_SEEDLESS_TEST_SETS = frozenset({"code"})  # the seed draws code's training rows, never its problems


def _protocol(run: RunData) -> dict[str, Any]:
    """The run's evaluation protocol: ``protocol.json`` (written when the run starts), else the summary's."""
    path = run.path / "protocol.json"
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            if isinstance(data, dict) and data:
                return data
        except json.JSONDecodeError as exc:
            log.warning("ignoring unreadable %s: %s", path, exc)
    data = run.summary.get("protocol")
    return data if isinstance(data, dict) else {}


def _n_test(run: RunData) -> int | None:
    """How many test examples the run's evaluations used: the ``n`` of its last eval dict that has one
    (the summary's when the records have none)."""
    evals = [r.get("eval") for r in reversed(run.records)] + [run.summary.get("final"), run.summary.get("baseline")]
    return next((int(e["n"]) for e in evals if isinstance(e, dict) and _is_num(e.get("n"))), None)


def evaluation_set_of(run: RunData) -> dict[str, Any]:
    """What defines the run's test set, as far as its records tell: the task, its dataset, the
    test-set settings, the data seed and the number of test examples (keys that are unknown are absent)."""
    protocol = _protocol(run)
    out: dict[str, Any] = {}
    task = protocol.get("task")
    for key in ("task", "dataset"):
        if protocol.get(key) is not None:
            out[key] = protocol[key]
    settings = protocol.get("settings") if isinstance(protocol.get("settings"), dict) else {}
    for key in _TEST_SET_SETTINGS_OF.get(str(task), _TEST_SET_SETTINGS):
        if key in settings:
            out[f"task.settings.{key}"] = settings[key]
    if protocol and task not in _SEEDLESS_TEST_SETS:
        seed = settings.get("seed")
        seed = protocol.get("seed") if seed is None else seed
        if seed is not None:
            out["data seed"] = seed
    n = _n_test(run)
    if n is not None:
        out["test examples"] = n
    return out


def _shown(value: Any, width: int = 60) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= width else text[: width - 3] + "..."


def evaluation_set_warnings(runs: Sequence[RunData]) -> list[str]:
    """``warning:`` lines when ``runs`` were evaluated on different test sets (then their metrics
    are not comparable), one indented line per differing item; ``[]`` when they agree."""
    names = [r.name for r in runs]
    labels = names if len(set(names)) == len(names) else [str(r.path) for r in runs]
    sets = [evaluation_set_of(r) for r in runs]
    lines = []
    for key in dict.fromkeys(k for s in sets for k in s):
        groups: dict[str, list[str]] = {}
        for label, s in zip(labels, sets):
            if key in s:
                groups.setdefault(_shown(s[key]), []).append(label)
        if len(groups) > 1:
            lines.append(f"  {key}: " + " vs ".join(f"{v} ({', '.join(ls)})" for v, ls in groups.items()))
    if not lines:
        return []
    return ["warning: the runs were evaluated on different test sets, so their metrics are not comparable:", *lines]


def compare_runs(run_dirs: list[Path], out: Path | None = None) -> str:
    """A text table of ``run_dirs`` (one row each, in the given order); with ``out``, a PNG of all runs.

    Columns: run, method, rounds, then for the primary metric (first metric of the eval dicts; when
    the runs' primary metrics differ, one column group per metric) its untuned-base value, its
    FINAL value (last evaluated round: the headline), the best evaluated round's value and that
    round (for reference only), then MB communicated, wall seconds, rejected updates and skipped
    rounds. ``out`` receives metric vs round, metric vs MB and train loss vs round, all runs on
    shared axes. When the runs' test sets differ (see :func:`evaluation_set_of`), ``warning:`` lines
    naming the differences come first.
    """
    runs = [load_run(d) for d in run_dirs]
    rows = [_Row(r, train_records(r.records), primary_metric(r.records, r.summary)) for r in runs]
    metrics = list(dict.fromkeys(r.primary for r in rows if r.primary))
    personal = {m for m in metrics for r in rows if _personal_evals(r.train, m, "weighted")}
    header = ["run", "method", "rounds"]
    for m in metrics:
        pre = f"{m}:" if len(metrics) > 1 else ""
        header += [f"{pre}base", f"{pre}FINAL", f"{pre}best", f"{pre}best@round"]
        if m in personal:
            header += [f"{pre}own(w)", f"{pre}own(u)"]
    header += ["MB", "seconds", "rejected", "skipped"]
    body = []
    for row in rows:
        run, train = row.run, row.train
        cells = [run.name, run.method, str(_run_rounds(run, train))]
        for m in metrics:
            cells += _metric_cells(row, m)
            if m in personal:
                series = (_personal_evals(train, m, w) for w in PERSONAL)
                cells += [fmt_value(ev[-1][2]) if ev else "-" for ev in series]
        cells += [
            f"{_run_mb(run, train):,.2f}",
            f"{_run_seconds(run, train):,.1f}",
            str(_run_rejected(run, train)),
            str(_run_skipped(run, train)),
        ]
        body.append(cells)
    right = set(range(2, len(header)))
    if not metrics:
        head = "no evaluation metric in any run"
    elif len(metrics) == 1:
        head = f"metric: {metrics[0]}"
    else:
        head = f"metrics differ between runs (one column group each): {', '.join(metrics)}"
    notes = [
        *evaluation_set_warnings(runs),
        head,
        *_table(header, body, right),
        "FINAL = value at the last evaluated round (the result to report); base = untuned base model;",
        "best / best@round = best evaluated round (max; min for loss-like metrics), for reference only:",
        "picking the best round on the test set (a running max) overstates the result.",
    ]
    if personal:
        notes.append(
            "own(w) / own(u) = the clients' own models at the last round that evaluated them (methods with "
            "client-local parts), weighted by their test examples / every client once."
        )
    if out is not None:
        _compare_plot(rows, Path(out))
        notes.append(f"plot: {out}")
    return "\n".join(notes)


def _compare_plot(rows: list[_Row], out: Path) -> None:
    use_agg_backend()
    import matplotlib
    from matplotlib.lines import Line2D

    palette = matplotlib.colormaps["tab10"]
    metrics = list(dict.fromkeys(r.primary for r in rows if r.primary))
    out.parent.mkdir(parents=True, exist_ok=True)
    with matplotlib.rc_context(STYLE):
        fig, axes = new_figure(1, 3, (18, 5.8))
        a, b, c = axes[0]
        any_eval = any_loss = any_base = False
        max_round = 1
        for i, row in enumerate(rows):
            color = palette(i % 10)
            m = row.primary
            label = f"{row.run.name} ({row.run.method})" + (f" [{m}]" if len(metrics) > 1 and m else "")
            max_round = max(max_round, *(int(t["round"]) for t in row.train), 1)
            if m:
                ev = eval_series(row.train, m)
                base = baseline_metrics(row.run.records).get(m)
                if base is None:
                    base = metrics_of(row.run.summary.get("baseline")).get(m)
                if ev:
                    any_eval = True
                    a.plot([r for r, _, _ in ev], [v for *_, v in ev], marker="o", ms=4, lw=1.8, color=color)
                    b.plot([mb for _, mb, _ in ev], [v for *_, v in ev], marker="o", ms=4, lw=1.8, color=color)
                if base is not None:
                    any_base = True
                    for ax in (a, b):
                        ax.axhline(base, ls="--", lw=1.1, color=color, alpha=0.6)
                        ax.plot([0], [base], marker="o", ms=5.5, mfc="white", mec=color, mew=1.4, ls="none")
            loss = [(int(t["round"]), float(t["train_loss"])) for t in row.train if _finite(t.get("train_loss"))]
            if loss:
                any_loss = True
                c.plot(*zip(*loss), marker="o", ms=3.5, lw=1.6, color=color)
            for ax in (a, b, c):  # one legend entry per run, even if it drew nothing on this axis
                ax.plot([], [], color=color, lw=1.8, marker="o", ms=4, label=label)
        if any_base:
            for ax in (a, b):
                proxy = Line2D([], [], ls="--", color="0.4", marker="o", mfc="white", label="untuned base (run colour)")
                ax.add_line(proxy)
        ylabel = " / ".join(metrics) if metrics else "metric"
        a.set(title="evaluation metric by round", ylabel=ylabel)
        a.set_xlabel("round (0 = untuned base)" if any_base else "round")
        a.set_xlim(-0.3 if any_base else 0.5, max_round + 0.5)
        int_ticks(a)
        b.set(title="evaluation metric by communication", xlabel="cumulative communication (MB)", ylabel=ylabel)
        c.set(title="mean local training loss", xlabel="round", ylabel="local training loss")
        c.set_xlim(0.5, max_round + 0.5)
        int_ticks(c)
        if not any_eval and not any_base:
            _note(a, "no evaluation recorded")
            _note(b, "no evaluation recorded")
        if not any_loss:
            _note(c, "no training loss recorded")
        for ax in (a, b, c):
            ax.legend(loc="best")
        fig.suptitle(f"{len(rows)} run{'s' if len(rows) != 1 else ''} compared", fontsize=13, fontweight="bold")
        atomic.save_figure(out, fig, dpi=110)


__all__ = [
    "MB",
    "MOMENTUM_KEYS",
    "MOMENTUM_SUMMARY",
    "STYLE",
    "RunData",
    "baseline_metrics",
    "compare_runs",
    "eval_series",
    "evaluation_set_of",
    "evaluation_set_warnings",
    "fmt_value",
    "int_ticks",
    "load_run",
    "lower_is_better",
    "metric_keys",
    "metrics_of",
    "momentum_by_round",
    "momentum_series",
    "momentum_summary",
    "new_figure",
    "primary_metric",
    "train_records",
    "use_agg_backend",
    "write_plots",
]
