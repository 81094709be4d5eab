r"""Privacy accounting: the ε a run of subsampled Gaussian mechanisms spends, from Opacus's accountants.

Every DP step fedlora takes is one *Poisson-subsampled Gaussian mechanism*: each party (a client
for client-level DP, an example for sample-level DP) joins the step with probability ``q`` (the
sample rate), its contribution is clipped to L2 norm ``C``, and the sum gets Gaussian noise

    sum_i clip_C(u_i) + N(0, (sigma C)^2 I)          sigma = the noise multiplier

so each step is characterised by ``(sigma, q)`` alone, and a run by its history
``[[sigma_1, q_1, steps_1], ...]``: exactly what Opacus's accountants keep in ``.history``
(consecutive steps with identical ``(sigma, q)`` merged into one entry). From a history and
``delta`` the accountant returns the ``epsilon`` of the composed mechanism's ``(epsilon,
delta)``-DP guarantee. No accountant is written here: :func:`epsilon` hands the history to
``opacus.accountants.RDPAccountant`` or ``PRVAccountant`` (Opacus 1.6; the ``privacy`` extra),
and :func:`noise_multiplier_for` to ``opacus.accountants.utils.get_noise_multiplier``.

Accountants (``privacy.accountant``):

* ``rdp`` (the default): Rényi DP of the subsampled Gaussian (Mironov 2017; Mironov, Talwar and
  Zhang 2019), composed additively over orders ``alpha`` in Opacus's default grid (1.1 .. 63),
  converted to ``(epsilon, delta)`` by Balle et al. 2020, Thm. 21. An upper bound, cheap
  (milliseconds for any number of steps), and the accountant most papers report, so numbers
  compare across papers. It is the default for those reasons. It is looser where ε is small:
  with Opacus's orders (up to 63) it cannot report ε below :func:`rdp_epsilon_floor` (0.103 at
  δ = 1e-5) whatever the noise, and at σ = 0.8, q = 0.001, 100 steps, δ = 1e-6 it says 1.37
  where PRV says 0.27. Use ``prv`` for budgets below ~0.5.
* ``prv``: numerical composition of privacy loss random variables (Gopi, Lee and Wutschitz 2021)
  with Opacus's ``eps_error=0.01``; Opacus returns the *upper* end of its error interval, so it
  is still a guarantee. Tighter than ``rdp`` (typically 5-10 % smaller ε in the regimes the tests
  pin) but slower: 0.1 s to tens of seconds per evaluation, growing with the steps and the
  sample rate (50,000 steps at q = 0.05: ~20 s on one CPU core).
* Opacus's ``gdp`` is not offered: it is a central-limit approximation (Dong, Roth and Su 2019),
  not an upper bound on ε for finite runs.

Choices where the sources are silent:

* ``epsilon = inf`` means *no noise*: :func:`noise_multiplier_for` returns ``0.0`` for it, and a
  history with a zero noise multiplier spends ``inf`` (clipping without noise gives no
  guarantee). It is how a run says "clip only" (an ablation), not a DP run.
* An empty history (no DP step yet) spends ``0.0`` with either accountant (Opacus's RDP returns
  the integer ``0``, its PRV fails on an empty history).
* ``noise_multiplier_for``'s search stops within ``min(0.01, 0.01 epsilon)`` below the target
  (Opacus's tolerance is an absolute 0.01, i.e. 10 % at ε = 0.1); the σ it returns always
  satisfies ``epsilon(sigma) <= target``.

References: Abadi et al. 2016, "Deep Learning with Differential Privacy" (DP-SGD, the moments
accountant); Mironov 2017, "Rényi Differential Privacy"; Mironov, Talwar, Zhang 2019, "Rényi
Differential Privacy of the Sampled Gaussian Mechanism"; Balle et al. 2020, "Hypothesis Testing
Interpretations and Rényi Differential Privacy"; Gopi, Lee, Wutschitz 2021, "Numerical
Composition of Differential Privacy"; McMahan et al. 2018, "Learning Differentially Private
Recurrent Language Models" (DP-FedAvg: client-level DP, one mechanism per round).
"""

from __future__ import annotations

import json
import math
from typing import Any, Iterable, Mapping

ACCOUNTANTS = ("rdp", "prv")
MODES = ("none", "client", "sample")
PRV_EPS_ERROR = 0.01  # Opacus's default: the width of PRV's error interval on ε (its upper end is returned)

