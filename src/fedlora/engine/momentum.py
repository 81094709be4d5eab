"""Training momentum, measured every round from factors (the FedMomentum paper's central claim).

Over every adapted module at once (the model's update read as one vector), round ``t`` gives::

    dW_t = D_t + s (B^{t+1} A^{t+1} - B^t A^t)     the global model's effective update
                                                  (D_t: the round's backbone delta, scale applied)
    U_t  = sum_i p_i s_i B_i A_i - s B^t A^t        the exact mean of the clients' own updates
                                                  (Method.client_factors; p_i by sample counts)

    update_norm       = ||dW_t||
    update_cosine     = <dW_t, dW_{t-1}> / (||dW_t|| ||dW_{t-1}||)    (null after a zero update)
    path_efficiency   = ||sum_{k<=t} dW_k|| / sum_{k<=t} ||dW_k||      (1: a straight path)
    aggregation_error = ||dW_t - U_t|| / ||U_t||                    (null where U_t is unknown)
    client_update_norm = ||U_t||
    energy            = the method's own split of its aggregate (Method.energy_split; FedMomentum:
                        kept in the LoRA, merged into the backbone, dropped)

Exact and never dense, in float64 on the model's CUDA device (else the CPU): norms and inner
products from Gram matrices of the stacked factors (:meth:`FactoredDelta.energy`, ``inner``;
cost ``(d_out + d_in) q q'`` for ranks ``q, q'``), except the aggregation error's numerator,
which is zero up to rounding for the exact methods and so comes from thin QRs
(:meth:`FactoredDelta.norm`: a Gram sum would cancel at ``sqrt(eps)`` of the terms' size).
``||dW_t||`` and ``||U_t||`` are differences too, but of terms at most ~1e3 times their size,
where a Gram sum keeps ~10 digits.
``dW_t - U_t = D_t + s B^{t+1} A^{t+1} - sum_i p_i s_i B_i A_i``: the common ``s B^t A^t`` cancels
before any arithmetic (``sum_i p_i = 1``), so an exact method reports float32 rounding of its own
factors (~1e-7), not the difference of two large numbers. The precision is the factors' (float32
on every base, bf16 and 4-bit included): these are the updates the method defines, which the
model applies up to its backbone's rounding (``model/side.py`` keeps that exact on bf16/4-bit bases).

The path's sum is ``S_t = L_t + s (B^{t+1} A^{t+1} - B^0 A^0)``, ``L_t`` the backbone deltas so
far; ``||S_t||^2 = ||S_{t-1}||^2 + 2 <S_{t-1}, dW_t> + ||dW_t||^2`` costs one inner product
linear in ``L``'s rank, and ``L`` is re-factored exactly (:meth:`FactoredDelta.compress`) when its
stored rank passes ``min(d_out, d_in)``. A round with no accepted update has ``dW_t = 0``.

Weights: ``p_i`` are the uploads' sample counts, as every method uses by default; with
client-level DP or a server optimizer the aggregate differs from ``U_t`` by their noise and step
too, and the error counts them. ``(B^0, A^0)``, ``dW_{t-1}`` and the two running sums are
checkpointed; ``L`` is rebuilt on resume by replaying the ledger through :meth:`absorb`, the same
float operations in the same order, so a resumed run writes the same numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from fedlora.engine.checkpoint import factors_from_tree, factors_tree, ledger_from_tree, ledger_tree
from fedlora.lowrank import FactoredDelta
from fedlora.methods import ClientUpload, Factors, GlobalState, Method
from fedlora.methods.base import aggregation_weights, clone_factors, stacked_products

Deltas = Mapping[str, FactoredDelta]


Device = torch.device | str | None


def total_inner(x: Deltas, y: Deltas, device: Device = None) -> float:
    """``sum_m <x_m, y_m>_F`` over the modules both hold (a missing module is zero)."""
    return sum(d.inner(y[m], device) for m, d in x.items() if m in y)


def total_norm(x: Deltas, device: Device = None, *, cancels: bool = False) -> float:
    """``sqrt(sum_m ||x_m||_F^2)``: from Gram matrices (:meth:`FactoredDelta.energy`), or, where
    the terms may cancel to far below their own size (``cancels``), from QRs
    (:meth:`FactoredDelta.norm`, about twice the cost, accurate at any cancellation)."""
    if cancels:
        return math.sqrt(sum(d.norm(device) ** 2 for d in x.values()))
    return math.sqrt(max(sum(d.energy(device) for d in x.values()), 0.0))


def work_device(device: Device) -> torch.device:
    """Where the float64 reductions run: the model's CUDA device, else the CPU (MPS has no float64)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    return device if device.type == "cuda" else torch.device("cpu")


