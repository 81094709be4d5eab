"""Server optimizers (Reddi et al., "Adaptive Federated Optimization", ICLR 2021, Algorithm 2) on
the factors a factor-averaging method averages.

For every global factor ``X`` that round ``t``'s aggregate sets to a weighted mean of the clients'
factors (:meth:`~fedlora.methods.base.Method.averaged_factors`), with ``X_{t-1}`` its round-start
value and ``X_bar`` the method's aggregate (``sum_i p_i X_i``, after the method's own per-client
reparametrisation where it has one):

    D_t = X_bar - X_{t-1}                                     (pseudo-gradient, the paper's sign)
    fedavgm:     m_t = beta m_{t-1} + D_t,                    X_t = X_{t-1} + eta m_t
    fedadagrad:  m_t = beta1 m_{t-1} + (1 - beta1) D_t,       v_t = v_{t-1} + D_t^2
    fedyogi:     m_t as fedadagrad,                           v_t = v_{t-1} - (1 - beta2) D_t^2 sign(v_{t-1} - D_t^2)
    fedadam:     m_t as fedadagrad,                           v_t = beta2 v_{t-1} + (1 - beta2) D_t^2
                 adaptive ones:                               X_t = X_{t-1} + eta m_t / (sqrt(v_t) + tau)

elementwise, per factor, with ``m_{-1} = 0`` and ``v_{-1} = tau^2`` (Algorithm 2 asks
``v_{-1} >= tau^2``; this is the smallest; Flower's strategies start from ``v = 0``). No bias
correction, as in the paper. FedAvgM is Hsu et al. (2019) in Reddi et al.'s notation: with
``beta = 0`` and ``eta = 1`` it is the plain method (``X_t = X_bar``, up to rounding).

Which factors, per method (``averaged_factors``):

- ``fedit``: both A and B; ``fedrot_lora``: both (the means of the rotated factors);
- ``ffa_lora``: B (A stays at its init, identical everywhere);
- ``rolora``: the round's active factor. A factor's moments step only in the rounds that
  average it; in the other rounds it stays as the method leaves it (frozen) and so do its moments;
- ``fedsa_lora``: the shared A only (each client's B is its own, never aggregated).

Refused (``check_server_optimizer`` raises naming the method and ``server.optimizer``): the
methods whose round update is the product ``sum_i p_i B_i A_i`` (or a function of it) rather than
a factor mean: fedmomentum, flora, fedex_lora, flexlora, frlora, fedsmooth_lora. A server
optimizer on their update ``D_t`` (a d_out x d_in matrix per module, of rank up to ``(n+1) r``)
is not a low-rank object: FedAdagrad/FedAdam/FedYogi's ``sqrt(v_t)`` is elementwise, so
``m_t / (sqrt(v_t) + tau)`` is a dense full-rank matrix and the state ``v_t`` is dense
d_out x d_in per module (as large as the backbone's adapted weights, twice with ``m_t``);
FedAvgM's momentum is linear in ``D_t`` but it is a geometric sum of every past round's update,
whose rank grows by up to ``(n+1) r`` each round and never shrinks (``beta^k`` never zeroes a
term), so holding it exactly costs unbounded rank, and truncating it would be another, inexact
algorithm. None of these is what a low-rank federated method is for, so fedlora refuses them
rather than silently densifying or truncating.

Skipped rounds (fewer accepted uploads than ``rounds.min_clients``) do not step. The state is
``{"<module>.<factor>.m": ..., "<module>.<factor>.v": ...}`` (no ``v`` for fedavgm), kept by the
engine beside the method state and checkpointed with it; it never goes to the clients.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Mapping, Protocol

import torch
from torch import Tensor

from fedlora.methods.base import GlobalState, Method, ModuleFactors, RoundResult

OPTIMIZERS = ("none", "fedavgm", "fedadagrad", "fedadam", "fedyogi")
ADAPTIVE = frozenset({"fedadagrad", "fedadam", "fedyogi"})


class ServerSettings(Protocol):
    """The ``server`` section of the experiment config (:class:`fedlora.engine.config.ServerConfig`,
    where each key is documented), in Reddi et al. 2021's symbols."""

    optimizer: str
    lr: float
    momentum: float
    beta1: float
    beta2: float
    tau: float