History = list[list[float | int]]  # [[noise_multiplier, sample_rate, steps], ...]


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"privacy.accountant={accountant!r} must be one of {list(ACCOUNTANTS)}")


def _check_delta(delta: float) -> None:
    if not (isinstance(delta, (int, float)) and 0.0 < delta < 1.0):
        raise ValueError(f"privacy.delta={delta!r} must be in (0, 1)")


def _check_step(noise_multiplier: float, sample_rate: float, steps: int) -> None:
    if not (isinstance(noise_multiplier, (int, float)) and math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"privacy.noise_multiplier={noise_multiplier!r} must be finite and >= 0")
    if not (isinstance(sample_rate, (int, float)) and 0.0 < sample_rate <= 1.0):
        raise ValueError(f"sample rate {sample_rate!r} must be in (0, 1]")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps={steps!r} must be an integer >= 0")


def _require_opacus() -> None:
    try:
        import opacus  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "privacy accounting needs Opacus: pip install 'fedlora[privacy]' (opacus>=1.6,<1.7)"
        ) from e


def _history_epsilon(history: Iterable[Iterable[float | int]], delta: float, accountant: str) -> float:
    """ε of a history (entries ``(sigma, q, steps)``) at ``delta``, by Opacus's ``accountant``."""
    _check_accountant(accountant)
    _check_delta(delta)
    entries = [(float(s), float(q), int(n)) for s, q, n in history]
    for s, q, n in entries:
        _check_step(s, q, n)
    entries = [e for e in entries if e[2] > 0]
    if not entries:
        return 0.0
    if any(s == 0.0 for s, _, _ in entries):
        return math.inf  # no noise, no guarantee (Opacus's RDP says inf too; its PRV fails)
    _require_opacus()  # the `privacy` extra: imported on use only
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=accountant)
    acc.history = entries
    if accountant == "prv":
        return float(acc.get_epsilon(delta=delta, eps_error=PRV_EPS_ERROR))
    return float(acc.get_epsilon(delta=delta))


def rdp_epsilon_floor(delta: float) -> float:
    """The smallest ε Opacus's RDP accountant can report at ``delta``, however large the noise.

    With RDP -> 0 at every order, Balle et al.'s conversion leaves
    ``min_alpha [log(1/delta) - log(alpha)] / (alpha - 1) + log((alpha - 1) / alpha)``, attained
    at Opacus's largest order ``alpha = 63``: 0.103 at delta = 1e-5, 0.140 at 1e-6.
    """
    _check_delta(delta)
    return min(
        (math.log(1 / delta) - math.log(a)) / (a - 1) + math.log((a - 1) / a) for a in _rdp_orders()
    )


def _rdp_orders() -> list[float]:
    """Opacus's ``RDPAccountant.DEFAULT_ALPHAS`` (1.1 .. 10.9, 12 .. 63), without importing Opacus."""
    return [1 + x / 10.0 for x in range(1, 100)] + [float(a) for a in range(12, 64)]


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp") -> float:
    """ε spent by ``steps`` subsampled Gaussian steps (noise multiplier σ, sample rate q) at ``delta``."""
    _check_step(noise_multiplier, sample_rate, steps)
    return _history_epsilon([(noise_multiplier, sample_rate, steps)], delta, accountant)