def lora_change(before: Factors, after: Factors, scale: float) -> dict[str, FactoredDelta]:
    """``s (B' A' - B A)`` per module, as a rank-2r factored delta."""
    out = {}
    for m, a in after.items():
        b = before[m]
        assert a.A is not None and a.B is not None and b.A is not None and b.B is not None
        d = FactoredDelta(int(a.B.shape[0]), int(a.A.shape[1]))
        out[m] = d.add(a.B, a.A, scale).add(b.B.to(a.B.dtype), b.A.to(a.A.dtype), -scale)
    return out


def effective_update(before: GlobalState, after: GlobalState, backbone: Deltas) -> dict[str, FactoredDelta]:
    """``dW_t = D_t + s (B^{t+1} A^{t+1} - B^t A^t)`` per module."""
    update = lora_change(before.factors, after.factors, after.spec.scale())
    for m, d in backbone.items():
        update[m] = d.plus(update[m]) if m in update else d
    return update


def clients_mean(
    method: Method, state: GlobalState, uploads: Sequence[ClientUpload]
) -> dict[str, FactoredDelta] | None:
    """``sum_i p_i s_i B_i A_i`` per module (stacked factors, rank ``n r``), or ``None`` when some
    upload does not determine its client's LoRA (:meth:`Method.client_factors`)."""
    if not uploads:
        return None
    completed = []
    for u in uploads:
        factors = method.client_factors(state, u)
        if factors is None:
            return None
        completed.append(ClientUpload(u.client_id, factors, u.num_examples))
    p = aggregation_weights(completed)
    out = {}
    for m in state.factors:
        scales = [state.spec.scale(completed[i].factors[m].rank) for i in range(len(completed))]
        out[m] = FactoredDelta.from_factors(*stacked_products(completed, m, p, scales))
    return out


