"""fedlora.privacy: ε from Opacus's accountants against published reference values, the inverse
(σ for a target ε), the JSON-able spend, the config checks, clipping that holds after rounding to
bf16/float32/float64, and Gaussian noise calibrated and reproducible from a seed."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import stats

from fedlora.privacy import (
    PrivacyLedger,
    PrivacySpend,
    check_budget,
    clip_to_norm,
    epsilon,
    gaussian_noise,
    global_norm,
    noise_multiplier_for,
    rdp_epsilon_floor,
    seeded_generator,
    validate,
)
from fedlora.privacy.accounting import _history_epsilon, _rdp_orders

try:  # Opacus is the optional `privacy` extra: the accounting tests need it, clipping/noise/validate do not
    import opacus  # noqa: F401

    HAVE_OPACUS = True
except ImportError:
    HAVE_OPACUS = False
needs_opacus = pytest.mark.skipif(not HAVE_OPACUS, reason="needs the privacy extra (opacus)")

pytestmark = pytest.mark.filterwarnings("ignore:Optimal order is the:UserWarning")

# --------------------------------------------------------------------------- accounting: references

# Opacus's own test suite, opacus/tests/accountants_test.py (pytorch/opacus @ 4d0ebc84, Sep 2025):
# test_rdp_accountant: sigma 1.5, q 0.04, steps int(90 / 0.04) = 2250, delta 1e-5 -> 7.32911117143 (places=7).
# test_prv_accountant: the same but steps int(90 // 0.04) = 2249 (floor division of floats: 0.04 is a
# hair above 1/25) -> 6.777395712150674 (places=7).
# test_get_noise_multiplier_rdp_steps: epsilon 8, delta 1e-5, q 0.04, 2000 steps -> 1.3562 (places=4);
# test_get_noise_multiplier_rdp_epochs: 90 epochs = int(90 / 0.04) = 2250 steps -> 1.416 (places=4).


@needs_opacus
def test_rdp_epsilon_matches_opacus_reference() -> None:
    assert epsilon(1.5, 0.04, 2250, 1e-5, "rdp") == pytest.approx(7.32911117143, abs=5e-8)
    assert epsilon(1.5, 0.04, 2250, 1e-5) == epsilon(1.5, 0.04, 2250, 1e-5, "rdp")  # rdp is the default


@needs_opacus
def test_prv_epsilon_matches_opacus_reference() -> None:
    assert epsilon(1.5, 0.04, 2249, 1e-5, "prv") == pytest.approx(6.777395712150674, abs=5e-8)


# opacus/tests/prv_accountant.py (same commit): epsilon at delta 1e-6 "computed from
# https://github.com/microsoft/prv_accountant" (Gopi et al.'s own implementation), checked there to
# places=4; keys (sigma, q, steps). A subset that runs in ~3 s (the table's q = 0.05 rows at 20,000
# and 50,000 steps take 5-25 s each).
MSR_PRV = {
    (0.8, 0.001, 100): 0.270403364058018680360362395731,
    (1.5, 0.001, 100): 0.0393694193095203287535710501288,
    (3.0, 0.001, 100): 0.0215200934390882663016508757892,
    (0.8, 0.05, 100): 6.74105193941409996938318727189,
    (2.0, 0.05, 100): 1.28363737962406521120328761754,
    (0.8, 0.2, 100): 24.3336641779225644199868838768,
    (3.0, 0.2, 100): 3.38122051022184422208738396876,
    (2.0, 0.001, 1000): 0.0712187825381152272985474382949,
    (1.5, 0.05, 1000): 6.20996924657726712126759593957,
    (3.0, 0.05, 1000): 2.52757432605973830774814814504,
    (2.0, 0.001, 20000): 0.305837939762453436820521801565,
    (1.5, 0.001, 50000): 0.704218384555810095193351116905,
}


@needs_opacus
@pytest.mark.parametrize(("sigma", "q", "steps"), list(MSR_PRV))
def test_prv_epsilon_matches_microsoft_prv_accountant(sigma: float, q: float, steps: int) -> None:
    assert epsilon(sigma, q, steps, 1e-6, "prv") == pytest.approx(MSR_PRV[sigma, q, steps], abs=5e-5)


@needs_opacus
def test_abadi_2016_example_within_known_bounds() -> None:
    """Abadi et al. 2016, Sec. 3.1: q = 0.01, sigma = 4, delta = 1e-5, T = 10,000 steps give eps ~ 1.26
    by the moments accountant (9.34 by strong composition). RDP over a finer grid of orders with
    Balle et al.'s conversion must not be looser than the moments accountant, and PRV (near-exact)
    not looser than RDP."""
    rdp = epsilon(4.0, 0.01, 10_000, 1e-5, "rdp")
    prv = epsilon(4.0, 0.01, 10_000, 1e-5, "prv")
    assert prv <= rdp <= 1.26 < 9.34
    assert rdp > 0.9  # and not absurdly tight: PRV's upper estimate is 0.957


@needs_opacus
@pytest.mark.parametrize(("sigma", "q", "steps", "delta"), [(1.5, 0.04, 2250, 1e-5), (4.0, 0.01, 10_000, 1e-5)])
def test_prv_and_rdp_agree_within_ten_percent(sigma: float, q: float, steps: int, delta: float) -> None:
    """PRV is tighter (RDP's conversion loses a few %); stated tolerance: RDP within 10 % above PRV."""
    rdp, prv = epsilon(sigma, q, steps, delta, "rdp"), epsilon(sigma, q, steps, delta, "prv")
    assert prv <= rdp <= 1.10 * prv


@needs_opacus
def test_rdp_floor_and_where_prv_is_needed() -> None:
    """Opacus's RDP orders stop at 63, so RDP's epsilon has a floor whatever the noise; PRV has none."""
    from opacus.accountants import RDPAccountant

    assert _rdp_orders() == RDPAccountant.DEFAULT_ALPHAS  # the floor is computed for Opacus's own grid
    assert rdp_epsilon_floor(1e-5) == pytest.approx(0.10287, abs=1e-5)
    assert epsilon(1e6, 0.01, 10, 1e-5) == pytest.approx(rdp_epsilon_floor(1e-5), rel=1e-9)
    assert epsilon(1e6, 0.01, 10, 1e-5, "prv") < 0.01
    with pytest.raises(ValueError, match=r"privacy\.accountant=prv"):
        noise_multiplier_for(0.05, 1e-5, 0.01, 10, "rdp")
    sigma = noise_multiplier_for(0.05, 1e-5, 0.01, 10, "prv")
    assert 0.05 * 0.99 <= epsilon(sigma, 0.01, 10, 1e-5, "prv") <= 0.05


@needs_opacus
def test_noise_multiplier_matches_opacus_reference() -> None:
    assert noise_multiplier_for(8.0, 1e-5, 0.04, 2000) == pytest.approx(1.3562, abs=5e-5)
    assert noise_multiplier_for(8.0, 1e-5, 0.04, 2250, "rdp") == pytest.approx(1.416, abs=5e-5)


@needs_opacus
@pytest.mark.parametrize(
    ("target", "delta", "q", "steps", "accountant"),
    [
        (8.0, 1e-5, 0.04, 2000, "rdp"),
        (1.0, 1e-5, 0.01, 1000, "rdp"),
        (0.3, 1e-6, 0.1, 50, "rdp"),  # small epsilon: the tolerance is 1 % of it, not Opacus's absolute 0.01
        (3.0, 1e-5, 1.0, 20, "rdp"),  # full participation (q = 1)
        (2.0, 1e-5, 0.1, 100, "prv"),
    ],
)
@needs_opacus
def test_noise_multiplier_for_inverts_epsilon(target: float, delta: float, q: float, steps: int, accountant: str):
    sigma = noise_multiplier_for(target, delta, q, steps, accountant)
    spent = epsilon(sigma, q, steps, delta, accountant)
    assert target - min(0.01, 0.01 * target) <= spent <= target
    assert epsilon(sigma * 0.97, q, steps, delta, accountant) > target  # and sigma is not much larger than needed


@needs_opacus
def test_noise_multiplier_for_edge_cases() -> None:
    assert noise_multiplier_for(math.inf, 1e-5, 0.01, 100) == 0.0  # epsilon = inf: no noise
    assert noise_multiplier_for(1.0, 1e-5, 0.01, 0) == 0.0  # no step, nothing to protect
    with pytest.raises(ValueError, match=r"privacy\.epsilon=0\.0001 .*below.*privacy\.accountant=prv"):
        noise_multiplier_for(1e-4, 1e-5, 1.0, 100_000)  # under RDP's floor: refused at once, without a search
    for bad in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match=r"privacy\.epsilon"):
            noise_multiplier_for(bad, 1e-5, 0.01, 100)
    with pytest.raises(ValueError, match=r"privacy\.accountant"):
        noise_multiplier_for(1.0, 1e-5, 0.01, 100, "gdp")


