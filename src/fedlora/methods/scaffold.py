"""SCAFFOLD (Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning", ICML 2020, Algorithm 1 with option II) around a factor-averaging method.

Control variates live on the factors the method averages and the clients upload in round ``t``,
``F_t = averaged_factors(t) & uploaded_factors(t)``: a server variate ``c`` and a variate ``c_i``
per client, one tensor per (module, factor) of the factor's shape, zero at the start. With ``x``
the round-start global factor and ``y`` the client's, over its ``K`` local optimizer steps with
learning rates ``eta_k`` (``S_i = sum_k eta_k``, the runtime's ``ClientContext.step_size``):

    client, after each optimizer step k:  y <- y - eta_k (c - c_i)
    client, after the round:              c_i+ = c_i - c + (x - y_i) / S_i
    server, after the method's aggregate: c <- c + (1/N) sum_{i in accepted} (c_i+ - c_i)
                                            = c + (1/N) sum_{i in accepted} ((x - y_i) / S_i - c)

``N`` is the number of clients (``partition.num_clients``), ``y_i`` client i's uploaded factor.
The server's ``c_i+ - c_i`` depends only on ``x``, ``y_i``, ``c`` and ``S_i``, so the server
derives it from the upload: clients send no control update (the paper's second upload). The
down-link carries ``c`` beside the factors (``bytes_down`` counts it). The factors' own
aggregate is the wrapped method's, unchanged (and a server optimizer, if configured, steps it).
With all ``c_i`` zero at the start and every accepted upload counted, ``c = (1/N) sum_i c_i``
over all clients after every round (the paper's invariant; a test checks it).

Choices where the paper is silent (it analyses plain SGD on all parameters):

- **The correction is decoupled** from the optimizer: it moves the factor after the optimizer's
  step, scaled by that step's learning rate (as OpenFedLLM's SCAFFOLD does), so gradient
  clipping, AdamW's preconditioning and weight decay never touch it. With plain SGD (no
  momentum, weight decay or clipping) it is the paper's step ``y <- y - eta (g + c - c_i)``
  exactly. With AdamW, ``(x - y_i) / S_i`` is the client's mean displacement per unit learning
  rate, in the same units as the correction it feeds.
- ``S_i = sum_k eta_k`` replaces ``K eta_l`` (equal under a constant learning rate; correct per
  unit learning rate under schedules, round decay and clients with different step counts).
- ``c`` averages uniformly over all ``N`` clients, as the paper (not by sample counts, as the
  factors are). A rejected upload adds nothing to ``c`` (its client's ``c_i`` has moved: as a
  lost message in the paper). An upload with ``S_i = 0`` (no learning) changes neither variate.
- Which factors, per method: fedit and fedrot_lora both (FedRot-LoRA's variates are in each
  client's own frame, where it trains; the server rotates the uploads after this step); ffa_lora
  B; rolora the round's active factor (the other's variates wait, unchanged); fedsa_lora the
  shared A (each client's own B is never averaged and gets no correction). ``modules_to_save``
  (a classifier head) get no variates. Methods that average no factor are refused
  (:func:`check_scaffold`).

State: ``c`` in the method state under ``scaffold/c/<module>/<A|B>`` (checkpointed and sent with
it); ``c_i`` in the client's memory under ``scaffold/c_i/<module>/<A|B>`` (kept where the
runtime keeps client records). The wrapped method never sees these keys.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Mapping, Sequence

import torch
from torch import Tensor

from fedlora.lowrank import FactoredDelta
from fedlora.methods.base import (
    ClientContext,
    ClientStart,
    ClientUpload,
    Factors,
    GlobalState,
    LoRASpec,
    Method,
    ModuleFactors,
    RoundResult,
    compute_dtype_of,
)

SERVER = "scaffold/c/"
CLIENT = "scaffold/c_i/"


def check_scaffold(method: Method) -> None:
    """Raise ``ValueError`` naming ``train.scaffold`` when ``method`` averages no factor."""
    if not method.averaged_factors(0):
        from fedlora.methods.server_opt import factor_averaging_methods

        raise ValueError(
            f"train.scaffold is not defined for method {method.name}: SCAFFOLD corrects the drift of parameters "
            "the server averages, and its round update is not a mean of factors (the product sum_i p_i B_i A_i "
            f"or a function of it). train.scaffold combines with: {', '.join(factor_averaging_methods())}"
        )


def _split(tensors: Mapping[str, Tensor], prefix: str) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(the keys under prefix, without it; the others)``."""
    ours = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    rest = {k: v for k, v in tensors.items() if not k.startswith("scaffold/")}
    return ours, rest


