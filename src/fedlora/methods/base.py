"""The contract every federated LoRA method implements, and the data it exchanges.

A method sees dictionaries from module name to factors; it never touches an ``nn.Module`` or a
file. One round, as the runtime drives it::

    start  = method.client_start(state, ctx)            # what client ctx trains from
    ...runtime applies start.local_shift, loads start.factors, trains start.trainable...
    upload, memory = method.client_finish(state, ctx, start, trained)
    ...runtime validates uploads (fedlora.methods.validation)...
    result = method.aggregate(state, uploads)           # next state + backbone delta + bytes

Shapes follow ``nn.Linear.weight``: ``B`` is d_out x r, ``A`` is r x d_in and the module's
update is ``s B A`` with ``s = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Sequence

import torch
from torch import Tensor

from fedlora.lowrank import FactoredDelta, lora_scale

FACTOR_NAMES = ("A", "B")
AB = frozenset(FACTOR_NAMES)


@dataclass
class ModuleFactors:
    """The LoRA factors of one adapted module. A factor that is not present (not sent, not
    trained) is ``None``."""

    A: Tensor | None
    B: Tensor | None

    @property
    def rank(self) -> int:
        if self.A is not None:
            return int(self.A.shape[0])
        if self.B is not None:
            return int(self.B.shape[1])
        raise ValueError("module factors hold neither A nor B")

    def get(self, name: str) -> Tensor | None:
        return self.A if name == "A" else self.B

    def only(self, names: frozenset[str]) -> ModuleFactors:
        """A copy keeping only the named factors."""
        return ModuleFactors(self.A if "A" in names else None, self.B if "B" in names else None)

    def product(self) -> Tensor:
        if self.A is None or self.B is None:
            raise ValueError("product needs both factors")
        return self.B @ self.A

    def to(self, dtype: torch.dtype) -> ModuleFactors:
        return ModuleFactors(None if self.A is None else self.A.to(dtype), None if self.B is None else self.B.to(dtype))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.A, self.B) if t is not None)


Factors = dict[str, ModuleFactors]


@dataclass(frozen=True)
class LoRASpec:
    """Adapter hyper-parameters the math depends on: the global rank and the scale rule."""

    rank: int
    alpha: float
    use_rslora: bool = False

    def scale(self, rank: int | None = None) -> float:
        return lora_scale(self.alpha, self.rank if rank is None else rank, self.use_rslora)


@dataclass
class GlobalState:
    """The server's state at the start of round ``round`` (0-based).

    ``factors`` is the global LoRA (both factors of every module, rank ``spec.rank``).
    ``method_state`` holds whatever a method carries between rounds, as named tensors (so it
    checkpoints through safetensors).
    """

    round: int
    factors: Factors
    spec: LoRASpec
    method_state: dict[str, Tensor] = field(default_factory=dict)

    def shapes(self) -> dict[str, tuple[int, int]]:
        """``(d_out, d_in)`` of every module."""
        out = {}
        for name, f in self.factors.items():
            assert f.A is not None and f.B is not None, f"global factors of {name} are incomplete"
            out[name] = (int(f.B.shape[0]), int(f.A.shape[1]))
        return out


GradientFn = Callable[[Mapping[str, FactoredDelta]], dict[str, Tensor]]
"""``grad_fn(offsets)``: the mean loss gradient w.r.t. each adapted module's full weight,
evaluated at ``W + offsets[m]`` over the client's gradient batches (d_out x d_in each)."""


@dataclass
class ClientContext:
    """What the runtime knows about one client in one round."""

    client_id: str
    round: int
    rank: int
    num_rounds: int | None = None
    memory: dict[str, Tensor] = field(default_factory=dict)
    seed: int = 0
    grad_fn: GradientFn | None = None
    step_size: float = 0.0
    """``sum_k eta_k``: the sum of the learning rates of the client's local optimizer steps this
    round (SCAFFOLD's ``K eta_l``), known before training (0: the runtime did not say)."""


