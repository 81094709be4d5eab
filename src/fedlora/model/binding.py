"""One base model with one PEFT LoRA adapter, whose factors are swapped per client.

The simulation keeps a single copy of the base model in memory whatever the number of
clients: a client is a set of factors (plus optimizer state), loaded into the adapter before
its local training and read back after. This module is the only place that touches PEFT's
layer internals; everything above it sees :class:`~fedlora.methods.base.Factors` keyed by the
PEFT key prefix (``base_model.model.<path>``), as in saved adapters.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

from fedlora.lowrank import FactoredDelta, lora_scale
from fedlora.methods.base import AB, Factors, LoRASpec, ModuleFactors
from fedlora.model import side as side_path
from fedlora.model.adapter_io import save_deltas, write_adapter
from fedlora.model.backbone import apply_backbone_delta, mergeable, resolve_mode
from fedlora.model.packing import accepts_packed_sequences

ADAPTER = "default"
INITS: dict[str, bool | str] = {"default": True, "gaussian": "gaussian", "pissa": "pissa"}


@contextlib.contextmanager
def quiet_checkpointing_deprecation() -> Iterator[None]:
    """Silence exactly one FutureWarning while PEFT wraps a model.

    PEFT 0.21.2's ``PeftModel.__init__`` reads ``model.is_gradient_checkpointing``, which
    transformers 5.x (seen with 5.25.0) deprecates for ``is_activation_checkpointing`` (removal in
    v6), so every wrap printed the warning. fedlora never reads the old name; drop this once PEFT
    reads the new one.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


