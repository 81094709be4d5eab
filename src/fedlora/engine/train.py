"""A client's local training: optimizer, learning-rate schedule, accumulation, clipping, autocast,
an optional regulariser of the trainable parameters (FedProx's proximal term, :func:`proximal_term`)
and an optional move after each optimizer step (SCAFFOLD's drift correction, :func:`drift_correction`).

The data order is a pure function of ``(seed, client, pass)`` plus the client's cursor (how
many examples it has consumed so far), so a resumed run replays exactly the same batches.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from fedlora.engine.config import TrainConfig
from fedlora.model.packing import sequences_in


@dataclass
class DPSGD:
    """Sample-level DP's step (``privacy.mode=sample``, fedlora/engine/privacy.py): every optimizer
    step's gradient is DP-SGD's privatised one (:func:`fedlora.privacy.dpsgd.dp_gradient`), noise
    from ``generator`` (seeded per client and round)."""

    noise_multiplier: float
    clip: float
    generator: torch.Generator


@dataclass
class TrainResult:
    loss: float
    steps: int
    examples: int
    seconds: float
    losses: list[float]


def example_stream(indices: Sequence[int], seed: int, client: str, cursor: int) -> Iterator[int]:
    """Example indices in a fresh seeded permutation per pass over the data, from ``cursor`` on."""
    n = len(indices)
    if n == 0:
        raise ValueError(f"client {client} has no training examples")
    pass_, offset = divmod(cursor, n)
    while True:
        order = list(indices)
        random.Random(f"{seed}:{client}:{pass_}").shuffle(order)
        yield from order[offset:]
        pass_, offset = pass_ + 1, 0


def lr_at(cfg: TrainConfig, step: int, total_steps: int, round_: int, num_rounds: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based) of ``total_steps`` in round ``round_``."""
    peak = cfg.lr
    if cfg.round_decay != "none" and num_rounds > 1:
        frac = round_ / (num_rounds - 1)
        shape = 0.5 * (1 + math.cos(math.pi * frac)) if cfg.round_decay == "cosine" else 1 - frac
        peak = cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape)
    if step < cfg.warmup_steps:
        return peak * (step + 1) / (cfg.warmup_steps + 1)
    if cfg.schedule == "constant" or total_steps <= cfg.warmup_steps + 1:
        return peak
    frac = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps - 1)
    if cfg.schedule == "linear":
        return peak * (1 - frac)
    return peak * 0.5 * (1 + math.cos(math.pi * frac))


def fused_adamw(device: torch.device) -> bool:
    """AdamW's fused kernel (one launch for all parameters) on CUDA; elsewhere torch's default,
    which keeps CPU runs bit-identical to earlier ones."""
    return device.type == "cuda"


def make_optimizer(
    cfg: TrainConfig, params: list[nn.Parameter], state: dict[str, Any] | None = None
) -> torch.optim.Optimizer:
    """The local optimizer over ``params``, with a carried ``state`` loaded (its kernel choice is
    this device's, whatever device the state was saved on)."""
    if cfg.optimizer == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    else:
        fused = fused_adamw(params[0].device) or None
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    if state is not None:
        optimizer.load_state_dict(state)
        if cfg.optimizer == "adamw":
            for group in optimizer.param_groups:
                group["fused"] = fused
    return optimizer


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    if cfg.precision == "float32" or (cfg.precision == "auto" and device.type != "cuda"):
        return None
    if cfg.precision == "auto":
        return torch.bfloat16
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.precision]