def noise_multiplier_for(
    epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    epsilon_tolerance: float | None = None,
) -> float:
    """The noise multiplier σ whose ``steps`` steps at ``sample_rate`` spend at most ``epsilon``.

    Opacus's bisection (``get_noise_multiplier``): the σ returned spends ε in
    ``[epsilon - epsilon_tolerance, epsilon]`` (default tolerance ``min(0.01, 0.01 epsilon)``).
    ``epsilon = inf`` (no DP) and ``steps = 0`` (nothing to protect) return ``0.0``. A budget
    Opacus cannot meet with σ <= 1e6 raises ``ValueError`` naming the keys to change.
    """
    _check_accountant(accountant)
    _check_delta(delta)
    _check_step(0.0, sample_rate, steps)
    if not (isinstance(epsilon, (int, float)) and epsilon > 0):  # NaN fails `> 0`
        raise ValueError(f"privacy.epsilon={epsilon!r} must be > 0")
    if math.isinf(epsilon) or steps == 0:
        return 0.0
    tol = min(0.01, 0.01 * epsilon) if epsilon_tolerance is None else epsilon_tolerance
    if not (math.isfinite(tol) and 0 < tol < epsilon):
        raise ValueError(f"epsilon_tolerance={epsilon_tolerance!r} must be in (0, privacy.epsilon)")
    if accountant == "rdp" and epsilon <= rdp_epsilon_floor(delta):  # unreachable: say so now, not after a search
        raise ValueError(
            f"privacy.epsilon={epsilon} at privacy.delta={delta} is below what the rdp accountant can state "
            f"({rdp_epsilon_floor(delta):.3g}, whatever the noise: its orders stop at 63): raise privacy.epsilon "
            "or use privacy.accountant=prv"
        )
    _require_opacus()
    from opacus.accountants.utils import get_noise_multiplier

    kwargs: dict[str, Any] = {"eps_error": PRV_EPS_ERROR} if accountant == "prv" else {}
    try:
        sigma = get_noise_multiplier(
            target_epsilon=float(epsilon),
            target_delta=float(delta),
            sample_rate=float(sample_rate),
            steps=int(steps),
            accountant=accountant,
            epsilon_tolerance=tol,
            **kwargs,
        )
    except ValueError as e:  # "The privacy budget is too low." (σ would exceed 1e6)
        floor = ""
        if accountant == "rdp" and epsilon < rdp_epsilon_floor(delta) * 1.5:
            floor = (
                f"; the rdp accountant cannot state epsilon below {rdp_epsilon_floor(delta):.3g} at this delta "
                "whatever the noise (its orders stop at 63): privacy.accountant=prv can"
            )
        raise ValueError(
            f"privacy.epsilon={epsilon} at privacy.delta={delta} cannot be met over {steps} steps at sample rate "
            f"{sample_rate}: it would need a noise multiplier above 1e6 ({e}); raise privacy.epsilon or lower "
            f"rounds.num_rounds{floor}"
        ) from e
    return float(sigma)


def check_budget(
    epsilon_target: float,
    delta: float,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
) -> float:
    """The ε the configured run spends; ``ValueError`` if that exceeds ``epsilon_target``.

    Called before a run starts (``steps`` = the run's planned DP steps, e.g. ``rounds.num_rounds``
    for client-level DP), so a run never discovers at its end that it broke its stated budget.
    ``epsilon_target = inf`` accepts any spend.
    """
    if not (isinstance(epsilon_target, (int, float)) and epsilon_target > 0):
        raise ValueError(f"privacy.epsilon={epsilon_target!r} must be > 0")
    spent = epsilon(noise_multiplier, sample_rate, steps, delta, accountant)
    if spent > epsilon_target:
        raise ValueError(
            f"the configured run spends epsilon={spent:.4g} (accountant {accountant!r}, privacy.delta={delta}, "
            f"{steps} steps at sample rate {sample_rate}), above privacy.epsilon={epsilon_target}: raise "
            f"privacy.noise_multiplier (now {noise_multiplier}), lower rounds.num_rounds, or raise privacy.epsilon"
        )
    return spent