@needs_opacus
def test_epsilon_edge_cases() -> None:
    assert epsilon(1.0, 0.01, 0, 1e-5) == 0.0 and isinstance(epsilon(1.0, 0.01, 0, 1e-5), float)
    assert epsilon(1.0, 0.01, 0, 1e-5, "prv") == 0.0  # Opacus's PRV fails on an empty history
    assert epsilon(0.0, 0.01, 5, 1e-5) == math.inf == epsilon(0.0, 0.01, 5, 1e-5, "prv")
    # more steps, more noise, smaller q, larger delta: the monotonicities every accountant obeys
    assert epsilon(1.0, 0.01, 200, 1e-5) > epsilon(1.0, 0.01, 100, 1e-5)
    assert epsilon(2.0, 0.01, 100, 1e-5) < epsilon(1.0, 0.01, 100, 1e-5)
    assert epsilon(1.0, 0.005, 100, 1e-5) < epsilon(1.0, 0.01, 100, 1e-5)
    assert epsilon(1.0, 0.01, 100, 1e-3) < epsilon(1.0, 0.01, 100, 1e-5)
    bad_steps = [(-1.0, 0.01, 5), (math.nan, 0.01, 5), (math.inf, 0.01, 5), (1.0, 0.0, 5), (1.0, 1.5, 5)]
    bad_steps.append((1.0, 0.1, -1))
    for args in bad_steps:
        with pytest.raises(ValueError):
            epsilon(*args, delta=1e-5)
    for delta in (0.0, 1.0, math.nan):
        with pytest.raises(ValueError, match=r"privacy\.delta"):
            epsilon(1.0, 0.01, 5, delta)


