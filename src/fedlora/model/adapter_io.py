"""Reading and writing PEFT LoRA adapter folders and backbone deltas (safetensors only).

A PEFT adapter folder (``save_pretrained``) holds ``adapter_config.json`` and
``adapter_model.safetensors`` with keys ``<module>.lora_A.weight`` (r x d_in) and
``<module>.lora_B.weight`` (d_out x r), where ``<module>`` is the PEFT key prefix, e.g.
``base_model.model.model.layers.0.self_attn.q_proj``. Other tensors (``modules_to_save`` such
as classifier heads) are kept as *extras*.

A backbone delta file holds ``<module>.delta_up`` (d_out x q) and ``<module>.delta_down``
(q x d_in): the module's base weight must become ``W + delta_up @ delta_down`` (LoRA scale
applied, ``nn.Linear.weight`` orientation; transpose for ``fan_in_fan_out`` Conv1D weights).

Every write goes to a temporary name first and is renamed into place.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from fedlora.atomic import atomic_folder, atomic_path
from fedlora.lowrank import FactoredDelta
from fedlora.methods.base import Factors, LoRASpec, ModuleFactors

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
DELTA_NAME = "backbone_delta.safetensors"
_LORA_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B"}


class AdapterError(ValueError):
    """An adapter folder that cannot be used, named with the folder and the problem."""


@dataclass
class Adapter:
    """One LoRA adapter: its PEFT config, factors per module and other saved tensors."""

    config: dict[str, Any]
    factors: Factors
    extras: dict[str, Tensor] = field(default_factory=dict)
    source: str = ""

    @property
    def dtype(self) -> torch.dtype:
        f = next(iter(self.factors.values()))
        return (f.A if f.A is not None else f.B).dtype  # type: ignore[union-attr]

    @property
    def rank(self) -> int:
        ranks = {f.rank for f in self.factors.values()}
        if len(ranks) != 1:
            raise AdapterError(f"{self.source}: modules have different ranks {sorted(ranks)}")
        return ranks.pop()

    def spec(self) -> LoRASpec:
        return LoRASpec(
            rank=self.rank,
            alpha=float(self.config.get("lora_alpha", 8)),
            use_rslora=bool(self.config.get("use_rslora", False)),
        )


def read_adapter(path: str | os.PathLike) -> Adapter:
    """Load a PEFT LoRA adapter folder; raise :class:`AdapterError` naming what is wrong."""
    folder = Path(path)
    where = str(folder)
    if not folder.is_dir():
        raise AdapterError(f"{where}: not a folder")
    cfg_path, w_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not cfg_path.is_file():
        raise AdapterError(f"{where}: {CONFIG_NAME} is missing")
    if not w_path.is_file():
        bin_path = folder / "adapter_model.bin"
        hint = " (only a pickle adapter_model.bin is present; re-save it with safetensors)" if bin_path.exists() else ""
        raise AdapterError(f"{where}: {WEIGHTS_NAME} is missing{hint}")
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{where}: {CONFIG_NAME} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise AdapterError(
            f"{where}: {CONFIG_NAME} must hold a JSON object, got {type(config).__name__} {config!r:.60}"
        )
    check_config(config, where)
    try:
        tensors = load_file(str(w_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"{where}: {WEIGHTS_NAME} is unreadable ({exc})") from None
    factors: dict[str, dict[str, Tensor]] = {}
    extras: dict[str, Tensor] = {}
    for key, tensor in tensors.items():
        for suffix, which in _LORA_SUFFIXES.items():
            if key.endswith(suffix):
                factors.setdefault(key[: -len(suffix)], {})[which] = tensor
                break
        else:
            extras[key] = tensor
    if not factors:
        raise AdapterError(f"{where}: {WEIGHTS_NAME} holds no LoRA factors (no '*.lora_A.weight' keys)")
    out: Factors = {}
    for module, pair in sorted(factors.items()):
        if set(pair) != {"A", "B"}:
            missing = ({"A", "B"} - set(pair)).pop()
            raise AdapterError(f"{where}: module {module} has no lora_{missing}.weight")
        A, B = pair["A"], pair["B"]
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise AdapterError(
                f"{where}: module {module} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}, "
                "expected (r, d_in) and (d_out, r)"
            )
        if not A.is_floating_point() or not B.is_floating_point():
            raise AdapterError(f"{where}: module {module} has non-float factors ({A.dtype}, {B.dtype})")
        out[module] = ModuleFactors(A=A, B=B)
    return Adapter(config=config, factors=out, extras=extras, source=where)


def check_config(config: Mapping[str, Any], where: str) -> None:
    """Reject adapter configs whose math this package does not implement."""
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{where}: peft_type {config.get('peft_type')!r} is not LORA")
    if config.get("use_dora"):
        raise AdapterError(f"{where}: DoRA adapters (use_dora=true) are not supported")
    if config.get("lora_bias"):
        raise AdapterError(f"{where}: adapters with lora_bias=true are not supported")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise AdapterError(f"{where}: per-module {key} is not supported yet; use one rank and alpha")
    alpha = config.get("lora_alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise AdapterError(f"{where}: lora_alpha must be a positive finite number, got {alpha!r}")
    for key in ("use_rslora", "fan_in_fan_out"):
        if key in config and not isinstance(config[key], bool):
            raise AdapterError(f"{where}: {key} must be true or false, got {config[key]!r}")


def adapter_tensors(factors: Factors, extras: Mapping[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    """The safetensors payload of an adapter: ``<module>.lora_A/B.weight`` plus extras."""
    out: dict[str, Tensor] = {}
    for module, f in factors.items():
        if f.A is None or f.B is None:
            raise ValueError(f"module {module}: an adapter needs both factors")
        out[f"{module}.lora_A.weight"] = f.A.detach().to("cpu", dtype).contiguous()
        out[f"{module}.lora_B.weight"] = f.B.detach().to("cpu", dtype).contiguous()
    for key, t in extras.items():
        out[key] = t.detach().to("cpu").contiguous()
    return out


def write_adapter(
    path: str | os.PathLike,
    config: Mapping[str, Any],
    factors: Factors,
    extras: Mapping[str, Tensor] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a PEFT-loadable adapter folder atomically (``r`` in the config set from the factors)."""
    target = Path(path)
    with atomic_folder(target) as tmp:
        fill_adapter(tmp, config, factors, extras, dtype)
    return target


