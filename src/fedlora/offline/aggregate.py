"""Offline aggregation: PEFT adapter folders in, the next global adapter (+ backbone delta) out.

``aggregate_folders`` is one server round without a runtime: it reads the clients' adapters
(``save_pretrained`` folders) and optionally the round-start global adapter, checks them, runs
a registered method and writes, atomically, into a fresh output folder:

- ``adapter_config.json`` + ``adapter_model.safetensors``: the new global LoRA (PEFT-loadable);
- ``backbone_delta.safetensors`` for methods that change the backbone (see
  :mod:`fedlora.model.adapter_io` for its layout);
- ``aggregation.json``: method, settings, rounds, weights, per-module report, bytes up/down.

Without ``--global``, the round-start global LoRA is reconstructed where that is well defined:
a factor that every client holds bit-identically (a frozen one) is taken as the global one;
every other factor is the standard init's (``B = 0``; ``A`` from the first client). Methods
that need the true reference (FedRot-LoRA after round 0) refuse to run without it.
Non-LoRA tensors (``modules_to_save``, e.g. classifier heads) are averaged with the same weights.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from fedlora.atomic import atomic_folder
from fedlora.lowrank import svd_device
from fedlora.methods import ClientContext, ClientUpload, GlobalState, LoRASpec, ModuleFactors, build_method
from fedlora.methods.base import aggregation_weights, clone_factors, weighted_mean
from fedlora.methods.validation import InvalidUpdate, check_upload
from fedlora.model.adapter_io import (
    DELTA_NAME,
    Adapter,
    AdapterError,
    fill_adapter,
    read_adapter,
    save_deltas,
)

REPORT_NAME = "aggregation.json"
_SHARED_CONFIG_KEYS = ("lora_alpha", "use_rslora", "fan_in_fan_out", "target_modules", "peft_type")


class AggregationError(ValueError):
    """Bad input to offline aggregation; the message names the folder, module and problem."""


def _same_config(adapters: Sequence[Adapter], heterogeneous: bool) -> None:
    ref = adapters[0]
    for a in adapters[1:]:
        for key in _SHARED_CONFIG_KEYS:
            if _norm(a.config.get(key)) != _norm(ref.config.get(key)):
                raise AggregationError(
                    f"{a.source}: adapter_config {key}={a.config.get(key)!r} differs from "
                    f"{ref.source} ({ref.config.get(key)!r})"
                )
        if set(a.factors) != set(ref.factors):
            extra = sorted(set(a.factors) - set(ref.factors))
            missing = sorted(set(ref.factors) - set(a.factors))
            what = f"module {extra[0]} is not in {ref.source}" if extra else f"module {missing[0]} is missing"
            raise AggregationError(f"{a.source}: {what}")
        for m, f in a.factors.items():
            g = ref.factors[m]
            if (f.B.shape[0], f.A.shape[1]) != (g.B.shape[0], g.A.shape[1]):  # type: ignore[union-attr]
                raise AggregationError(
                    f"{a.source}: module {m} is {f.B.shape[0]}x{f.A.shape[1]} but "  # type: ignore[union-attr]
                    f"{g.B.shape[0]}x{g.A.shape[1]} in {ref.source}"  # type: ignore[union-attr]
                )
            if not heterogeneous and f.rank != g.rank:
                raise AggregationError(
                    f"{a.source}: module {m} has rank {f.rank} but rank {g.rank} in {ref.source} "
                    "(this method cannot combine different ranks; flexlora and flora can)"
                )


def _norm(value: Any) -> Any:
    return sorted(value) if isinstance(value, list) else value


def _reconstructed_global(adapters: Sequence[Adapter], rank: int) -> dict[str, ModuleFactors]:
    """Round-start global factors from the clients (see module docstring)."""
    out = {}
    for m, f0 in adapters[0].factors.items():
        parts = {}
        for which in ("A", "B"):
            tensors = [a.factors[m].get(which) for a in adapters]
            same = all(t.shape == tensors[0].shape and torch.equal(t, tensors[0]) for t in tensors)  # type: ignore[union-attr]
            if same and tensors[0].shape[0 if which == "A" else 1] == rank:  # type: ignore[union-attr]
                parts[which] = tensors[0].clone()  # type: ignore[union-attr]
        A = parts.get("A", f0.A[:rank] if f0.A.shape[0] >= rank else _pad_rows(f0.A, rank))  # type: ignore[union-attr]
        B = parts.get("B", torch.zeros(f0.B.shape[0], rank, dtype=f0.B.dtype))  # type: ignore[union-attr]
        out[m] = ModuleFactors(A=A.clone(), B=B.clone())
    return out


def _pad_rows(A: torch.Tensor, rank: int) -> torch.Tensor:
    return torch.cat([A, A.new_zeros(rank - A.shape[0], A.shape[1])], 0)


def _check_frozen(method, state: GlobalState, adapters: Sequence[Adapter]) -> None:
    """Factors the method keeps frozen this round must be bit-identical to the global ones."""
    if method.needs_gradient:
        return
    for a in adapters:
        ctx = ClientContext(client_id=a.source, round=state.round, rank=a.rank)
        start = method.client_start(state, ctx)
        frozen = {"A", "B"} - set(start.trainable)
        for m, f in a.factors.items():
            for which in sorted(frozen):
                want, got = start.factors[m].get(which), f.get(which)
                if want is None or got is None:
                    continue
                if got.shape != want.shape or not torch.equal(got.to(want.dtype), want):
                    diff = (
                        float((got.to(torch.float64) - want.to(torch.float64)).abs().max())
                        if got.shape == want.shape
                        else float("nan")
                    )
                    raise AggregationError(
                        f"{a.source}: module {m}: factor {which} is frozen by {method.name} in round "
                        f"{state.round} but differs from the global one (max |diff| {diff:.3g})"
                    )


def aggregate_folders(
    method_name: str,
    client_dirs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    weights: Sequence[float] | None = None,
    global_dir: str | os.PathLike | None = None,
    round_: int | None = None,
    settings: Mapping[str, Any] | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """One aggregation round over adapter folders; returns the report written to ``aggregation.json``.

    ``device``: where the methods' QRs and SVDs run (e.g. ``cuda``; default: the CPU, where the
    adapters are loaded); the outputs are the same up to rounding.

    Raises :class:`AggregationError` (or :class:`AdapterError`) before writing anything when an
    input is bad.
    """
    method = build_method(method_name, settings)
    if not client_dirs:
        raise AggregationError("no client adapter folders given")
    out = Path(out_dir)
    if out.is_symlink():
        raise AggregationError(f"{out}: the output folder is a symbolic link; give the real path")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise AggregationError(f"{out}: output folder exists and is not empty")
    if weights is not None:
        if len(weights) != len(client_dirs):
            raise AggregationError(f"{len(weights)} weights for {len(client_dirs)} client folders")
        bad = [w for w in weights if not math.isfinite(w) or w < 0]
        if bad or sum(weights) <= 0:
            raise AggregationError(
                f"--weights {' '.join(f'{w:g}' for w in weights)}: each must be a finite number >= 0, "
                "and their sum positive"
            )
    if round_ is not None and round_ < 0:
        raise AggregationError(f"--round {round_}: rounds count from 0")

    adapters = [read_adapter(d) for d in client_dirs]
    global_adapter = read_adapter(global_dir) if global_dir is not None else None
    _same_config(adapters + ([global_adapter] if global_adapter else []), method.heterogeneous_ranks)

    if round_ is None:
        round_ = _round_after(global_dir) if global_dir is not None else 0
    if global_adapter is not None:
        _check_finite(global_adapter)
        spec = global_adapter.spec()
        global_factors = clone_factors(global_adapter.factors)
        base_config = global_adapter.config
    else:
        if method.needs_global(round_):
            raise AggregationError(f"{method.name} needs the round-start global adapter (--global) in round {round_}")
        rank = max(a.rank for a in adapters)
        spec = LoRASpec(
            rank=rank,
            alpha=float(adapters[0].config["lora_alpha"]),
            use_rslora=bool(adapters[0].config.get("use_rslora", False)),
        )
        global_factors = _reconstructed_global(adapters, rank)
        base_config = adapters[0].config
    state = GlobalState(round=round_, factors=global_factors, spec=spec)
    _check_frozen(method, state, adapters)

    sent = method.uploaded_factors(state)
    uploads = [
        ClientUpload(a.source, {m: f.only(sent) for m, f in a.factors.items()}, num_examples=1) for a in adapters
    ]
    for a, u in zip(adapters, uploads):
        try:
            check_upload(u, state, method, rank=a.rank if method.heterogeneous_ranks else None)
        except InvalidUpdate as err:
            raise AggregationError(str(err)) from None
    p = aggregation_weights(uploads, weights)
    with svd_device(device):
        result = method.aggregate(state, uploads, p)
    new_state, final_delta = method.finalize(result.state)
    deltas = dict(result.backbone_delta)
    for m, d in final_delta.items():
        deltas[m] = deltas[m].extend(d) if m in deltas else d

    extras = _average_extras(adapters, p)
    report = {
        "method": method.name,
        "settings": asdict(method.settings),
        "round": round_,
        "next_round": new_state.round,
        "clients": [{"folder": a.source, "weight": w, "rank": a.rank} for a, w in zip(adapters, p)],
        "global": str(global_dir) if global_dir is not None else None,
        "num_modules": len(state.factors),
        "rank": spec.rank,
        "scale": spec.scale(),
        "bytes_up": result.bytes_up,
        "bytes_down_per_client": result.bytes_down,
        "backbone_delta_ranks": {m: d.rank for m, d in deltas.items()},
        "modules": result.report,
    }
    with atomic_folder(out) as tmp:
        fill_adapter(tmp, base_config, new_state.factors, extras, adapters[0].dtype)
        if method.changes_backbone:
            fan = str(bool(base_config.get("fan_in_fan_out", False))).lower()
            save_deltas(tmp / DELTA_NAME, deltas, {"method": method.name, "fan_in_fan_out": fan})
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _check_finite(adapter: Adapter) -> None:
    """The round-start global adapter is an input like the clients': NaN/Inf refused by module."""
    for m, f in adapter.factors.items():
        for which in ("A", "B"):
            t = f.get(which)
            if t is not None and not bool(torch.isfinite(t).all()):
                raise AggregationError(f"{adapter.source}: module {m}: factor {which} has non-finite values (NaN/Inf)")