@pytest.mark.skipif(HAVE_OPACUS, reason="checks the message given without the privacy extra")
def test_accounting_without_opacus_says_which_extra() -> None:
    with pytest.raises(ImportError, match=r"fedlora\[privacy\]"):
        epsilon(1.0, 0.1, 10, 1e-5)


def test_importing_fedlora_does_not_import_opacus() -> None:
    import subprocess

    code = (
        "import sys, fedlora; "
        "assert 'fedlora.privacy' not in sys.modules, 'fedlora imports fedlora.privacy'; "
        "import fedlora.privacy as p; p.clip_to_norm({'a': __import__('torch').ones(3)}, 1.0); "
        "p.PrivacySpend().record(1.0, 0.1); p.validate('client', 1.0, 1e-5, 1.0, None); "
        "assert 'opacus' not in sys.modules, 'opacus imported before any epsilon is computed'"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


# --------------------------------------------------------------------------- check_budget


@needs_opacus
def test_check_budget_accepts_the_inverse_and_names_the_keys_when_over() -> None:
    sigma = noise_multiplier_for(2.0, 1e-5, 0.1, 100)
    assert check_budget(2.0, 1e-5, sigma, 0.1, 100, "rdp") <= 2.0
    with pytest.raises(ValueError) as e:
        check_budget(2.0, 1e-5, sigma, 0.1, 200, "rdp")  # twice the rounds
    for key in ("privacy.epsilon", "privacy.noise_multiplier", "rounds.num_rounds"):
        assert key in str(e.value)
    with pytest.raises(ValueError, match=r"privacy\.noise_multiplier"):
        check_budget(2.0, 1e-5, 0.9 * sigma, 0.1, 100, "rdp")
    assert check_budget(math.inf, 1e-5, 0.0, 0.1, 100, "rdp") == math.inf  # epsilon = inf accepts no noise
    with pytest.raises(ValueError, match=r"privacy\.epsilon"):
        check_budget(math.nan, 1e-5, sigma, 0.1, 100, "rdp")


# --------------------------------------------------------------------------- PrivacySpend / PrivacyLedger


@needs_opacus
@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_spend_json_round_trip_gives_identical_epsilon(accountant: str) -> None:
    spend = PrivacySpend(accountant)
    spend.record(1.1, 1 / 30, 30)  # 0.03333333333333333: floats must survive JSON exactly
    spend.record(1.7, 0.05, 20)
    spend.record(1.7, 0.05)
    spend.record(2 / 3, 0.05, 10)
    restored = PrivacySpend.from_json(spend.to_json())
    assert restored == spend and restored.history == [[1.1, 1 / 30, 30], [1.7, 0.05, 21], [2 / 3, 0.05, 10]]
    assert restored.epsilon(1e-5) == spend.epsilon(1e-5)  # bit-identical: a resumed run reports the same epsilon
    # resuming and recording more equals never stopping
    spend.record(1.7, 0.05, 5)
    restored.record(1.7, 0.05, 5)
    assert restored.epsilon(1e-5) == spend.epsilon(1e-5)


@needs_opacus
def test_spend_composition_merges_like_opacus() -> None:
    from opacus.accountants import RDPAccountant

    a = PrivacySpend()
    a.record(1.2, 0.02, 30)
    a.record(1.2, 0.02, 70)
    b = PrivacySpend()
    b.record(1.2, 0.02, 100)
    assert a == b and a.steps == 100 and a.epsilon(1e-5) == b.epsilon(1e-5) == epsilon(1.2, 0.02, 100, 1e-5)
    # Opacus's accountant stepped one step at a time over a mixed sequence keeps the same history
    seq = [(1.0, 0.01)] * 5 + [(1.5, 0.01)] * 3 + [(1.0, 0.01)] * 2 + [(1.0, 0.02)] * 4
    acc, spend = RDPAccountant(), PrivacySpend()
    for s, q in seq:
        acc.step(noise_multiplier=s, sample_rate=q)
        spend.record(s, q)
    assert [list(e) for e in acc.history] == spend.history
    assert spend.epsilon(1e-5) == acc.get_epsilon(delta=1e-5)
    # heterogeneous steps compose: more than either part alone
    parts = [PrivacySpend(history=[[1.0, 0.01, 5]]), PrivacySpend(history=[[1.5, 0.01, 3]])]
    assert spend.epsilon(1e-5) > max(p.epsilon(1e-5) for p in parts)
    assert PrivacySpend().epsilon(1e-5) == 0.0
    with pytest.raises(ValueError, match=r"privacy\.accountant"):
        PrivacySpend("gdp")


@needs_opacus
def test_ledger_reports_the_largest_party_and_round_trips() -> None:
    ledger = PrivacyLedger("rdp")
    assert ledger.epsilon(1e-5) == 0.0
    for r in range(20):
        for client, q in (("c0", 0.01), ("c1", 0.02), ("c2", 0.01)):
            ledger.record(client, 1.3, q, 10 if r % 2 == 0 or client != "c2" else 0)
    eps = ledger.epsilons(1e-5)
    assert eps["c1"] == epsilon(1.3, 0.02, 200, 1e-5) and eps["c0"] == epsilon(1.3, 0.01, 200, 1e-5)
    assert eps["c2"] == epsilon(1.3, 0.01, 100, 1e-5)
    assert ledger.epsilon(1e-5) == eps["c1"] == max(eps.values())
    restored = PrivacyLedger.from_json(ledger.to_json())
    assert restored == ledger and restored.epsilons(1e-5) == eps
    with pytest.raises(ValueError, match="accountant"):
        PrivacyLedger("rdp", {"c0": PrivacySpend("prv")})


@needs_opacus
def test_history_epsilon_takes_opacus_tuples_too() -> None:
    assert _history_epsilon([(1.5, 0.04, 2250)], 1e-5, "rdp") == epsilon(1.5, 0.04, 2250, 1e-5)


# --------------------------------------------------------------------------- validate


@pytest.mark.parametrize(
    ("key", "value"),
    [("mode", "dp"), ("mode", "")]
    + [("epsilon", v) for v in (0.0, -1.0, math.nan, -math.inf, "1")]
    + [("delta", v) for v in (0.0, -1e-5, 1.0, 1.5, math.nan, math.inf)]
    + [("clip", v) for v in (0.0, -1.0, math.nan, math.inf)]
    + [("noise_multiplier", v) for v in (-0.1, math.nan, math.inf, True)],
)
@pytest.mark.parametrize("mode", ["client", "none"])
def test_validate_rejects_each_bad_value_naming_its_key(mode: str, key: str, value: object) -> None:
    cfg: dict[str, object] = {"mode": mode, "epsilon": 3.0, "delta": 1e-5, "clip": 1.0, "noise_multiplier": 1.1}
    cfg[key] = value
    with pytest.raises(ValueError, match=rf"privacy\.{key}="):
        validate(**cfg)  # type: ignore[arg-type]


def test_validate_messages_and_what_it_accepts() -> None:
    with pytest.raises(ValueError) as e:
        validate("client", 1.0, 1.5, 1.0, None)
    assert str(e.value) == "privacy.delta=1.5 must be in (0, 1)"
    with pytest.raises(ValueError, match=r"privacy\.epsilon or privacy\.noise_multiplier"):
        validate("sample", None, 1e-5, 1.0, None)
    with pytest.raises(ValueError, match=r"privacy\.delta must be given"):
        validate("client", 1.0, None, 1.0, None)
    with pytest.raises(ValueError, match=r"privacy\.clip must be given"):
        validate("client", 1.0, 1e-5, None, None)
    validate("none", None, None, None, None)
    validate("client", math.inf, 1e-5, 1.0, None)  # epsilon = inf: no noise
    validate("client", None, 1e-5, 1.0, 0.0)  # clipping only
    validate("sample", 8, 1e-5, 0.5, 1.2)  # both: check_budget compares them


# --------------------------------------------------------------------------- clipping

DTYPES = [torch.float64, torch.float32, torch.bfloat16]
ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8}


