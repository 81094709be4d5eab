"""Sample-level DP-SGD on a client's trainable parameters (LoRA factors, a ``modules_to_save`` head).

One DP-SGD step over the examples ``i = 1..n`` of its micro-batches replaces the step's gradient by

    g~ = (1/B) [ sum_i clip_C(g_i) + N(0, sigma^2 C^2 I) ]

* ``g_i``: example ``i``'s gradient of its own loss (:func:`per_example_loss`) with respect to the
  trainable parameters only, as one vector (its L2 norm is joint over all of them);
* ``clip_C(g) = g * min(1, C / (||g|| + 1e-6))`` (Opacus's rule: a clipped contribution has norm < C);
* the noise is drawn once per optimizer step, whatever the number of micro-batches, from the
  caller's seeded CPU ``torch.Generator`` in float64 and cast to the parameters' dtype;
* ``B`` is the *expected* batch size: ``expected_batch_size`` if given (Poisson sampling with rate
  q over N examples: B = qN, a constant, as the privacy analysis assumes), else the number of
  examples the step actually saw (fedlora's shuffled fixed-size batches). The noise's scale on g~
  is ``sigma C / B``.

g~ is *written* into ``p.grad`` (replacing what was there), so any optimizer (SGD, AdamW, fused or
not: it only reads ``p.grad``) steps with it. A data-independent regulariser (FedProx's proximal
term) may add its gradient afterwards at no privacy cost.

Per-example gradients come from Opacus's hooks (:class:`opacus.grad_sample.GradSampleHooks`): a
forward hook on every module owning a trainable parameter (with PEFT: each ``lora_A``/``lora_B``
``nn.Linear`` and a ``modules_to_save`` head) keeps its input, a full backward hook forms
``g_i = sum_tokens grad_out[i]^T x[i]``. Frozen modules (the base's linear layers, bitsandbytes
nf4/int8 layers included, embeddings, norms) own no trainable parameter and get no hook. The hooks
attach to the model in place (no copy, no wrapper module) and :class:`PerExampleGradients` removes
them and every attribute Opacus set, so the one-base-model binding is reused across clients.
``nn.Linear``'s grad sampler here is Opacus's computed in float32 (Opacus's own runs in the
backprop's dtype, bf16 under autocast); other module types use Opacus's registered samplers or
its ``torch.func`` fallback.

Why Opacus's hooks and not ``torch.func`` (``functional_call`` + ``vmap(grad)``) over the whole model,
by experiment (opacus 1.6.0, torch 2.13, transformers 5.25, peft 0.21.2, bitsandbytes 0.50, CPU):
vmap fails in transformers' SDPA mask construction (data-dependent control flow in
``_ignore_causal_mask_sdpa``); with eager attention it works on a float32 base, but it fails on
nf4 and int8 bases (bitsandbytes' autograd Functions lack ``setup_context``). The hooks only touch
the LoRA/head ``nn.Linear`` modules, whatever the base is, and keep SDPA.

Found by experiment and handled here: with ``enable_input_require_grads`` (what checkpointing
setups turn on) ``autograd.grad(loss, params)`` never fires the first layers' full backward hooks, so
a full ``.backward()`` runs with ``p.grad`` stashed and put back; gradient checkpointing made the
per-example gradients silently wrong (relative error ~1, reentrant or not), so it is refused, and
every step checks that the examples' gradients sum to autograd's batch gradient.

Requirements and limits:

* one example per row: a packed batch (several sequences in one row,
  :mod:`fedlora.model.packing`) is refused, DP-SGD runs with ``train.packing=pad``;
* the model must be in training mode (Opacus records activations only then); dropout is fine;
* no gradient checkpointing (the recomputed forward would record every activation twice);
* float16 autocast (which needs a GradScaler) is refused; bf16 autocast and float32 run.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedlora.model.packing import IGNORE_INDEX, model_inputs, sequences_in
from fedlora.privacy.clipping import gaussian_tensor

LossFn = Callable[[nn.Module, Mapping[str, Tensor]], Tensor]
CLIP_EPS = 1e-6  # clip factor min(1, C / (||g|| + eps)), as Opacus's optimizer
SUM_RTOL = 5e-2  # the examples' gradients must sum to autograd's batch gradient within this (bf16: ~1e-2)


# ---- per-example losses --------------------------------------------------------------------------
def per_example_loss(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    """The loss of each row of ``batch`` (shape ``(n,)``, float32), for the tasks fedlora trains.

    * causal LM (``labels`` of the ``input_ids``' shape): labels shifted as transformers does
      (token t predicts label t+1), ``-100`` masked; an example's loss is the *mean* over its own
      unmasked label tokens, which is what the model's ``.loss`` is for that example alone (an
      example without any label token has loss 0 and gradient 0). The mean, not the sum, keeps an
      example's gradient independent of its length, so one clip norm suits short and long examples;
    * sequence classification (``labels`` of shape ``(n,)`` or ``(n, k)``): transformers' rule for
      ``problem_type`` (regression: squared error; single label: cross entropy; multi label: binary
      cross entropy averaged over the labels), per example.

    Logits are taken in float32 (as transformers' losses do), also under autocast."""
    inputs = {k: v for k, v in model_inputs(dict(batch)).items() if k != "labels"}
    labels = batch["labels"]
    logits = model(**inputs).logits.float()
    if logits.dim() == 3 and labels.dim() == 2:
        shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
        ce = F.cross_entropy(logits.transpose(1, 2), shifted, ignore_index=IGNORE_INDEX, reduction="none")
        mask = shifted != IGNORE_INDEX
        return (ce * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
    config = getattr(model, "config", None)
    problem = getattr(config, "problem_type", None)
    num_labels = logits.shape[-1]
    if problem is None:
        if num_labels == 1:
            problem = "regression"
        elif labels.dtype in (torch.long, torch.int):
            problem = "single_label_classification"
        else:
            problem = "multi_label_classification"
    if problem == "regression":
        target = labels.float().reshape(logits.shape[0], -1)
        return ((logits.reshape(target.shape) - target) ** 2).mean(dim=1)
    if problem == "single_label_classification":
        return F.cross_entropy(logits.reshape(-1, num_labels), labels.reshape(-1), reduction="none")
    bce = F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="none")
    return bce.reshape(bce.shape[0], -1).mean(dim=1)


# ---- per-example gradients (Opacus hooks, attached in place) ------------------------------------
def _linear_grad_sample_fp32(layer: nn.Linear, activations: list[Tensor], backprops: Tensor) -> dict[Tensor, Tensor]:
    """Opacus's ``nn.Linear`` sampler, accumulated in float32 (the sum over tokens included)."""
    x, gy = activations[0].float(), backprops.float()
    out = {}
    if layer.weight.requires_grad:
        out[layer.weight] = torch.einsum("n...i,n...j->nij", gy, x)
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = torch.einsum("n...k->nk", gy)
    return out


_MODULE_ATTRS = ("activations", "max_batch_len", "ft_compute_sample_grad", "autograd_grad_sample_hooks")
_PARAM_ATTRS = ("grad_sample", "_forward_counter", "_current_grad_sample", "_norm_sample")


class PerExampleGradients:
    """Opacus's per-sample-gradient hooks on ``model``'s trainable modules, removed by :meth:`close`
    (also as a context manager). ``params`` must be exactly the model's parameters that require a
    gradient (``LoRABinding.set_trainable``'s list); their gradients come back in that order."""

    def __init__(self, model: nn.Module, params: Sequence[nn.Parameter]) -> None:
        try:
            from opacus.grad_sample import GradSampleHooks
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("DP-SGD needs opacus (pip install 'opacus>=1.6,<1.7')") from exc

        trainable = [p for p in model.parameters() if p.requires_grad]
        if {id(p) for p in trainable} != {id(p) for p in params} or len(trainable) != len(params):
            raise ValueError(
                f"params must be exactly the model's trainable parameters ({len(trainable)} require a gradient, "
                f"{len(params)} given)"
            )
        self.model = model
        self.params = list(params)
        # torch marks a module given a backward hook as full/old-style for good, even once the hook is
        # removed; a module without any backward hook now is cleared (and its mark put back on close)
        self._full_hook_mark = {id(m): m.__dict__.get("_is_full_backward_hook") for m in model.modules()}
        for m in model.modules():
            if not m._backward_hooks:
                m._is_full_backward_hook = None

        class _Hooks(GradSampleHooks):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                # an instance's registry (read while the hooks attach): Opacus's class-level one stays
                self.GRAD_SAMPLERS = {**GradSampleHooks.GRAD_SAMPLERS, nn.Linear: _linear_grad_sample_fp32}
                super().__init__(*args, **kwargs)

        # loss_reduction="sum": the loss backpropagated is the sum of the per-example losses, so a
        # grad sample is exactly the example's gradient (no rescaling by the batch size).
        self._hooks: Any = _Hooks(model, batch_first=True, loss_reduction="sum", strict=True)
        # on only inside compute(): other forwards/backwards while attached (evaluation, a plain
        # step) record nothing and keep no activations
        self._hooks.disable_hooks()

    def __enter__(self) -> PerExampleGradients:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def compute(
        self, batch: Mapping[str, Tensor], loss_fn: LossFn = per_example_loss, autocast: torch.dtype | None = None
    ) -> tuple[list[Tensor], Tensor]:
        """``(grads, losses)`` for one batch: per parameter a float32 tensor ``(n, *p.shape)`` of the
        examples' gradients, and the examples' losses ``(n,)`` (detached). ``p.grad`` is left as it was."""
        if self._hooks is None:
            raise RuntimeError("the per-example hooks were closed")
        if not self.model.training:
            raise ValueError("per-example gradients need the model in training mode (model.train())")
        n = int(batch["input_ids"].shape[0]) if "input_ids" in batch else int(batch["labels"].shape[0])
        if "input_ids" in batch and sequences_in(dict(batch)) != n:
            raise ValueError("DP-SGD needs one example per row: a packed batch cannot be clipped per example")
        device = self.params[0].device
        if autocast == torch.float16:
            raise ValueError("float16 autocast needs loss scaling, which DP-SGD here does not do; use bfloat16")
        if any(getattr(m, "gradient_checkpointing", False) is True for m in self.model.modules()):
            # the recomputed forward records the activations again (non-reentrant) or the hooks see
            # no graph (reentrant): the per-example gradients would be silently wrong
            raise ValueError(
                "per-example gradients cannot run with gradient checkpointing (train.gradient_checkpointing)"
            )
        self._reset()
        self._hooks.enable_hooks()
        try:
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                losses = loss_fn(self.model, batch)
            if losses.shape != (n,):
                raise ValueError(f"the loss function must return one loss per example: shape {tuple(losses.shape)}")
            # a full .backward(), not autograd.grad(losses, params): when a module's input requires a
            # gradient (enable_input_require_grads, which checkpointing setups turn on)
            # autograd.grad skips the input gradients of the first layers and their full backward
            # hooks never fire. p.grad is stashed and put back: the call leaves it as it was.
            stash = [p.grad for p in self.params]
            for p in self.params:
                p.grad = None
            try:
                with warnings.catch_warnings():
                    # the first LoRA layers' inputs need no gradient (frozen embeddings): the full
                    # backward hook then fires on the output's gradient, which is what the sampler uses
                    warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
                    losses.sum().backward()
                total = [p.grad for p in self.params]
            finally:
                for p, g in zip(self.params, stash):
                    p.grad = g
            return self._collect(n, total), losses.detach().float()
        finally:
            self._hooks.disable_hooks()
            self._reset()

    def _collect(self, n: int, total: Sequence[Tensor | None]) -> list[Tensor]:
        """The grad samples, checked against autograd's batch gradient ``total``: their sum over the
        examples must be it (a cheap guard against silently wrong hooks, e.g. a module run twice)."""
        grads = []
        for p, t in zip(self.params, total):
            gs = p.grad_sample
            if gs is None and t is not None:
                raise RuntimeError(f"no per-example gradient for a trainable parameter {tuple(p.shape)}")
            if gs is None:  # not in this batch's graph (e.g. an unused head): zero gradient
                gs = torch.zeros((n, *p.shape), device=p.device, dtype=torch.float32)
            if isinstance(gs, list):
                raise RuntimeError("a trainable module ran more than once per forward")
            if gs.shape != (n, *p.shape):
                raise RuntimeError(f"per-example gradient of shape {tuple(gs.shape)} for a parameter {tuple(p.shape)}")
            grads.append(gs.float())
        ref = [t.float() for t in total if t is not None]
        if ref:
            err = torch.sqrt(sum(((g.sum(0) - t.float()) ** 2).sum() for g, t in zip(grads, total) if t is not None))
            norm = torch.sqrt(sum((t**2).sum() for t in ref))
            if float(err) > SUM_RTOL * float(norm) + 1e-12:
                raise RuntimeError(
                    f"the per-example gradients do not sum to the batch gradient (relative error "
                    f"{float(err) / max(float(norm), 1e-30):.2e}): a module the hooks cannot follow?"
                )
        return grads

    def _reset(self) -> None:
        """Forget what a step left on the modules and parameters (also after a failed step)."""
        for m in self.model.modules():
            for attr in ("activations", "max_batch_len"):
                if attr in m.__dict__:
                    delattr(m, attr)
        for p in self.params:
            p.grad_sample = None
            p._forward_counter = 0
            if "_current_grad_sample" in p.__dict__:
                del p._current_grad_sample

    def close(self) -> None:
        """Remove every hook and attribute Opacus added: the model is as before."""
        if self._hooks is None:
            return
        self._hooks.cleanup()
        self._hooks = None
        for m in self.model.modules():
            for attr in _MODULE_ATTRS:
                if attr in m.__dict__:
                    delattr(m, attr)
            if id(m) in self._full_hook_mark and not m._backward_hooks:
                m._is_full_backward_hook = self._full_hook_mark[id(m)]
        for p in self.model.parameters():
            for attr in _PARAM_ATTRS:
                if attr in p.__dict__:
                    delattr(p, attr)


# ---- one DP-SGD step -----------------------------------------------------------------------------
@dataclass
class DPStep:
    """What one privatised step saw: per example (all micro-batches, in order) its loss and its
    gradient's norm before clipping; the clip norm, the denominator ``B`` and the std of the noise
    in ``g~`` (``sigma C / B``)."""

    losses: Tensor
    norms: Tensor
    clip: float
    batch_size: float
    noise_std: float

    @property
    def examples(self) -> int:
        return int(self.norms.numel())

    @property
    def clipped(self) -> int:
        """How many examples had their gradient scaled down (``||g_i|| + 1e-6 > C``)."""
        return int((self.norms + CLIP_EPS > self.clip).sum())

    @property
    def loss(self) -> float:
        return float(self.losses.mean()) if self.losses.numel() else 0.0


def clip_factors(norms: Tensor, clip: float) -> Tensor:
    """``min(1, C / (||g_i|| + 1e-6))`` per example."""
    return (clip / (norms + CLIP_EPS)).clamp(max=1.0)


def dp_gradient(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    batches: Mapping[str, Tensor] | Sequence[Mapping[str, Tensor]],
    *,
    clip: float,
    noise_multiplier: float,
    generator: torch.Generator,
    expected_batch_size: float | None = None,
    loss_fn: LossFn = per_example_loss,
    autocast: torch.dtype | None = None,
    hooks: PerExampleGradients | None = None,
) -> DPStep:
    """Compute one DP-SGD step's privatised gradient ``g~`` over ``batches`` (one batch, or the
    step's micro-batches under gradient accumulation) and write it into ``p.grad`` of ``params``.

    Each micro-batch's per-example gradients are clipped as soon as they are formed and summed in
    float32 (memory: one micro-batch of per-example gradients at a time); the Gaussian noise
    ``N(0, (noise_multiplier * clip)^2)`` is added once, then everything is divided by ``B``
    (``expected_batch_size``, or the number of examples seen; see the module docstring). The
    forward runs under ``autocast`` (``None``: the model's dtype), the backward outside it.

    ``hooks``: attached :class:`PerExampleGradients` to reuse across steps (attach once per client
    round, close after); without it hooks are attached for this call and removed before returning."""
    if clip <= 0 or not math.isfinite(clip):
        raise ValueError(f"clip must be a positive finite norm, got {clip}")
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    micro = [batches] if isinstance(batches, Mapping) else list(batches)
    if not micro:
        raise ValueError("no batch to compute a gradient from")
    with contextlib.ExitStack() as stack:
        if hooks is None:
            hooks = stack.enter_context(PerExampleGradients(model, params))
        elif [id(p) for p in hooks.params] != [id(p) for p in params]:
            raise ValueError("the attached hooks are for other parameters")
        sums = [torch.zeros(p.shape, device=p.device, dtype=torch.float32) for p in params]
        all_norms, all_losses = [], []
        for batch in micro:
            grads, losses = hooks.compute(batch, loss_fn, autocast)
            norms = torch.sqrt(sum((g.reshape(g.shape[0], -1) ** 2).sum(dim=1) for g in grads))
            factor = clip_factors(norms, clip)
            for s, g in zip(sums, grads):
                s.add_(torch.einsum("n,n...->...", factor, g))
            all_norms.append(norms.detach().cpu())
            all_losses.append(losses.cpu())
    norms = torch.cat(all_norms)
    denom = float(expected_batch_size) if expected_batch_size is not None else float(norms.numel())
    if denom <= 0:
        raise ValueError(f"expected_batch_size must be positive, got {expected_batch_size}")
    std = noise_multiplier * clip
    for p, s in zip(params, sums):
        if std > 0:
            s.add_(gaussian_tensor(p.shape, std, generator).to(s.device, torch.float32))
        p.grad = (s / denom).to(p.dtype)
    return DPStep(losses=torch.cat(all_losses), norms=norms, clip=clip, batch_size=denom, noise_std=std / denom)


def per_example_gradients(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    batch: Mapping[str, Tensor],
    *,
    loss_fn: LossFn = per_example_loss,
    autocast: torch.dtype | None = None,
) -> tuple[list[Tensor], Tensor]:
    """One batch's per-example gradients ``(n, *p.shape)`` (float32) and losses, hooks attached for
    the call only."""
    with PerExampleGradients(model, params) as hooks:
        return hooks.compute(batch, loss_fn, autocast)


def iter_micro_batches(batch: Mapping[str, Tensor], size: int) -> Iterator[dict[str, Tensor]]:
    """Split a batch's rows into micro-batches of ``size`` rows (tests, memory-bound callers)."""
    n = int(next(iter(batch.values())).shape[0])
    for start in range(0, n, size):
        yield {k: v[start : start + size] for k, v in batch.items()}