def _key(module: str, which: str) -> str:
    return f"{module}/{which}"


class Scaffold(Method):
    """``inner`` with SCAFFOLD's control variates (see the module docstring); ``num_clients`` is
    ``N``. Everything else (name, settings, client hooks, aggregate) is the inner method's."""

    def __init__(self, inner: Method, num_clients: int) -> None:
        check_scaffold(inner)
        if num_clients < 1:
            raise ValueError(f"SCAFFOLD needs at least one client, got num_clients={num_clients}")
        self.inner = inner
        self.num_clients = num_clients
        self.settings = inner.settings
        self.name = inner.name  # type: ignore[misc]  # the run is the inner method's, with SCAFFOLD
        self.summary = inner.summary  # type: ignore[misc]
        self.heterogeneous_ranks = inner.heterogeneous_ranks  # type: ignore[misc]
        self.ranks_above_global = inner.ranks_above_global  # type: ignore[misc]
        self.changes_backbone = inner.changes_backbone  # type: ignore[misc]
        self.needs_gradient = inner.needs_gradient  # type: ignore[misc]

    # ---- which factors -----------------------------------------------------------------------
    def controlled(self, state: GlobalState) -> frozenset[str]:
        """``F_t``: the factors with control variates in round ``state.round``."""
        return self.inner.averaged_factors(state.round) & self.inner.uploaded_factors(self._inner_state(state))

    def _inner_state(self, state: GlobalState) -> GlobalState:
        return replace(state, method_state=_split(state.method_state, SERVER)[1])

    def server_control(self, state: GlobalState) -> dict[str, Tensor]:
        """``c`` by ``<module>/<factor>`` (absent entries are zero)."""
        return _split(state.method_state, SERVER)[0]

    # ---- client side -------------------------------------------------------------------------
    def _inner_ctx(self, ctx: ClientContext) -> ClientContext:
        return replace(ctx, memory=_split(ctx.memory, CLIENT)[1])

    def client_start(self, state: GlobalState, ctx: ClientContext) -> ClientStart:
        start = self.inner.client_start(self._inner_state(state), self._inner_ctx(ctx))
        c, c_i = self.server_control(state), _split(ctx.memory, CLIENT)[0]
        correction: Factors = {}
        for m in state.factors:
            parts: dict[str, Tensor | None] = {"A": None, "B": None}
            for which in self.controlled(state) & start.trainable:
                server, own = c.get(_key(m, which)), c_i.get(_key(m, which))
                if server is None and own is None:
                    continue  # both zero: nothing to correct
                ref = server if server is not None else own
                assert ref is not None
                zero = torch.zeros_like(ref)
                parts[which] = (zero if server is None else server) - (zero if own is None else own)
            if parts["A"] is not None or parts["B"] is not None:
                correction[m] = ModuleFactors(A=parts["A"], B=parts["B"])
        return replace(start, correction=correction)

    def client_finish(
        self, state: GlobalState, ctx: ClientContext, start: ClientStart, trained: Factors
    ) -> tuple[Factors, dict[str, Tensor]]:
        upload, memory = self.inner.client_finish(self._inner_state(state), self._inner_ctx(ctx), start, trained)
        c_i = _split(ctx.memory, CLIENT)[0]
        if ctx.step_size > 0:
            c = self.server_control(state)
            for m, f in upload.items():
                for which in self.controlled(state):
                    y = f.get(which)
                    if y is None:
                        continue
                    x = state.factors[m].get(which)
                    assert x is not None
                    key = _key(m, which)
                    c_i[key] = _next_client_control(c_i.get(key), c.get(key), x, y, ctx.step_size)
        return upload, {**memory, **{CLIENT + k: v for k, v in c_i.items()}}

    def personal_factors(self, state: GlobalState, memory: Mapping[str, Tensor]) -> Factors | None:
        return self.inner.personal_factors(self._inner_state(state), _split(memory, CLIENT)[1])

    @property
    def has_personal_models(self) -> bool:
        return self.inner.has_personal_models

    def client_factors(self, state: GlobalState, upload: ClientUpload) -> Factors | None:
        return self.inner.client_factors(self._inner_state(state), upload)

    def energy_split(self, report: Mapping[str, Mapping[str, float]]) -> dict[str, float] | None:
        return self.inner.energy_split(report)

    def uploaded_factors(self, state: GlobalState) -> frozenset[str]:
        return self.inner.uploaded_factors(self._inner_state(state))

    def averaged_factors(self, round_: int) -> frozenset[str]:
        return self.inner.averaged_factors(round_)

    def needs_global(self, round_: int) -> bool:
        return self.inner.needs_global(round_)

    def sum_only(self, round_: int) -> bool:
        return self.inner.sum_only(round_)

    def seeded_factors(self, round_: int, shapes: Mapping[str, tuple[int, int]], spec: LoRASpec) -> Factors | None:
        return self.inner.seeded_factors(round_, shapes, spec)

    # ---- server side -------------------------------------------------------------------------
    def aggregate(
        self, state: GlobalState, uploads: Sequence[ClientUpload], weights: Sequence[float] | None = None
    ) -> RoundResult:
        result = self.inner.aggregate(self._inner_state(state), uploads, weights)
        c = next_server_control(self.server_control(state), state, uploads, self.controlled(state), self.num_clients)
        method_state = {**result.state.method_state, **{SERVER + k: v for k, v in c.items()}}
        report = {m: dict(r) for m, r in result.report.items()}
        for m in state.factors:
            norms = [float(t.norm()) for k, t in c.items() if k.rpartition("/")[0] == m]
            if norms:
                report.setdefault(m, {})["control_norm"] = sum(n * n for n in norms) ** 0.5
        return replace(
            result,
            state=replace(result.state, method_state=method_state),
            bytes_down=result.bytes_down + sum(t.numel() * t.element_size() for t in c.values()),
            report=report,
        )

    def finalize(self, state: GlobalState) -> tuple[GlobalState, dict[str, FactoredDelta]]:
        c = self.server_control(state)
        done, deltas = self.inner.finalize(self._inner_state(state))
        return replace(done, method_state={**done.method_state, **{SERVER + k: v for k, v in c.items()}}), deltas