@dataclass
class ClientStart:
    """Where one client starts local training.

    - ``factors``: the LoRA the client trains from (both factors, rank ``ctx.rank``);
    - ``trainable``: which factors get gradients; the others stay bit-identical;
    - ``upload``: which factors the client sends back;
    - ``local_shift``: a client-only offset of the backbone for this round's training
      (``W_local = W + shift``), already scaled; the runtime removes it afterwards;
    - ``report``: numbers about this client's round worth logging with its training stats
      (``client_finish`` may add to it); the runtimes log the mean over clients;
    - ``correction``: per module, a drift correction ``d`` of some trained factors (``None``
      elsewhere): after each local optimizer step ``k`` the runtime moves the factor by
      ``-eta_k d`` (``eta_k``: that step's learning rate); SCAFFOLD's ``c - c_i``
      (:mod:`fedlora.methods.scaffold`).
    """

    factors: Factors
    trainable: frozenset[str] = AB
    upload: frozenset[str] = AB
    local_shift: dict[str, FactoredDelta] = field(default_factory=dict)
    report: dict[str, float] = field(default_factory=dict)
    correction: Factors = field(default_factory=dict)


@dataclass
class ClientUpload:
    """One client's reply: the factors it sent, its sample count and the sum of its local steps'
    learning rates (``ClientContext.step_size``; 0 where the runtime did not say)."""

    client_id: str
    factors: Factors
    num_examples: int
    step_size: float = 0.0

    def nbytes(self) -> int:
        return sum(f.nbytes() for f in self.factors.values())


@dataclass
class RoundResult:
    """What aggregation produced.

    - ``state``: the global state for round ``t + 1``;
    - ``backbone_delta``: per module, the factored update every copy of the backbone must add
      now (LoRA scale applied, ``nn.Linear`` orientation); empty for methods that never touch
      the backbone;
    - ``bytes_up``: bytes received from the clients this round;
    - ``bytes_down``: bytes the server sends to each client for the next round;
    - ``report``: per module, numbers worth logging (ranks kept, energies).
    """

    state: GlobalState
    backbone_delta: dict[str, FactoredDelta]
    bytes_up: int
    bytes_down: int
    report: dict[str, dict[str, float]] = field(default_factory=dict)