def _reference_norm(tensors: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((t.double() ** 2).sum()) for t in tensors.values()))


def _check_clip(tensors: dict[str, torch.Tensor], bound: float) -> None:
    before = {k: t.clone() for k, t in tensors.items()}
    out, norm, factor = clip_to_norm(tensors, bound)
    assert all(torch.equal(tensors[k], before[k]) for k in tensors)  # inputs untouched
    assert list(out) == list(tensors)
    assert all(out[k].dtype == t.dtype and out[k].shape == t.shape for k, t in tensors.items())
    assert all(out[k].data_ptr() != t.data_ptr() for k, t in tensors.items() if t.numel())
    assert norm == pytest.approx(_reference_norm(tensors), rel=1e-12)
    clipped = global_norm(out)
    assert clipped <= bound
    assert _reference_norm(out) <= bound * (1 + 1e-12)
    if norm <= bound:
        assert factor == 1.0 and all(torch.equal(out[k], t) for k, t in tensors.items())
    else:
        r = max([ROUNDOFF[t.dtype] for t in tensors.values()] + [2.0**-50])  # 2^-50: the float64 margin
        assert factor < bound / norm
        assert clipped >= bound * (1 - 4 * r)  # clipped to the bound, not far below it


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [1e-3, 0.5, 1.0, 3.0, 1e4])
def test_clip_bound_holds_for_many_random_inputs(dtype: torch.dtype, scale: float) -> None:
    g = torch.Generator().manual_seed(1234)
    for i in range(60):
        tensors = {
            "a.lora_A": (torch.randn(8, 5, generator=g, dtype=torch.float64) * scale).to(dtype),
            "a.lora_B": (torch.randn(5, 8, generator=g, dtype=torch.float64) * scale).to(dtype),
            "b": (torch.rand(3, generator=g, dtype=torch.float64) * scale).to(dtype),
        }
        _check_clip(tensors, bound=[0.1, 1.0, 7.3][i % 3])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    dtypes=st.lists(st.sampled_from(DTYPES), min_size=1, max_size=4),
    sizes=st.lists(st.integers(0, 40), min_size=4, max_size=4),
    log_scale=st.floats(-6, 6),
    log_bound=st.floats(-4, 4),
    seed=st.integers(0, 2**31),
)
def test_clip_bound_holds_hypothesis(dtypes, sizes, log_scale: float, log_bound: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    tensors = {
        f"t{i}": (torch.randn(n, generator=g, dtype=torch.float64) * 10.0**log_scale).to(dt)
        for i, (dt, n) in enumerate(zip(dtypes, sizes))
    }
    _check_clip(tensors, 10.0**log_bound)


def test_clip_without_the_rounding_margin_would_break_the_bound_in_bf16() -> None:
    """Why the factor has a margin: scaling bf16 updates by exactly bound / norm lands above the bound
    about half the time (rounding to nearest), while clip_to_norm never does."""
    g = torch.Generator().manual_seed(0)
    naive_over = 0
    for _ in range(300):
        t = {"w": (torch.randn(64, generator=g) * 5).to(torch.bfloat16)}
        naive = {"w": (t["w"].double() / global_norm(t)).to(torch.bfloat16)}
        naive_over += global_norm(naive) > 1.0
        assert global_norm(clip_to_norm(t, 1.0)[0]) <= 1.0
    assert naive_over > 50


def test_clip_special_inputs() -> None:
    zeros = {"a": torch.zeros(4, 4, dtype=torch.bfloat16), "b": torch.zeros(0)}
    out, norm, factor = clip_to_norm(zeros, 1.0)
    assert norm == 0.0 and factor == 1.0 and all(torch.equal(out[k], zeros[k]) for k in zeros)
    assert clip_to_norm({}, 1.0) == ({}, 0.0, 1.0)
    assert global_norm({}) == 0.0
    on_bound = {"a": torch.tensor([3.0, 4.0])}  # norm exactly 5: unchanged
    out, norm, factor = clip_to_norm(on_bound, 5.0)
    assert norm == 5.0 and factor == 1.0 and torch.equal(out["a"], on_bound["a"])
    for bad in ({"a": torch.tensor([1.0, math.nan])}, {"a": torch.tensor([math.inf, 0.0])}):
        with pytest.raises(ValueError, match="norm"):
            clip_to_norm(bad, 1.0)
    for bound in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match=r"privacy\.clip"):
            clip_to_norm(on_bound, bound)
    # float64 entries whose squares overflow (or underflow) float64 still have a finite norm
    huge = {"a": torch.full((4,), 1e200, dtype=torch.float64)}
    assert global_norm(huge) == pytest.approx(2e200, rel=1e-15)
    assert global_norm(clip_to_norm(huge, 1.0)[0]) <= 1.0
    assert global_norm({"a": torch.full((4,), 1e-200, dtype=torch.float64)}) == pytest.approx(2e-200, rel=1e-15)