def _next_client_control(c_i: Tensor | None, c: Tensor | None, x: Tensor, y: Tensor, step_size: float) -> Tensor:
    """``c_i+ = c_i - c + (x - y) / S`` (absent variates are zero), in float32 or float64."""
    dt = torch.float64 if torch.float64 in (x.dtype, y.dtype) else torch.float32
    out = (x.to(dt) - y.to(dt)) / step_size
    if c_i is not None:
        out = out + c_i.to(dt)
    if c is not None:
        out = out - c.to(dt)
    return out


def next_server_control(
    c: Mapping[str, Tensor],
    state: GlobalState,
    uploads: Sequence[ClientUpload],
    which: frozenset[str],
    num_clients: int,
) -> dict[str, Tensor]:
    """``c + (1/N) sum_i ((x - y_i) / S_i - c)`` over the uploads with ``S_i > 0``, for every
    module and factor in ``which`` (the others keep their ``c``). Pure."""
    dt = compute_dtype_of(state)
    out = dict(c)
    counted = [u for u in uploads if u.step_size > 0]
    if not counted:
        return out
    for m, g in state.factors.items():
        for name in sorted(which):
            x = g.get(name)
            assert x is not None
            key = _key(m, name)
            old = c.get(key)
            old_dt = torch.zeros_like(x, dtype=dt) if old is None else old.to(dt)
            total = torch.zeros_like(old_dt)
            for u in counted:
                y = u.factors[m].get(name)
                if y is None:
                    raise ValueError(f"client {u.client_id}: module {m} has no factor {name}")
                total = total + (x.to(dt) - y.to(dt)) / u.step_size - old_dt
            out[key] = old_dt + total / num_clients
    return out