class Method(ABC):
    """Base class: holds validated settings; subclasses implement the formulas.

    Subclasses declare ``name``, a frozen ``Settings`` dataclass (field names are the paper's
    symbols where one exists; each field's ``metadata["help"]`` documents it) and override
    :meth:`aggregate`, plus the client hooks where they differ from "train and send both
    factors, starting from the global ones".
    """

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    heterogeneous_ranks: ClassVar[bool] = False
    ranks_above_global: ClassVar[bool] = False
    changes_backbone: ClassVar[bool] = False
    needs_gradient: ClassVar[bool] = False

    @dataclass(frozen=True)
    class Settings:
        pass

    def __init__(self, settings: Any | None = None, **overrides: Any) -> None:
        base = settings if settings is not None else self.Settings()
        self.settings = dataclasses.replace(base, **overrides) if overrides else base
        self.validate_settings()

    def validate_settings(self) -> None:
        """Raise ``ValueError`` naming a setting whose value is out of range."""

    # ---- client side -------------------------------------------------------------------
    def client_start(self, state: GlobalState, ctx: ClientContext) -> ClientStart:
        """Default: start from the global factors, train and send both."""
        return ClientStart(factors=clone_factors(state.factors))

    def client_finish(
        self, state: GlobalState, ctx: ClientContext, start: ClientStart, trained: Factors
    ) -> tuple[Factors, dict[str, Tensor]]:
        """Default: send the factors ``start.upload`` names; keep no memory."""
        return {m: f.only(start.upload) for m, f in trained.items()}, {}

    def uploaded_factors(self, state: GlobalState) -> frozenset[str]:
        """Which factors every upload in round ``state.round`` must carry."""
        return AB

    def averaged_factors(self, round_: int) -> frozenset[str]:
        """Which global factors round ``round_``'s aggregate sets to a weighted mean of the clients'
        trained factors (FedAvg on factor parameters, possibly after a per-client reparametrisation
        that keeps each client's product): the factors a server optimizer
        (:mod:`fedlora.methods.server_opt`) may step. Empty, the default: the next global state is
        not a factor average (product methods), and server optimizers are refused."""
        return frozenset()

    def sum_only(self, round_: int) -> bool:
        """Whether round ``round_``'s aggregate depends on the uploads only through their weighted
        mean ``sum_i p_i u_i`` (factor by factor), so that ``aggregate(state, [mean])`` equals
        ``aggregate(state, uploads)`` up to rounding: its server step can run on a sum (secure
        aggregation, docs/secure_aggregation.md) and client-level DP noises that one mean
        (fedlora/engine/privacy.py). False, the default: it combines individual uploads."""
        return False

    def personal_factors(self, state: GlobalState, memory: Mapping[str, Tensor]) -> Factors | None:
        """The LoRA a client whose kept memory is ``memory`` uses as its own model, for methods
        with client-local parts (FedSA-LoRA's B); ``None``: the client's model is the global one."""
        return None

    def client_factors(self, state: GlobalState, upload: ClientUpload) -> Factors | None:
        """Client ``upload``'s LoRA as the server can rebuild it: the factors it sent, completed by
        the global ones it trained against (FFA-LoRA's A, RoLoRA's frozen factor). Its own
        effective update is then ``s_i B_i A_i - s B^t A^t`` (``s_i`` the scale of its rank,
        ``B^t A^t`` the round's starting global LoRA); the momentum diagnostics
        (``engine/momentum.py``) compare a round's aggregate with the weighted mean of these.
        ``None`` where the upload does not determine it (a factor the client keeps: FedSA-LoRA's B)."""
        out = {}
        for m, g in state.factors.items():
            f = upload.factors.get(m)
            if f is None:
                return None
            B = g.B if f.B is None else f.B
            A = g.A if f.A is None else f.A
            if B is None or A is None or B.shape[1] != A.shape[0]:
                return None  # a missing factor of another rank: the upload does not say
            out[m] = ModuleFactors(A=A, B=B)
        return out

    def energy_split(self, report: Mapping[str, Mapping[str, float]]) -> dict[str, float] | None:
        """Where round's aggregate went, as shares of its energy (FedMomentum: kept in the LoRA,
        merged into the backbone, dropped), from :attr:`RoundResult.report`; ``None`` (the
        default) for methods without such a split."""
        return None

    @property
    def has_personal_models(self) -> bool:
        """Whether clients keep models of their own (the method overrides :meth:`personal_factors`)."""
        return type(self).personal_factors is not Method.personal_factors

    def needs_global(self, round_: int) -> bool:
        """Whether aggregating round ``round_`` needs the true round-start global factors (and
        cannot work from factors reconstructed out of the uploads)."""
        return False

    def seeded_factors(self, round_: int, shapes: Mapping[str, tuple[int, int]], spec: LoRASpec) -> Factors | None:
        """The global factors of round ``round_`` when the method draws them from its own seed
        (FLoRA's fresh LoRA), so every party can rebuild them without receiving them; ``None``
        otherwise. ``aggregate`` must produce them through this method (one source of the math);
        a runtime may leave them out of what it sends where they equal the state's."""
        return None

    # ---- server side -------------------------------------------------------------------
    @abstractmethod
    def aggregate(
        self, state: GlobalState, uploads: Sequence[ClientUpload], weights: Sequence[float] | None = None
    ) -> RoundResult:
        """Turn the round's uploads into the next global state."""

    def finalize(self, state: GlobalState) -> tuple[GlobalState, dict[str, FactoredDelta]]:
        """Flush anything kept back (e.g. residuals awaiting a merge) at the end of a run."""
        return state, {}