@dataclass
class MomentumTracker:
    """The running state of the diagnostics (see the module docstring)."""

    start: Factors
    """``(B^0, A^0)``: the run's initial global LoRA."""
    backbone: dict[str, FactoredDelta] = field(default_factory=dict)
    """``L``: the backbone deltas so far (rebuilt from the ledger on resume)."""
    previous: dict[str, FactoredDelta] = field(default_factory=dict)
    """``dW_{t-1}`` (empty after a zero update and before round 1)."""
    path_sq: float = 0.0
    """``||sum_k dW_k||^2``."""
    path_length: float = 0.0
    """``sum_k ||dW_k||``."""
    previous_norm: float = 0.0
    """``||dW_{t-1}||``."""

    def observe(
        self,
        method: Method,
        before: GlobalState,
        after: GlobalState,
        backbone: Deltas,
        uploads: Sequence[ClientUpload],
        report: Mapping[str, Mapping[str, float]] | None = None,
        device: Device = None,
    ) -> dict[str, Any]:
        """Round ``before.round``'s numbers; then absorb its backbone delta and remember ``dW``.

        ``before``/``after``: the global state at the start and the end of the round (after a
        server optimizer and the final flush); ``backbone``: the deltas applied to the backbone;
        ``uploads``: the accepted uploads the method aggregated; ``report``: the method's report;
        ``device``: where the float64 reductions run (:func:`work_device`; the factors stay put).
        """
        device = work_device(device)
        scale = after.spec.scale()
        update = effective_update(before, after, backbone)
        norm = total_norm(update, device)
        # ||S_t||^2 from ||S_{t-1}||^2, S_{t-1} = L_{t-1} + s (B^t A^t - B^0 A^0)
        path_before = lora_change(self.start, before.factors, scale)
        for m, d in self.backbone.items():
            path_before[m] = d.plus(path_before[m])
        self.path_sq = max(self.path_sq + 2.0 * total_inner(path_before, update, device) + norm**2, 0.0)
        self.path_length += norm
        prev = self.previous_norm
        cosine = total_inner(update, self.previous, device) / (norm * prev) if norm > 0 and prev > 0 else None
        out: dict[str, Any] = {
            "update_norm": norm,
            "update_cosine": cosine,
            "path_efficiency": self.path_efficiency(),
            "aggregation_error": None,
            "client_update_norm": None,
        }
        mean = clients_mean(method, before, uploads)
        if mean is not None:
            exact = {m: d.copy() for m, d in mean.items()}
            for m, g in before.factors.items():
                assert g.A is not None and g.B is not None
                exact[m].add(g.B, g.A, -scale)  # U_t
            gap = {}  # dW_t - U_t = D_t + s B^{t+1} A^{t+1} - mean
            for m, a in after.factors.items():
                assert a.A is not None and a.B is not None
                d = backbone[m].copy() if m in backbone else FactoredDelta(mean[m].d_out, mean[m].d_in)
                gap[m] = d.add(a.B, a.A, scale).extend(mean[m], -1.0)
            out["client_update_norm"] = exact_norm = total_norm(exact, device)
            if exact_norm > 0:
                out["aggregation_error"] = total_norm(gap, device, cancels=True) / exact_norm
        if report:
            energy = method.energy_split(report)
            if energy is not None:
                out["energy"] = energy
        self.previous, self.previous_norm = (update, norm) if norm > 0 else ({}, 0.0)
        self.absorb(backbone)
        return out

    def path_efficiency(self) -> float | None:
        """``||sum_k dW_k|| / sum_k ||dW_k||`` so far (``None`` before any update)."""
        return math.sqrt(self.path_sq) / self.path_length if self.path_length > 0 else None

    def skip(self) -> dict[str, Any]:
        """A round with no accepted update: ``dW_t = 0``."""
        self.previous, self.previous_norm = {}, 0.0
        return {
            "update_norm": 0.0,
            "update_cosine": None,
            "path_efficiency": self.path_efficiency(),
            "aggregation_error": None,
            "client_update_norm": None,
        }

    def absorb(self, backbone: Deltas) -> None:
        """``L += D_t`` (a ledger entry), re-factored exactly when its rank passes ``min(d_out, d_in)``."""
        for m, d in backbone.items():
            total = self.backbone.setdefault(m, FactoredDelta(d.d_out, d.d_in)).extend(d)
            if total.rank > min(total.d_out, total.d_in):
                self.backbone[m] = total.compress()

    # ---- checkpoint -------------------------------------------------------------------------------
    def to_tree(self) -> dict[str, Any]:
        """What a checkpoint keeps (``L`` is replayed from the ledger, see :meth:`from_tree`)."""
        return {
            "start": factors_tree(self.start),
            "previous": ledger_tree([self.previous])[0],
            "path_sq": self.path_sq,
            "path_length": self.path_length,
            "previous_norm": self.previous_norm,
        }

    @classmethod
    def from_tree(cls, tree: Mapping[str, Any], ledger: Sequence[Deltas]) -> MomentumTracker:
        previous = ledger_from_tree([tree["previous"]])[0]
        # checkpoints written before the norm was carried (2026-12-07) recompute it from the factors
        norm = tree.get("previous_norm")
        tracker = cls(
            start=factors_from_tree(tree["start"]),
            previous=previous,
            path_sq=float(tree["path_sq"]),
            path_length=float(tree["path_length"]),
            previous_norm=float(norm) if norm is not None else total_norm(previous),
        )
        for step in ledger:
            tracker.absorb(step)
        return tracker


def initial_tracker(factors: Factors) -> MomentumTracker:
    """A fresh tracker for a run whose initial global LoRA is ``factors`` (copied)."""
    return MomentumTracker(start=clone_factors(factors))
