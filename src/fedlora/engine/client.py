"""One client's part of a round, shared by every runtime (simulation and Flower).

``client_round`` asks the method where the client starts, loads that into the single PEFT
model, trains locally, reads the factors back and lets the method shape the upload. It knows
nothing about how the factors got here or where the upload goes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch

from fedlora.engine.config import TrainConfig
from fedlora.engine.privacy import NoisePlan, clip_upload
from fedlora.engine.train import (
    DPSGD,
    drift_correction,
    example_stream,
    proximal_term,
    step_size_sum,
    steps_for,
    train_local,
)
from fedlora.lowrank import FactoredDelta
from fedlora.methods import ClientContext, ClientUpload, GlobalState, Method
from fedlora.model.binding import LoRABinding
from fedlora.model.packing import flatten_padded, is_right_padded, model_inputs
from fedlora.privacy import seeded_generator


def causal_or_cls_loss(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """The task's loss: transformers computes it from ``labels`` (prompt tokens masked)."""
    return model(**model_inputs(batch)).loss


@dataclass
class ClientRecord:
    """What persists for a client between its rounds (checkpointed by the runtime)."""

    cursor: int = 0
    memory: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer: dict[str, Any] | None = None


@dataclass
class LocalData:
    """A client's training examples and how to batch them."""

    client_id: str
    examples: Sequence[dict[str, Any]]
    indices: Sequence[int]
    task: Any
    tokenizer: Any
    device: torch.device
    seed: int
    batch_size: int
    packed: bool = False  # padding-free rows (fedlora.model.packing) for right-padded causal-LM batches

    def _batch(self, stream: Iterator[int]) -> dict[str, torch.Tensor]:
        idx = [next(stream) for _ in range(self.batch_size)]
        batch = self.task.collate([self.examples[i] for i in idx], self.tokenizer)
        if self.packed and is_right_padded(batch):
            batch = flatten_padded(batch)
        return {k: v.to(self.device) for k, v in batch.items()}

    def batches(self, cursor: int) -> Iterator[dict[str, torch.Tensor]]:
        """Training batches from the client's ``cursor`` on (deterministic, see ``example_stream``)."""
        stream = example_stream(self.indices, self.seed, self.client_id, cursor)
        while True:
            yield self._batch(stream)

    def gradient_batches(self, round_: int, count: int) -> list[dict[str, torch.Tensor]]:
        """``count`` batches for a full-weight gradient estimate (own stream: training order unchanged)."""
        stream = example_stream(self.indices, self.seed, f"{self.client_id}:grad:{round_}", 0)
        return [self._batch(stream) for _ in range(count)]


def gradient_fn(
    binding: LoRABinding, data: LocalData, round_: int, count: int
) -> Callable[..., dict[str, torch.Tensor]]:
    """``grad_fn(offsets)`` for :class:`~fedlora.methods.ClientContext`: the mean full-weight gradient
    at ``W + offsets`` over ``count`` local batches."""

    def grad_fn(offsets: dict[str, FactoredDelta]) -> dict[str, torch.Tensor]:
        batches = data.gradient_batches(round_, count)
        with binding.shifted(offsets):
            return binding.full_weight_gradients(batches, causal_or_cls_loss)

    return grad_fn


def client_seed(seed: int, round_: int, client_id: str) -> int:
    """The torch seed of client ``client_id``'s local round ``round_`` (63 bits of a SHA-256)."""
    h = hashlib.sha256(f"{seed}:client-rng:{round_}:{client_id}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


@dataclass
class ClientOutcome:
    upload: ClientUpload
    stats: dict[str, Any]
    extras: dict[str, torch.Tensor]


def client_round(
    binding: LoRABinding,
    method: Method,
    state: GlobalState,
    record: ClientRecord,
    data: LocalData,
    train: TrainConfig,
    *,
    rank: int,
    num_rounds: int,
    global_extras: dict[str, torch.Tensor] | None = None,
    on_step: Callable[[int, float], None] | None = None,
    noise: NoisePlan | None = None,
) -> ClientOutcome:
    """Train client ``data.client_id`` for one round; updates ``record`` in place.

    ``noise`` (``privacy.mode``, fedlora/engine/privacy.py): client-level DP clips the round's
    update (uploaded factors and extras) to ``noise.clip`` here, on the client; sample-level DP
    trains with DP-SGD.

    Torch's RNG (LoRA dropout, any method randomness) is seeded from (seed, round, client), so a
    client's round draws the same numbers in every runtime and whatever ran before it."""
    cid = data.client_id
    torch.manual_seed(client_seed(data.seed, state.round, cid))
    steps = steps_for(train, len(data.indices))
    ctx = ClientContext(
        client_id=cid,
        round=state.round,
        rank=rank,
        num_rounds=num_rounds,
        memory=record.memory,
        seed=data.seed,
        grad_fn=gradient_fn(binding, data, state.round, train.grad_batches) if method.needs_gradient else None,
        step_size=step_size_sum(train, steps, state.round, num_rounds),
    )
    start = method.client_start(state, ctx)
    binding.set_factors(start.factors)
    if global_extras:
        binding.set_extras(global_extras)
    clip_update = noise is not None and noise.mode == "client"
    start_extras = binding.extras() if clip_update else {}  # where its head starts (clip_upload's reference)
    params = binding.set_trainable(start.trainable)
    # FedProx: anchored at the factors the method started this client from (the global ones, or
    # its own start where the method gives it one: FedSA-LoRA's B, FLoRA's fresh LoRA, ...)
    regulariser = proximal_term(params, train.prox_mu) if train.prox_mu > 0 else None
    # SCAFFOLD (methods/scaffold.py): the method's drift correction, applied after each optimizer step
    moves = [
        (binding.factor_parameter(m, which), d)
        for m, f in start.correction.items()
        for which in ("A", "B")
        if (d := f.get(which)) is not None
    ]
    carry = train.optimizer_state == "carry"
    with binding.shifted(start.local_shift):
        result, opt_state = train_local(
            binding.model,
            params,
            data.batches(record.cursor),
            causal_or_cls_loss,
            train,
            steps=steps,
            round_=state.round,
            num_rounds=num_rounds,
            optimizer_state=record.optimizer if carry else None,
            on_step=on_step,
            regulariser=regulariser,
            after_step=drift_correction(moves) if moves else None,
            dp=_dpsgd(noise, data.seed, state.round, cid),
        )
    factors, memory = method.client_finish(state, ctx, start, binding.get_factors())
    extras = binding.extras()
    if clip_update:
        factors, extras = clip_upload(start.factors, factors, start_extras, extras, noise.clip)
    record.cursor += result.examples
    record.memory = memory
    record.optimizer = _cpu(opt_state) if carry else None
    stats = {"loss": result.loss, "steps": result.steps, "examples": result.examples, "seconds": result.seconds}
    if start.report:
        stats["report"] = dict(start.report)
    upload = ClientUpload(cid, factors, num_examples=len(data.indices), step_size=ctx.step_size)
    return ClientOutcome(upload, stats, extras)


def _dpsgd(noise: NoisePlan | None, seed: int, round_: int, cid: str) -> DPSGD | None:
    """Sample-level DP's settings for this client's round: its own noise multiplier, noise from
    ``(seed, "dp-sgd", round, client)``."""
    if noise is None or noise.mode != "sample":
        return None
    return DPSGD(noise.sigma_of(cid), noise.clip, seeded_generator(seed, "dp-sgd", round_, cid))


def _cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_cpu(v) for v in obj]
    return obj