@dataclass(frozen=True)
class LoRASettings:
    """The adapter attached to the base model."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    dropout: float = 0.0
    rslora: bool = False
    modules_to_save: tuple[str, ...] = field(default_factory=tuple)
    init: str = "default"  # PEFT's init_lora_weights: default (True), gaussian, pissa
    backbone_delta: str = "auto"  # how backbone deltas reach the base: auto, merge, side (model/backbone.py)
    side_rtol: float = 0.0  # side path: drop components below side_rtol * s_max (0: rounding-level only)
    side_max_rank: int = 0  # side path: keep at most this many components per layer (0: no cap)

    def peft_init(self) -> bool | str:
        if self.init not in INITS:
            raise ValueError(f"unknown LoRA init {self.init!r}; allowed: {', '.join(INITS)}")
        return INITS[self.init]

    def spec(self) -> LoRASpec:
        return LoRASpec(rank=self.rank, alpha=self.alpha, use_rslora=self.rslora)


class LoRABinding:
    """A PEFT-wrapped model whose LoRA factors can be read, replaced, frozen and resized.

    ``base_name`` is the model's name as the user gave it (``offline:smollm2-135m``, a hub id, a
    path as written): saved adapters record it as ``base_model_name_or_path`` instead of the
    folder the weights were loaded from (e.g. a machine-local cache), so they are portable.
    Without it PEFT's default (the loaded folder) stays.
    """

    def __init__(
        self, model: nn.Module, lora: LoRASettings, task_type: str | None = None, base_name: str | None = None
    ) -> None:
        config = LoraConfig(
            r=lora.rank,
            lora_alpha=lora.alpha,
            target_modules=list(lora.targets),
            lora_dropout=lora.dropout,
            use_rslora=lora.rslora,
            task_type=task_type,
            modules_to_save=list(lora.modules_to_save) or None,
            init_lora_weights=lora.peft_init(),
        )
        self.lora = lora
        with quiet_checkpointing_deprecation():
            self.model: PeftModel = get_peft_model(model, config)
        if base_name:  # after get_peft_model, which sets it from the loaded folder
            self.model.peft_config[ADAPTER].base_model_name_or_path = base_name
        self.layers: dict[str, LoraLayer] = {
            name: m for name, m in self.model.named_modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A
        }
        if not self.layers:
            raise ValueError(f"no module of the model matches the LoRA targets {list(lora.targets)}")
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.backbone_mode = resolve_mode(lora.backbone_delta, self.model, self.layers)
        """``merge`` or ``side``: how :meth:`apply_delta` changes the backbone (``auto`` resolved)."""
        self.side_dropped: dict[str, float] = {}
        """Per module, the fraction of energy the side path's cap dropped at the last :meth:`apply_delta`."""
        self.init_delta = self._init_shift()

    @functools.cached_property
    def accepts_packed_sequences(self) -> bool:
        """Whether the model keeps sequences packed into one row apart (probed once:
        :func:`fedlora.model.packing.accepts_packed_sequences`)."""
        return accepts_packed_sequences(self.model)

    def _init_shift(self) -> dict[str, FactoredDelta]:
        """What the LoRA init did to the base weights, as a backbone delta: PiSSA moves each
        weight's top-r part into the factors, ``W <- W - s B_0 A_0``; other inits change nothing.
        An exported adapter applies to the original base model with this delta included."""
        if self.lora.init != "pissa":
            return {}
        out = {}
        for name, f in self.get_factors().items():
            s = float(self.layers[name].scaling[ADAPTER])
            out[name] = FactoredDelta.from_factors(-s * f.B, f.A)
        return out

    # ---- factors ------------------------------------------------------------------------
    @property
    def spec(self) -> LoRASpec:
        return self.lora.spec()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def shapes(self) -> dict[str, tuple[int, int]]:
        return {n: (layer.out_features, layer.in_features) for n, layer in self.layers.items()}

    def get_factors(self, dtype: torch.dtype = torch.float32) -> Factors:
        """Copies of every module's ``(A, B)`` on the CPU."""
        out = {}
        for name, layer in self.layers.items():
            A = layer.lora_A[ADAPTER].weight.detach().to("cpu", dtype).clone()
            B = layer.lora_B[ADAPTER].weight.detach().to("cpu", dtype).clone()
            out[name] = ModuleFactors(A=A, B=B)
        return out

    def rank(self) -> int:
        return int(next(iter(self.layers.values())).r[ADAPTER])

    @torch.no_grad()
    def set_factors(self, factors: Mapping[str, ModuleFactors]) -> None:
        """Load factors into the adapter (resizing it if the rank changes; the scale follows)."""
        missing = set(self.layers) - set(factors)
        if missing:
            raise KeyError(f"factors for {len(missing)} modules are missing, e.g. {sorted(missing)[0]}")
        for name, f in factors.items():
            layer = self.layers[name]
            if f.A is None or f.B is None:
                raise ValueError(f"module {name}: both factors are needed to load an adapter")
            r = int(f.A.shape[0])
            if r != layer.r[ADAPTER]:
                self._resize(layer, r)
            a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
            if tuple(f.A.shape) != tuple(a.shape) or tuple(f.B.shape) != tuple(b.shape):
                raise ValueError(f"module {name}: factors {tuple(f.B.shape)}x{tuple(f.A.shape)} do not fit")
            a.copy_(f.A.to(a.dtype))
            b.copy_(f.B.to(b.dtype))

    def _resize(self, layer: LoraLayer, r: int) -> None:
        a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
        layer.lora_A[ADAPTER] = nn.Linear(layer.in_features, r, bias=False).to(a.device, a.dtype)
        layer.lora_B[ADAPTER] = nn.Linear(r, layer.out_features, bias=False).to(b.device, b.dtype)
        layer.r[ADAPTER] = r
        layer.scaling[ADAPTER] = lora_scale(layer.lora_alpha[ADAPTER], r, self.lora.rslora)
        for p in (layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight):
            p.requires_grad_(False)

    def set_trainable(self, factors: frozenset[str] = AB) -> list[nn.Parameter]:
        """Make exactly the named factors (and ``modules_to_save``) trainable; return them."""
        params = []
        for p in self.model.parameters():
            p.requires_grad_(False)
        for layer in self.layers.values():
            for which, mod in (("A", layer.lora_A[ADAPTER]), ("B", layer.lora_B[ADAPTER])):
                if which in factors:
                    mod.weight.requires_grad_(True)
                    params.append(mod.weight)
        for name, p in self.model.named_parameters():
            if "modules_to_save" in name:
                p.requires_grad_(True)
                params.append(p)
        return params

    def factor_parameter(self, module: str, which: str) -> nn.Parameter:
        """The parameter holding factor ``which`` (``"A"`` or ``"B"``) of ``module``."""
        layer = self.layers[module]
        return (layer.lora_A if which == "A" else layer.lora_B)[ADAPTER].weight

    def extras(self) -> dict[str, torch.Tensor]:
        """Trainable non-LoRA tensors (``modules_to_save``, e.g. a classifier head), by name."""
        return {n: p.detach().cpu().clone() for n, p in self.model.named_parameters() if "modules_to_save" in n}

    @torch.no_grad()
    def set_extras(self, extras: Mapping[str, torch.Tensor]) -> None:
        params = dict(self.model.named_parameters())
        for n, t in extras.items():
            params[n].copy_(t.to(params[n].dtype))

    # ---- backbone -----------------------------------------------------------------------
    def apply_delta(self, deltas: Mapping[str, FactoredDelta], alpha: float = 1.0) -> None:
        """``W += alpha * delta`` on the backbone: merged into the base weights (float32
        accumulation, stored in their dtype) or onto the float32 side path (:attr:`backbone_mode`)."""
        self.side_dropped = apply_backbone_delta(
            self.model,
            deltas,
            alpha,
            mode=self.backbone_mode,
            rtol=self.lora.side_rtol,
            max_rank=self.lora.side_max_rank,
        )

    def backbone_report(self) -> dict[str, float]:
        """The side path's size and what its cap dropped (``{}`` when deltas are merged)."""
        return side_path.side_report(self.model)

    @contextlib.contextmanager
    def shifted(self, deltas: Mapping[str, FactoredDelta]) -> Iterator[None]:
        """Temporarily ``W += delta`` (a client-only shift); the exact backbone comes back after."""
        if self.backbone_mode == "side":
            with self._side_shifted(deltas):
                yield
            return
        saved = {}
        try:
            for name, d in deltas.items():
                if d.is_empty:
                    continue
                weight = self.layers[name].get_base_layer().weight
                saved[name] = weight.detach().clone()
                self.apply_delta({name: d})
            yield
        finally:
            with torch.no_grad():
                for name, w in saved.items():
                    self.layers[name].get_base_layer().weight.copy_(w)

    @contextlib.contextmanager
    def _side_shifted(self, deltas: Mapping[str, FactoredDelta]) -> Iterator[None]:
        bases = {n: self.layers[n].get_base_layer() for n, d in deltas.items() if not d.is_empty}
        saved = {}
        for n, base in bases.items():
            side = side_path.side_of(base)
            saved[n] = (side.delta, side.dropped) if side is not None else None
        dropped = self.side_dropped  # a temporary shift is not a round's apply: its report stays
        try:
            self.apply_delta({n: deltas[n] for n in bases})
            yield
        finally:
            for n, base in bases.items():
                side = side_path.side_of(base)
                if saved[n] is None:
                    side_path.detach(base)
                elif side is not None:
                    side.delta, side.dropped = saved[n]
            self.side_dropped = dropped

    def full_weight_gradients(
        self, batches: Iterable[dict[str, torch.Tensor]], loss_fn: Callable[[nn.Module, dict], torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Mean gradient of the loss w.r.t. every adapted module's base weight (LoRA disabled),
        over ``batches``; in ``nn.Linear`` orientation, float32, on the CPU.

        Float32 weights get it from autograd on the weight; other bases (bf16, 4-bit, 8-bit:
        no float32 or no gradient at all on the stored weight) from the layer's input and output
        gradient, ``sum_tokens grad_y^T x`` in float32 (the same quantity)."""
        if not all(mergeable(layer.get_base_layer().weight) for layer in self.layers.values()):
            return self._gradients_from_activations(batches, loss_fn)
        weights = {n: layer.get_base_layer().weight for n, layer in self.layers.items()}
        flags = {n: w.requires_grad for n, w in weights.items()}
        lora_flags = [p.requires_grad for p in self.model.parameters()]
        sums: dict[str, torch.Tensor] = {}
        count = 0
        try:
            for p in self.model.parameters():
                p.requires_grad_(False)
            for w in weights.values():
                w.requires_grad_(True)
                w.grad = None
            with self.model.disable_adapter():
                for batch in batches:
                    loss = loss_fn(self.model, batch)
                    loss.backward()
                    count += 1
            if count == 0:
                raise ValueError("no batches to estimate the gradient from")
            for n, w in weights.items():
                g = w.grad.detach().float()
                if self.layers[n].fan_in_fan_out:
                    g = g.T
                sums[n] = (g / count).cpu()
                w.grad = None
        finally:
            for w, flag in zip(weights.values(), flags.values()):
                w.requires_grad_(flag)
            for p, flag in zip(self.model.parameters(), lora_flags):
                p.requires_grad_(flag)
        return sums

    def _gradients_from_activations(
        self, batches: Iterable[dict[str, torch.Tensor]], loss_fn: Callable[[nn.Module, dict], torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        bases = {n: layer.get_base_layer() for n, layer in self.layers.items()}
        sums = {
            n: torch.zeros(layer.out_features, layer.in_features, device=self.device)
            for n, layer in self.layers.items()
        }
        flags = [p.requires_grad for p in self.model.parameters()]

        def capture(name: str) -> Callable[..., None]:
            def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
                if not output.requires_grad:
                    return
                x = inputs[0].detach()

                def on_grad(g: torch.Tensor) -> None:
                    gy = g.reshape(-1, g.shape[-1]).float()
                    sums[name].add_(gy.mT @ x.reshape(-1, x.shape[-1]).float())

                output.register_hook(on_grad)

            return hook

        handles = [base.register_forward_hook(capture(n)) for n, base in bases.items()]
        inner = self.model.get_base_model()
        count, enabled_here = 0, False
        try:
            for p in self.model.parameters():
                p.requires_grad_(False)
            enabled_here = not hasattr(inner, "_require_grads_hook")
            if enabled_here:  # frozen weights: the graph starts at the embeddings' output
                inner.enable_input_require_grads()
            with self.model.disable_adapter():
                for batch in batches:
                    loss_fn(self.model, batch).backward()
                    count += 1
            if count == 0:
                raise ValueError("no batches to estimate the gradient from")
        finally:
            for h in handles:
                h.remove()
            if enabled_here:
                inner.disable_input_require_grads()
            for p, flag in zip(self.model.parameters(), flags):
                p.requires_grad_(flag)
        return {n: (g / count).cpu() for n, g in sums.items()}

    # ---- export -------------------------------------------------------------------------
    def save_adapter(
        self, path: str | Path, factors: Factors | None = None, deltas: Mapping[str, FactoredDelta] | None = None
    ) -> None:
        """Write a PEFT adapter folder (the given or current factors) and, if given, the backbone delta."""
        factors = factors if factors is not None else self.get_factors()
        config = self.model.peft_config[ADAPTER].to_dict()
        for k, v in list(config.items()):
            if isinstance(v, set):
                config[k] = sorted(v)
        config["peft_type"] = "LORA"
        config.pop("runtime_config", None)
        extras = {_saved_extra_name(n): t for n, t in self.extras().items()}
        dtype = next(iter(self.layers.values())).lora_A[ADAPTER].weight.dtype
        write_adapter(path, config, factors, extras, dtype)
        if deltas is not None:
            save_deltas(Path(path) / "backbone_delta.safetensors", deltas, {"fan_in_fan_out": "false"})


def _saved_extra_name(param_name: str) -> str:
    """``...classifier.modules_to_save.default.weight`` -> ``...classifier.weight`` (PEFT's saved key)."""
    return param_name.replace(f".modules_to_save.{ADAPTER}", "")
