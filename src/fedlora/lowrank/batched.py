"""The exact low-rank SVD of many modules at once.

A model adapts many modules of few shapes (e.g. 32 layers x {q, k, v, o} share 4096 x 4096).

- On accelerators, a shape group is stacked into one batched QR/SVD call, which removes
  per-call overhead (dominant for small ranks) and keeps the device busy.
- On CPU, torch's batched QR and SVD only loop over the batch, and its multi-threaded LAPACK
  scales poorly on these tall, skinny QRs (many synchronisation points per call; a 15x
  slow-down when another process occupies a core). So modules are factored unstacked, in
  parallel over ``workers`` threads (default ``torch.get_num_threads()``) with single-threaded
  LAPACK each. While that runs, torch's intra-op thread count is 1 process-wide; it is restored
  afterwards. ``workers=1`` keeps the serial loop with torch's own threading.

Results equal the per-module calls (to rounding), in the order of the input mapping.

:func:`truncated_svd_many` builds each module's factor pair on demand: on CPU every worker builds,
factors and drops one module at a time, so peak memory stays at a few modules' worth and the
stacking runs in parallel too; on an accelerator one chunk per shape is held at a time.

Where the factoring runs is a runtime's choice, not a method's: inside ``with svd_device(dev):``
the functions here factor on ``dev`` (the runtime's GPU) whatever device the client factors
arrive on, and hand results back on the factors' device.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TypeVar

import torch
from torch import Tensor

from fedlora.lowrank.svd import ImplicitSVD, LowRankSVD, implicit_svd

T = TypeVar("T")
_THREADS = threading.Lock()
_DEVICE: ContextVar[torch.device | None] = ContextVar("fedlora_svd_device", default=None)


@contextmanager
def svd_device(device: torch.device | str | None) -> Iterator[None]:
    """Within the block, :func:`truncated_svd_many` and :func:`lowrank_svd_many` factor on
    ``device`` (``None``: where the inputs are) and return results on the inputs' device.

    A runtime whose uploads arrive on the CPU wraps ``method.aggregate`` in it to run the
    methods' QRs and SVDs on its accelerator, without the methods knowing about devices."""
    token = _DEVICE.set(None if device is None else torch.device(device))
    try:
        yield
    finally:
        _DEVICE.reset(token)


def group_by_shape(pairs: Mapping[str, tuple[Tensor, Tensor]]) -> dict[tuple[int, ...], list[str]]:
    """Module names grouped by ``(d_out, q, d_in)`` of their ``(up, down)`` pair, in input order."""
    groups: dict[tuple[int, ...], list[str]] = defaultdict(list)
    for name, (up, down) in pairs.items():
        groups[(int(up.shape[-2]), int(up.shape[-1]), int(down.shape[-1]))].append(name)
    return dict(groups)


@contextmanager
def _single_threaded_torch() -> Iterator[None]:
    with _THREADS:
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(before)