def test_global_norm_accumulates_bf16_in_float64() -> None:
    ones = {"a": torch.ones(2**20, dtype=torch.bfloat16), "b": torch.ones(3, dtype=torch.bfloat16)}
    assert global_norm(ones) == math.sqrt(2**20 + 3)  # bf16 accumulation would give 1024
    g = torch.Generator().manual_seed(5)
    mixed = {"x": torch.randn(1000, generator=g).to(torch.bfloat16), "y": torch.randn(7, 3, generator=g)}
    assert global_norm(mixed) == pytest.approx(_reference_norm(mixed), rel=1e-13)


# --------------------------------------------------------------------------- noise


def _normal_pvalues(x, std: float) -> tuple[float, float]:
    """Kolmogorov-Smirnov p-value of ``x`` against N(0, std^2), and the two-sided p-value of its
    variance ((n - 1) s^2 / std^2 ~ chi2(n - 1))."""
    n = x.size
    chi2 = (n - 1) * x.var(ddof=1) / std**2
    return float(stats.kstest(x, "norm", args=(0.0, std)).pvalue), float(
        2 * min(stats.chi2.cdf(chi2, n - 1), stats.chi2.sf(chi2, n - 1))
    )


def test_noise_std_matches_calibration() -> None:
    std = 0.37
    like = {"b": torch.zeros(120_000, dtype=torch.float64), "a": torch.zeros(400, 200, dtype=torch.float64)}
    z = gaussian_noise(like, std, seeded_generator(20240519, "client-dp", 3))
    x = torch.cat([z["a"].flatten(), z["b"]]).numpy()
    assert x.size == 200_000
    p_ks, p_var = _normal_pvalues(x, std)
    assert p_ks > 0.01 and p_var > 0.01
    assert abs(x.std(ddof=1) / std - 1) < 0.01
    assert abs(x.mean()) < 5 * std / math.sqrt(x.size)
    # the same tests reject a miscalibrated std (they can fail): 2 % off fails the variance test, 5 % both
    assert _normal_pvalues(x, std * 1.02)[1] < 1e-10
    assert max(_normal_pvalues(x, std * 1.05)) < 1e-10


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_noise_in_low_precision_keeps_its_std(dtype: torch.dtype) -> None:
    z = gaussian_noise({"w": torch.zeros(200_000, dtype=dtype)}, 2.5, seeded_generator(7, "noise", dtype.itemsize))
    assert z["w"].dtype == dtype
    assert abs(float(z["w"].double().std()) / 2.5 - 1) < 0.01