def _round_after(global_dir: str | os.PathLike) -> int:
    """The round to aggregate when ``--global`` is a previous ``fedlora aggregate`` output."""
    report = Path(global_dir) / REPORT_NAME
    if report.is_file():
        try:
            return int(json.loads(report.read_text())["next_round"])
        except (ValueError, KeyError, json.JSONDecodeError):
            raise AggregationError(f"{report}: unreadable aggregation report") from None
    return 0


def _average_extras(adapters: Sequence[Adapter], p: Sequence[float]) -> dict[str, torch.Tensor]:
    keys = set(adapters[0].extras)
    for a in adapters[1:]:
        if set(a.extras) != keys:
            diff = sorted(keys ^ set(a.extras))
            raise AggregationError(f"{a.source}: extra tensor {diff[0]} is not in every client adapter")
    out = {}
    for k in sorted(keys):
        tensors = [a.extras[k] for a in adapters]
        if any(t.shape != tensors[0].shape for t in tensors):
            raise AggregationError(f"{adapters[0].source}: extra tensor {k} has different shapes across clients")
        if tensors[0].is_floating_point():
            for a, t in zip(adapters, tensors):
                if not bool(torch.isfinite(t).all()):
                    raise AggregationError(f"{a.source}: extra tensor {k} has non-finite values (NaN/Inf)")
            out[k] = weighted_mean(tensors, p).to(tensors[0].dtype)
        else:
            out[k] = tensors[0]
    return out


__all__ = ["AdapterError", "AggregationError", "aggregate_folders"]