# ---- helpers shared by the method files ---------------------------------------------------
def aggregation_weights(uploads: Sequence[ClientUpload], weights: Sequence[float] | None = None) -> list[float]:
    """``p_i = n_i / sum_j n_j`` (sample counts), or the given weights normalised to sum 1."""
    raw = [float(w) for w in weights] if weights is not None else [float(u.num_examples) for u in uploads]
    if len(raw) != len(uploads):
        raise ValueError(f"{len(raw)} weights for {len(uploads)} uploads")
    if any(w < 0 or w != w for w in raw):
        raise ValueError(f"aggregation weights must be non-negative numbers, got {raw}")
    total = sum(raw)
    if total <= 0:
        raise ValueError("aggregation weights sum to zero (no examples?)")
    return [w / total for w in raw]


def clone_factors(factors: Mapping[str, ModuleFactors]) -> Factors:
    return {
        m: ModuleFactors(None if f.A is None else f.A.clone(), None if f.B is None else f.B.clone())
        for m, f in factors.items()
    }


def weighted_mean(tensors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """``sum_i p_i T_i``, accumulated in float32 or float64."""
    acc = tensors[0].to(torch.float64 if tensors[0].dtype == torch.float64 else torch.float32) * weights[0]
    for t, w in zip(tensors[1:], weights[1:]):
        acc = acc + t.to(acc.dtype) * w
    return acc


def factor_mean(uploads: Sequence[ClientUpload], module: str, which: str, weights: Sequence[float]) -> Tensor:
    """``sum_i p_i F_i`` of factor ``which`` of ``module`` over the uploads."""
    return weighted_mean([_required(u, module, which) for u in uploads], weights)


def _required(upload: ClientUpload, module: str, which: str) -> Tensor:
    t = upload.factors[module].get(which)
    if t is None:
        raise ValueError(f"client {upload.client_id}: module {module} has no factor {which}")
    return t


def compute_dtype_of(state: GlobalState) -> torch.dtype:
    """float64 if the global factors are float64, else float32."""
    any_f = next(iter(state.factors.values()))
    return torch.float64 if any_f.A is not None and any_f.A.dtype == torch.float64 else torch.float32


def factors_nbytes(factors: Mapping[str, ModuleFactors], names: frozenset[str] = AB) -> int:
    return sum(f.only(names).nbytes() for f in factors.values())


def deltas_nbytes(deltas: Mapping[str, FactoredDelta]) -> int:
    return sum(d.nbytes() for d in deltas.values())


def next_state(state: GlobalState, factors: Factors, method_state: dict[str, Tensor] | None = None) -> GlobalState:
    """The state of round ``t + 1`` with new global factors."""
    return GlobalState(
        round=state.round + 1,
        factors=factors,
        spec=state.spec,
        method_state=dict(state.method_state) if method_state is None else method_state,
    )


def stacked_products(
    uploads: Sequence[ClientUpload], module: str, weights: Sequence[float], scales: Sequence[float] | None = None
) -> tuple[Tensor, Tensor]:
    """``(P, Q)`` with ``P Q = sum_i p_i c_i B_i A_i`` (``c_i`` = per-client scale ratio, 1 by
    default), computed in float32/float64 and never densely. Fresh tensors in LAPACK's layout
    (:func:`~fedlora.lowrank.stack_products`): an SVD may overwrite them."""
    from fedlora.lowrank import stack_products

    coef = list(weights) if scales is None else [p * c for p, c in zip(weights, scales)]
    ups = [_required(u, module, "B") for u in uploads]
    downs = [_required(u, module, "A") for u in uploads]
    wide = any(t.dtype == torch.float64 for t in (*ups, *downs))
    return stack_products(ups, downs, coef, dtype=torch.float64 if wide else torch.float32)