def validate(
    mode: str,
    epsilon: float | None,
    delta: float | None,
    clip: float | None,
    noise_multiplier: float | None,
) -> None:
    """Check a privacy config; ``ValueError`` naming the offending key (``privacy.<key>=<value> ...``).

    Every value given (not ``None``) is checked whatever the mode: ``epsilon`` in ``(0, inf]``
    (``inf``: no noise, see the module docstring), ``delta`` in ``(0, 1)``, ``clip`` finite and
    ``> 0``, ``noise_multiplier`` finite and ``>= 0`` (``0``: clipping only). With ``mode`` other
    than ``none``, ``delta`` and ``clip`` are required, and so is one of ``epsilon`` and
    ``noise_multiplier`` (both: the noise multiplier is used and :func:`check_budget` checks it
    against ``epsilon``).
    """

    def number(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    if mode not in MODES:
        raise ValueError(f"privacy.mode={mode!r} must be one of {list(MODES)}")
    if epsilon is not None and not (number(epsilon) and epsilon > 0):  # NaN fails `> 0`
        raise ValueError(f"privacy.epsilon={epsilon!r} must be > 0 (inf: no noise)")
    if delta is not None and not (number(delta) and 0 < delta < 1):
        raise ValueError(f"privacy.delta={delta!r} must be in (0, 1)")
    if clip is not None and not (number(clip) and math.isfinite(clip) and clip > 0):
        raise ValueError(f"privacy.clip={clip!r} must be finite and > 0")
    if noise_multiplier is not None and not (
        number(noise_multiplier) and math.isfinite(noise_multiplier) and noise_multiplier >= 0
    ):
        raise ValueError(f"privacy.noise_multiplier={noise_multiplier!r} must be finite and >= 0")
    if mode == "none":
        return
    if delta is None:
        raise ValueError(f"privacy.delta must be given when privacy.mode={mode!r}")
    if clip is None:
        raise ValueError(f"privacy.clip must be given when privacy.mode={mode!r}")
    if epsilon is None and noise_multiplier is None:
        raise ValueError(f"privacy.epsilon or privacy.noise_multiplier must be given when privacy.mode={mode!r}")


class PrivacySpend:
    """One party's spend: its mechanism history as plain JSON data, and the accountant that reads it.

    ``history`` is Opacus's: ``[[noise_multiplier, sample_rate, steps], ...]``, consecutive
    records with equal ``(noise_multiplier, sample_rate)`` merged (as Opacus's ``step`` does), so
    ``record(s, q, 3); record(s, q, 2)`` equals ``record(s, q, 5)``. :meth:`to_json` /
    :meth:`from_json` round-trip it exactly (floats are written as their shortest repr), so a
    resumed run reports the ε it would have reported without the interruption.
    """

    def __init__(self, accountant: str = "rdp", history: Iterable[Iterable[float | int]] = ()) -> None:
        _check_accountant(accountant)
        self.accountant = accountant
        self.history: History = []
        for s, q, n in history:
            self.record(s, q, n)

    def record(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Add ``steps`` steps of the subsampled Gaussian mechanism ``(noise_multiplier, sample_rate)``."""
        _check_step(noise_multiplier, sample_rate, steps)
        if steps == 0:
            return
        s, q = float(noise_multiplier), float(sample_rate)
        if self.history and self.history[-1][0] == s and self.history[-1][1] == q:
            self.history[-1][2] += steps
        else:
            self.history.append([s, q, int(steps)])

    @property
    def steps(self) -> int:
        """The number of steps recorded."""
        return sum(int(n) for _, _, n in self.history)

    def epsilon(self, delta: float) -> float:
        """ε spent so far at ``delta`` (``0.0`` before any step; ``inf`` if a step had no noise)."""
        return _history_epsilon(self.history, delta, self.accountant)

    def to_dict(self) -> dict[str, Any]:
        return {"accountant": self.accountant, "history": [list(e) for e in self.history]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PrivacySpend:
        return cls(d["accountant"], d["history"])

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, s: str) -> PrivacySpend:
        return cls.from_dict(json.loads(s))

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, PrivacySpend)
            and self.accountant == other.accountant
            and self.history == other.history
        )

    def __repr__(self) -> str:
        return f"PrivacySpend({self.accountant!r}, {self.history!r})"


class PrivacyLedger:
    """Independent parties' spends (e.g. one per client under sample-level DP); the run's ε is the largest.

    Parties are disjoint (a client's examples are only its own), so their guarantees do not
    compose: each example is protected by its own client's ``(epsilon_i, delta)`` and the run
    states ``max_i epsilon_i``. Parties with equal histories are evaluated once.
    """

    def __init__(self, accountant: str = "rdp", parties: Mapping[str, PrivacySpend] | None = None) -> None:
        _check_accountant(accountant)
        self.accountant = accountant
        self.parties: dict[str, PrivacySpend] = {}
        for name, spend in (parties or {}).items():
            if spend.accountant != accountant:
                raise ValueError(f"party {name!r} uses accountant {spend.accountant!r}, the ledger {accountant!r}")
            self.parties[name] = spend

    def record(self, party: str, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        self.parties.setdefault(party, PrivacySpend(self.accountant)).record(noise_multiplier, sample_rate, steps)

    def epsilons(self, delta: float) -> dict[str, float]:
        """Each party's ε at ``delta``."""
        cache: dict[str, float] = {}
        out: dict[str, float] = {}
        for name, spend in self.parties.items():
            key = json.dumps(spend.history)
            if key not in cache:
                cache[key] = spend.epsilon(delta)
            out[name] = cache[key]
        return out

    def epsilon(self, delta: float) -> float:
        """The largest party's ε at ``delta`` (``0.0`` with no party)."""
        return max(self.epsilons(delta).values(), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "accountant": self.accountant,
            "parties": {name: spend.to_dict()["history"] for name, spend in self.parties.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PrivacyLedger:
        acc = d["accountant"]
        return cls(acc, {name: PrivacySpend(acc, h) for name, h in d["parties"].items()})

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, s: str) -> PrivacyLedger:
        return cls.from_dict(json.loads(s))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PrivacyLedger) and self.to_dict() == other.to_dict()