def _map(fn: Callable[[str], T], names: Sequence[str], on_cpu: bool, workers: int | None) -> list[T]:
    """``fn`` over ``names``: in parallel threads with single-threaded torch on CPU (see the
    module docstring), else (or with one worker) in a plain loop."""
    n = min(len(names), torch.get_num_threads() if workers is None else max(1, workers))
    if not on_cpu or n <= 1:
        return [fn(name) for name in names]
    with _single_threaded_torch(), ThreadPoolExecutor(n, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        return list(pool.map(fn, names))


def _blocks(
    pairs: Mapping[str, tuple[Tensor, Tensor]], max_batch_elements: int, stack: bool | None
) -> tuple[list[str], list[list[str]]]:
    """The modules to factor one by one, and the stacked batches: shape groups cut into chunks of
    at most ``max_batch_elements`` stacked input elements (``stack`` default: off CPU only)."""
    singles: list[str] = []
    batches: list[list[str]] = []
    for (d_out, q, d_in), names in group_by_shape(pairs).items():
        batched = pairs[names[0]][0].device.type != "cpu" if stack is None else stack
        chunk = _chunk_size((d_out, q, d_in), max_batch_elements) if batched else 1
        for start in range(0, len(names), chunk):
            block = names[start : start + chunk]
            if len(block) == 1:
                singles.append(block[0])
            else:
                batches.append(block)
    return singles, batches


def _chunk_size(shape: tuple[int, int, int], max_batch_elements: int) -> int:
    """How many ``(d_out, q, d_in)`` pairs one stacked call takes: at most
    ``max_batch_elements`` stacked input elements, at least one pair."""
    d_out, q, d_in = shape
    return max(1, max_batch_elements // max(1, (d_out + d_in) * max(q, 1)))


def _on_cpu(pairs: Mapping[str, tuple[Tensor, Tensor]]) -> bool:
    return all(up.device.type == "cpu" for up, _ in pairs.values())


def implicit_svd_many(
    pairs: Mapping[str, tuple[Tensor, Tensor]],
    *,
    dtype: torch.dtype | None = None,
    max_batch_elements: int = 1 << 27,
    stack: bool | None = None,
    workers: int | None = None,
) -> dict[str, ImplicitSVD]:
    """:func:`~fedlora.lowrank.svd.implicit_svd` of every ``up @ down``: all singular values,
    singular vectors kept implicit (form the needed ones with :func:`leading_many`).
    ``max_batch_elements``, ``stack`` and ``workers`` as in :func:`lowrank_svd_many`."""
    singles, batches = _blocks(pairs, max_batch_elements, stack)
    out = dict(zip(singles, _map(lambda n: implicit_svd(*pairs[n], dtype=dtype), singles, _on_cpu(pairs), workers)))
    for block in batches:
        isvd = implicit_svd(
            torch.stack([pairs[n][0] for n in block]), torch.stack([pairs[n][1] for n in block]), dtype=dtype
        )
        for i, n in enumerate(block):
            out[n] = isvd[i]
    return {n: out[n] for n in pairs}


def leading_many(
    isvds: Mapping[str, ImplicitSVD], ranks: Mapping[str, int] | None = None, *, workers: int | None = None
) -> dict[str, LowRankSVD]:
    """``isvds[m].leading(ranks[m])`` for every module (all components where ``ranks`` has no
    entry), in parallel on CPU as in :func:`lowrank_svd_many`."""
    ranks = ranks or {}
    names = list(isvds)
    on_cpu = all(v.S.device.type == "cpu" for v in isvds.values())
    return dict(zip(names, _map(lambda n: isvds[n].leading(ranks.get(n)), names, on_cpu, workers)))


def lowrank_svd_many(
    pairs: Mapping[str, tuple[Tensor, Tensor]],
    *,
    dtype: torch.dtype | None = None,
    max_batch_elements: int = 1 << 27,
    stack: bool | None = None,
    workers: int | None = None,
    device: torch.device | str | None = None,
) -> dict[str, LowRankSVD]:
    """:func:`~fedlora.lowrank.svd.lowrank_svd` of every ``up @ down``.

    ``stack``: batch each shape group into stacked calls (default: on every device but the
    CPU); ``max_batch_elements`` bounds the elements of one stacked input (memory), splitting
    large groups into chunks. ``workers``: parallel threads for the unstacked CPU path (default
    ``torch.get_num_threads()``; see the module docstring). ``device``: where to factor, as in
    :func:`truncated_svd_many`.
    """
    result = truncated_svd_many(
        list(pairs),
        pairs.__getitem__,
        dtype=dtype,
        max_batch_elements=max_batch_elements,
        stack=stack,
        workers=workers,
        device=device,
    )
    return {n: svd for n, (_, svd) in result.items()}


def truncated_svd_many(
    names: Sequence[str],
    make_pair: Callable[[str], tuple[Tensor, Tensor]],
    keep: Callable[[str, Tensor], int] | None = None,
    *,
    dtype: torch.dtype | None = None,
    max_batch_elements: int = 1 << 27,
    stack: bool | None = None,
    workers: int | None = None,
    device: torch.device | str | None = None,
    overwrite: bool = False,
) -> dict[str, tuple[Tensor, LowRankSVD]]:
    """For every module ``n``: all singular values ``S`` of ``up @ down`` (``(up, down) =
    make_pair(n)``) and its leading ``keep(n, S)`` components with singular vectors (all when
    ``keep`` is None): ``{n: (S, svd)}`` in the order of ``names``.

    ``device``: where to factor (default: :func:`svd_device`'s, else where ``make_pair`` puts
    the pairs); results come back to the pairs' device. Unstacked (default on CPU), pairs are
    built inside the parallel workers one module at a time; stacked (default elsewhere), pairs
    are built one at a time too and factored per shape in chunks of at most
    ``max_batch_elements`` stacked elements, so device memory holds one chunk, not every
    client's factors. ``overwrite``: the pairs are fresh and may be overwritten by the QRs
    (:func:`~fedlora.lowrank.svd.implicit_svd`). ``dtype``, ``stack`` and ``workers`` as in
    :func:`lowrank_svd_many`.
    """
    names = list(names)
    if not names:
        return {}
    built = {names[0]: make_pair(names[0])}  # its device picks the default path
    home = built[names[0]][0].device
    target = torch.device(device) if device is not None else (_DEVICE.get() or home)
    if not (target.type != "cpu" if stack is None else stack):

        def one(n: str) -> tuple[Tensor, LowRankSVD]:
            pair = built.pop(n, None)
            up, down = pair if pair is not None else make_pair(n)
            moved = up.device != target
            isvd = implicit_svd(up.to(target), down.to(target), dtype=dtype, overwrite=overwrite or moved)
            svd = isvd.leading(None if keep is None else keep(n, isvd.S))
            return _to(isvd.S, svd, home)

        return dict(zip(names, _map(one, names, target.type == "cpu", workers)))

    out: dict[str, tuple[Tensor, LowRankSVD]] = {}
    pending: dict[tuple[int, ...], list[tuple[str, Tensor, Tensor]]] = defaultdict(list)

    def flush(key: tuple[int, ...]) -> None:
        block = pending.pop(key)
        ups = torch.stack([up for _, up, _ in block]).to(target)
        downs = torch.stack([down for _, _, down in block]).to(target)
        isvd = implicit_svd(ups, downs, dtype=dtype)
        del ups, downs
        for i, (n, _, _) in enumerate(block):
            one = isvd[i]
            out[n] = _to(one.S, one.leading(None if keep is None else keep(n, one.S)), home)

    for n in names:
        up, down = built.pop(n) if n in built else make_pair(n)
        key = (int(up.shape[-2]), int(up.shape[-1]), int(down.shape[-1]))
        pending[key].append((n, up, down))
        if len(pending[key]) >= _chunk_size(key, max_batch_elements):
            flush(key)
    for key in list(pending):
        flush(key)
    return {n: out[n] for n in names}


def _to(S: Tensor, svd: LowRankSVD, device: torch.device) -> tuple[Tensor, LowRankSVD]:
    if S.device == device:
        return S, svd
    return S.to(device), LowRankSVD(svd.U.to(device), svd.S.to(device), svd.Vh.to(device))