def steps_for(cfg: TrainConfig, num_examples: int) -> int:
    """Optimizer steps this round: ``max_steps``, or ``epochs`` over the client's data."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    per_step = cfg.batch_size * cfg.grad_accum
    return max(1, math.ceil(cfg.epochs * num_examples / per_step))


def step_size_sum(cfg: TrainConfig, steps: int, round_: int, num_rounds: int) -> float:
    """``sum_k eta_k`` over the round's ``steps`` optimizer steps (SCAFFOLD's ``K eta_l``)."""
    return math.fsum(lr_at(cfg, k, steps, round_, num_rounds) for k in range(steps))


def drift_correction(moves: Sequence[tuple[nn.Parameter, torch.Tensor]]) -> Callable[[float], None]:
    """``after_step(lr)`` for :func:`train_local`: ``p <- p - lr d`` for each ``(p, d)`` (``d`` cast to
    ``p``'s device and dtype once); SCAFFOLD's ``y <- y - eta_k (c - c_i)``."""
    pairs = [(p, d.to(p.device, p.dtype)) for p, d in moves]

    @torch.no_grad()
    def after_step(lr: float) -> None:
        for p, d in pairs:
            p.add_(d, alpha=-lr)

    return after_step


def proximal_term(params: Sequence[nn.Parameter], mu: float) -> Callable[[], torch.Tensor]:
    """FedProx (Li et al., MLSys 2020): ``R(theta) = mu/2 sum_p ||p - p_start||^2`` over ``params``,
    anchored at their values now (where the client starts the round). Its gradient is
    ``mu (p - p_start)``; computed in each parameter's dtype (float32 LoRA factors), outside autocast."""
    anchors = [p.detach().clone() for p in params]

    def term() -> torch.Tensor:
        return 0.5 * mu * sum(((p - a) ** 2).sum() for p, a in zip(params, anchors))

    return term


def train_local(
    model: nn.Module,
    params: list[nn.Parameter],
    batches: Iterator[dict[str, torch.Tensor]],
    loss_fn: Callable[[nn.Module, dict[str, Any]], torch.Tensor],
    cfg: TrainConfig,
    *,
    steps: int,
    round_: int,
    num_rounds: int,
    optimizer_state: dict[str, Any] | None = None,
    on_step: Callable[[int, float], None] | None = None,
    regulariser: Callable[[], torch.Tensor] | None = None,
    after_step: Callable[[float], None] | None = None,
    dp: DPSGD | None = None,
) -> tuple[TrainResult, dict[str, Any]]:
    """Run ``steps`` optimizer steps; return the result and the optimizer's state dict.

    ``regulariser()``, a function of the parameters only, adds its gradient once per optimizer step
    (after the micro-batches' accumulated loss gradient, before clipping); the reported losses
    are the task's loss alone. ``after_step(lr)`` runs after each optimizer step with its
    learning rate (a move outside the optimizer: no clipping, no preconditioning). With ``dp``,
    each step's gradient is DP-SGD's over its ``grad_accum`` micro-batches (per-example clipping
    and noise replace ``train.clip``; the reported loss is the mean of the examples' own losses)."""
    device = params[0].device
    optimizer = make_optimizer(cfg, params, optimizer_state)
    amp = autocast_dtype(cfg, device)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
    model.train()
    losses: list[float] = []
    examples = 0
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        hooks = None
        if dp is not None:
            from fedlora.privacy.dpsgd import PerExampleGradients

            hooks = stack.enter_context(PerExampleGradients(model, params))
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(cfg, step, steps, round_, num_rounds)
            optimizer.zero_grad(set_to_none=True)
            if dp is not None:
                total, seen = _dp_step(model, params, batches, cfg, dp, amp, hooks)
            else:
                total, seen = _step_gradient(model, batches, loss_fn, cfg, device, amp, scaler, step)
            examples += seen
            if regulariser is not None:
                reg = regulariser()
                (scaler.scale(reg) if scaler else reg).backward()
            if scaler:
                scaler.unscale_(optimizer)
            if cfg.clip > 0 and dp is None:
                torch.nn.utils.clip_grad_norm_(params, cfg.clip)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            if after_step is not None:
                after_step(optimizer.param_groups[0]["lr"])
            losses.append(total)
            if on_step:
                on_step(step, total)
    model.eval()
    seconds = time.perf_counter() - start
    result = TrainResult(
        loss=sum(losses) / max(1, len(losses)), steps=steps, examples=examples, seconds=seconds, losses=losses
    )
    return result, optimizer.state_dict()


def _step_gradient(
    model: nn.Module,
    batches: Iterator[dict[str, torch.Tensor]],
    loss_fn: Callable[[nn.Module, dict[str, Any]], torch.Tensor],
    cfg: TrainConfig,
    device: torch.device,
    amp: torch.dtype | None,
    scaler: torch.amp.GradScaler | None,
    step: int,
) -> tuple[float, int]:
    """The step's loss gradient accumulated over ``grad_accum`` micro-batches: ``(loss, sequences)``."""
    total, examples = 0.0, 0
    for _ in range(cfg.grad_accum):
        batch = next(batches)
        examples += sequences_in(batch)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = loss_fn(model, batch) / cfg.grad_accum
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss at step {step}")
        (scaler.scale(loss) if scaler else loss).backward()
        total += float(loss.detach())
    return total, examples


def _dp_step(
    model: nn.Module,
    params: list[nn.Parameter],
    batches: Iterator[dict[str, torch.Tensor]],
    cfg: TrainConfig,
    dp: DPSGD,
    amp: torch.dtype | None,
    hooks: Any,
) -> tuple[float, int]:
    """DP-SGD's privatised gradient over the step's micro-batches, written into ``p.grad``."""
    from fedlora.privacy.dpsgd import dp_gradient

    micro = [next(batches) for _ in range(cfg.grad_accum)]
    out = dp_gradient(
        model,
        params,
        micro,
        clip=dp.clip,
        noise_multiplier=dp.noise_multiplier,
        generator=dp.generator,
        expected_batch_size=cfg.batch_size * cfg.grad_accum,
        autocast=amp,
        hooks=hooks,
    )
    if not math.isfinite(out.loss):
        raise FloatingPointError("non-finite training loss in a DP-SGD step")
    return out.loss, out.examples