def check_server_optimizer(method: Method, settings: ServerSettings) -> None:
    """Raise ``ValueError`` naming the setting when ``settings`` does not combine with ``method``."""
    name = settings.optimizer
    if name == "none":
        return
    if name in ADAPTIVE and settings.tau <= 0:
        raise ValueError(f"server.tau={settings.tau} must be positive for server.optimizer={name} (sqrt(v) + tau)")
    if not method.averaged_factors(0):
        raise ValueError(
            f"server.optimizer={name} is not defined for method {method.name}: its round update is the product "
            "sum_i p_i B_i A_i (or a function of it), not a mean of factors, and a server optimizer on that "
            "d_out x d_in update is not low rank (fedadagrad/fedadam/fedyogi's elementwise sqrt(v) makes the step "
            "and the state dense per module; fedavgm's momentum sums every round's update, its rank growing "
            "without bound; truncating either would be a different, inexact algorithm). "
            f"Server optimizers combine with: {', '.join(factor_averaging_methods())}"
        )


def factor_averaging_methods() -> list[str]:
    """The registered methods (default settings) whose aggregate averages some factor."""
    from fedlora.methods.registry import available_methods, build_method

    return [n for n in available_methods() if build_method(n).averaged_factors(0)]


def step_factor(
    settings: ServerSettings, x: Tensor, target: Tensor, m: Tensor | None, v: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """One server step of one factor: ``(X_t, m_t, v_t)`` from the round-start ``x``, the method's
    aggregate ``target`` and the moments (``None`` before the first step). Computed in float32 or
    float64 (the wider of the inputs'); ``X_t`` in ``x``'s dtype."""
    dt = torch.float64 if torch.float64 in (x.dtype, target.dtype) else torch.float32
    x64, delta = x.to(dt), target.to(dt) - x.to(dt)
    name = settings.optimizer
    m = torch.zeros_like(delta) if m is None else m.to(dt)
    if name == "fedavgm":
        m = settings.momentum * m + delta
        return (x64 + settings.lr * m).to(x.dtype), m, None
    if name not in ADAPTIVE:
        raise ValueError(f"server.optimizer={name!r}: one of {', '.join(OPTIMIZERS)}")
    tau = settings.tau
    v = torch.full_like(delta, tau * tau) if v is None else v.to(dt)
    m = settings.beta1 * m + (1 - settings.beta1) * delta
    d2 = delta * delta
    if name == "fedadagrad":
        v = v + d2
    elif name == "fedyogi":
        v = v - (1 - settings.beta2) * d2 * torch.sign(v - d2)
    else:
        v = settings.beta2 * v + (1 - settings.beta2) * d2
    return (x64 + settings.lr * m / (v.sqrt() + tau)).to(x.dtype), m, v


def server_step(
    settings: ServerSettings,
    method: Method,
    start: GlobalState,
    result: RoundResult,
    opt_state: Mapping[str, Tensor],
) -> tuple[RoundResult, dict[str, Tensor]]:
    """The round's result with the server optimizer applied to the factors ``method`` averaged in
    round ``start.round`` (``start``: the round-start state), and the optimizer's next state.
    Pure: neither ``result`` nor ``opt_state`` is changed. ``none`` returns both as they are."""
    if settings.optimizer == "none":
        return result, dict(opt_state)
    check_server_optimizer(method, settings)
    which = method.averaged_factors(start.round)
    new_state = dict(opt_state)
    factors: dict[str, ModuleFactors] = {}
    for mod, f in result.state.factors.items():
        parts = {"A": f.A, "B": f.B}
        for name in sorted(which):
            target, x = parts[name], start.factors[mod].get(name)
            if target is None or x is None:
                raise ValueError(f"{method.name}: module {mod} has no factor {name} to step")
            key = f"{mod}.{name}"
            parts[name], m, v = step_factor(settings, x, target, opt_state.get(f"{key}.m"), opt_state.get(f"{key}.v"))
            new_state[f"{key}.m"] = m
            if v is not None:
                new_state[f"{key}.v"] = v
        factors[mod] = ModuleFactors(A=parts["A"], B=parts["B"])
    state = replace(result.state, factors=factors)
    return replace(result, state=state), new_state