def fill_adapter(
    folder: Path,
    config: Mapping[str, Any],
    factors: Factors,
    extras: Mapping[str, Tensor] | None = None,
    dtype: torch.dtype = torch.float32,
) -> None:
    """An adapter's two files, written into a folder being filled atomically (``r`` in the config
    set from the factors, which must share one rank)."""
    ranks = {f.rank for f in factors.values()}
    if len(ranks) != 1:
        raise ValueError(f"an adapter folder needs one rank, got {sorted(ranks)}")
    cfg = {**config, "r": ranks.pop(), "inference_mode": True}
    save_file(adapter_tensors(factors, extras or {}, dtype), str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    (folder / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def delta_tensors(deltas: Mapping[str, FactoredDelta]) -> dict[str, Tensor]:
    """``<module>.delta_up`` / ``<module>.delta_down`` (float32) for every non-empty delta."""
    out = {}
    for module, d in deltas.items():
        if d.is_empty:
            continue
        up, down = d.factors(torch.float32)
        out[f"{module}.delta_up"] = up.contiguous()
        out[f"{module}.delta_down"] = down.contiguous()
    return out


def save_deltas(
    path: str | os.PathLike, deltas: Mapping[str, FactoredDelta], metadata: Mapping[str, str] | None = None
) -> None:
    """Write a backbone delta file atomically."""
    meta = {"format": "fedlora.backbone_delta", **(metadata or {})}
    with atomic_path(path) as tmp:
        save_file(delta_tensors(deltas), str(tmp), metadata=meta)


def load_deltas(path: str | os.PathLike) -> dict[str, FactoredDelta]:
    """Read a backbone delta file into factored deltas per module."""
    where = str(path)
    try:
        tensors = load_file(where)
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"{where}: unreadable backbone delta ({exc})") from None
    out = {}
    for key, up in tensors.items():
        if key.endswith(".delta_up"):
            module = key[: -len(".delta_up")]
            down = tensors.get(f"{module}.delta_down")
            if down is None:
                raise AdapterError(f"{where}: {module}.delta_down is missing")
            out[module] = FactoredDelta.from_factors(up, down)
    return out