def test_noise_is_reproducible_and_independent_of_key_order_and_labels() -> None:
    like = {"b": torch.zeros(50, dtype=torch.bfloat16), "a": torch.zeros(3, 4)}
    z1 = gaussian_noise(like, 1.0, seeded_generator(1, "client-dp", 5))
    z2 = gaussian_noise(dict(reversed(list(like.items()))), 1.0, seeded_generator(1, "client-dp", 5))
    assert list(z1) == ["b", "a"] and list(z2) == ["a", "b"]
    assert all(torch.equal(z1[k], z2[k]) for k in like)  # bit-for-bit, whatever the insertion order
    assert z1["a"].dtype == torch.float32 and z1["b"].dtype == torch.bfloat16 and z1["a"].shape == (3, 4)
    others = [(1, "client-dp", 6), (2, "client-dp", 5), (1, "sample-dp", 5), (1, "client-dp", "5"), (1, "client-dp")]
    for other in others:
        z3 = gaussian_noise(like, 1.0, seeded_generator(*other))
        assert not torch.equal(z1["a"], z3["a"])
    # std = 0: zeros, and the generator advances as for any std (later draws do not depend on it)
    g0, g1 = seeded_generator(3, "x"), seeded_generator(3, "x")
    zero = gaussian_noise(like, 0.0, g0)
    gaussian_noise(like, 1.0, g1)
    assert all(not t.any() for t in zero.values())
    assert torch.equal(g0.get_state(), g1.get_state())


def test_noise_and_generator_argument_checks() -> None:
    g = seeded_generator(0)
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="std"):
            gaussian_noise({"a": torch.zeros(2)}, bad, g)
    with pytest.raises(TypeError):
        seeded_generator(1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        seeded_generator(1, 2.0)  # type: ignore[arg-type]
    assert gaussian_noise({}, 1.0, g) == {}
    assert torch.equal(seeded_generator(9, "a", 1).get_state(), seeded_generator(9, "a", 1).get_state())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_noise_on_cuda_equals_noise_on_cpu() -> None:
    like_cpu = {"a": torch.zeros(1000, dtype=torch.float32)}
    like_gpu = {"a": torch.zeros(1000, dtype=torch.float32, device="cuda")}
    zc = gaussian_noise(like_cpu, 1.0, seeded_generator(0, "dev"))
    zg = gaussian_noise(like_gpu, 1.0, seeded_generator(0, "dev"))
    assert zg["a"].device.type == "cuda" and torch.equal(zg["a"].cpu(), zc["a"])
