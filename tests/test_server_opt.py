"""Server optimizers (FedAvgM, FedAdagrad, FedAdam, FedYogi; Reddi et al. 2021) on the averaged
factors, against a scalar float64 reference written here from the paper's Algorithm 2."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from fedlora.methods import ClientUpload, ModuleFactors, available_methods, build_method
from fedlora.methods.base import AB, clone_factors
from fedlora.methods.server_opt import check_server_optimizer, factor_averaging_methods, server_step
from helpers import F64, assert_close, gen, make_state, module_shapes, randn

SHAPES = module_shapes(9, 5)
RANK = 3
AVERAGING = {"fedit": "AB", "ffa_lora": "B", "rolora": None, "fedsa_lora": "A", "fedrot_lora": "AB"}
PRODUCT = ["fedex_lora", "flexlora", "flora", "fedmomentum", "frlora", "fedsmooth_lora"]


def opt(name: str, **kw) -> SimpleNamespace:
    base = {"optimizer": name, "lr": 0.3, "momentum": 0.8, "beta1": 0.85, "beta2": 0.95, "tau": 0.05}
    return SimpleNamespace(**{**base, **kw})


def uploads_around(state, n: int, seed: int) -> list[ClientUpload]:
    """Clients that moved both factors of the state by random steps (unequal sample counts)."""
    g = gen(seed)
    out = []
    for i in range(n):
        factors = {
            m: ModuleFactors(A=f.A + 0.3 * randn(*f.A.shape, g=g), B=f.B + 0.3 * randn(*f.B.shape, g=g))
            for m, f in state.factors.items()
        }
        out.append(ClientUpload(f"c{i}", factors, num_examples=int(torch.randint(1, 50, (1,), generator=g))))
    return out


# ---- the reference: one element at a time, Python floats ------------------------------------------
def ref_step(name: str, s: SimpleNamespace, x: float, target: float, m: float, v: float) -> tuple[float, float, float]:
    d = target - x  # Delta_t = (1/|S|) sum_i Delta_i with Delta_i = x_i - x_{t-1}, weighted
    if name == "fedavgm":
        m = s.momentum * m + d
        return x + s.lr * m, m, v
    m = s.beta1 * m + (1.0 - s.beta1) * d
    if name == "fedadagrad":
        v = v + d * d
    elif name == "fedyogi":
        sign = (v - d * d > 0) - (v - d * d < 0)
        v = v - (1.0 - s.beta2) * d * d * sign
    else:
        v = s.beta2 * v + (1.0 - s.beta2) * d * d
    return x + s.lr * m / (math.sqrt(v) + s.tau), m, v


def ref_mean(uploads, module: str, which: str) -> list[list[float]]:
    total = sum(u.num_examples for u in uploads)
    rows = None
    for u in uploads:
        t = u.factors[module].get(which).tolist()
        w = u.num_examples / total
        rows = (
            [[w * e for e in r] for r in t]
            if rows is None
            else [[a + w * e for a, e in zip(ra, r)] for ra, r in zip(rows, t)]
        )
    return rows


@pytest.mark.parametrize("name", ["fedavgm", "fedadagrad", "fedadam", "fedyogi"])
@pytest.mark.parametrize("method_name", sorted(AVERAGING))
def test_rounds_match_the_scalar_reference(name, method_name):
    method = build_method(method_name)
    s = opt(name)
    state = make_state(SHAPES, RANK, seed=3)
    x = {(m, k): state.factors[m].get(k).tolist() for m in SHAPES for k in "AB"}
    mom = {key: [[0.0] * len(r) for r in rows] for key, rows in x.items()}
    vel = {key: [[s.tau**2] * len(r) for r in rows] for key, rows in x.items()}
    opt_state: dict = {}
    for t in range(4):
        uploads = uploads_around(state, 3, seed=100 + t)
        if method_name in ("ffa_lora", "rolora", "fedsa_lora"):  # what the method uploads
            sent = method.uploaded_factors(state)
            uploads = [
                ClientUpload(u.client_id, {m: f.only(sent) for m, f in u.factors.items()}, u.num_examples)
                for u in uploads
            ]
        before = {k: v.clone() for k, v in opt_state.items()}
        snap = clone_factors(state.factors)
        result = method.aggregate(state, uploads)
        given = opt_state
        stepped, opt_state = server_step(s, method, state, result, given)
        assert given.keys() == before.keys() and all(torch.equal(given[k], before[k]) for k in before)  # pure
        for m in SHAPES:  # the round-start state is untouched
            assert torch.equal(state.factors[m].A, snap[m].A) and torch.equal(state.factors[m].B, snap[m].B)
        active = method.averaged_factors(t)
        for m in SHAPES:
            for k in "AB":
                got = stepped.state.factors[m].get(k)
                if k not in active:  # as the method left it (frozen / local / inactive): bit for bit
                    assert torch.equal(got, result.state.factors[m].get(k)), (m, k, t)
                    continue
                if method_name == "fedrot_lora":  # the means of the rotated factors (test_method_fedrot_lora.py)
                    target = result.state.factors[m].get(k).tolist()
                else:
                    target = ref_mean(uploads, m, k)
                rows = x[(m, k)]
                for i, row in enumerate(rows):
                    for j, xij in enumerate(row):
                        rows[i][j], mom[(m, k)][i][j], vel[(m, k)][i][j] = ref_step(
                            name, s, xij, target[i][j], mom[(m, k)][i][j], vel[(m, k)][i][j]
                        )
                assert_close(got, torch.tensor(rows, dtype=F64), 1e-12, f"{method_name} {name} {m}.{k} round {t}")
                assert_close(opt_state[f"{m}.{k}.m"], torch.tensor(mom[(m, k)], dtype=F64), 1e-12, "m")
                if name != "fedavgm":
                    assert_close(opt_state[f"{m}.{k}.v"], torch.tensor(vel[(m, k)], dtype=F64), 1e-12, "v")
        state = stepped.state
    keys = {k.rsplit(".", 2)[1] for k in opt_state}
    assert keys == set(AVERAGING[method_name] or "AB")  # rolora: A and B, each in its own rounds
    assert all(not k.endswith(".v") for k in opt_state) == (name == "fedavgm")


@pytest.mark.parametrize("method_name", sorted(AVERAGING))
def test_fedavgm_without_momentum_at_unit_lr_is_the_plain_method(method_name):
    method = build_method(method_name)
    state = make_state(SHAPES, RANK, seed=5)
    for t in range(3):
        uploads = uploads_around(state, 4, seed=200 + t)
        plain = method.aggregate(state, uploads)
        stepped, _ = server_step(opt("fedavgm", momentum=0.0, lr=1.0), method, state, plain, {})
        for m in SHAPES:
            for k in "AB":
                assert_close(stepped.state.factors[m].get(k), plain.state.factors[m].get(k), 1e-15, f"{m}.{k}")
        state = plain.state


def test_none_returns_the_result_itself():
    method = build_method("fedit")
    state = make_state(SHAPES, RANK, seed=5)
    result = method.aggregate(state, uploads_around(state, 2, seed=1))
    stepped, new = server_step(opt("none"), method, state, result, {})
    assert stepped is result and new == {}


def test_float32_factors_step_in_float32():
    method = build_method("fedit")
    state = make_state(SHAPES, RANK, seed=5, dtype=torch.float32)
    uploads = [
        ClientUpload(u.client_id, {m: f.to(torch.float32) for m, f in u.factors.items()}, u.num_examples)
        for u in uploads_around(make_state(SHAPES, RANK, seed=5), 2, seed=1)
    ]
    stepped, st = server_step(opt("fedadam"), method, state, method.aggregate(state, uploads), {})
    assert all(f.A.dtype == torch.float32 and f.B.dtype == torch.float32 for f in stepped.state.factors.values())
    assert all(t.dtype == torch.float32 for t in st.values())


@pytest.mark.parametrize("name", ["fedavgm", "fedadagrad", "fedadam", "fedyogi"])
@pytest.mark.parametrize("method_name", PRODUCT)
def test_product_methods_refuse_naming_the_method_and_the_setting(method_name, name):
    with pytest.raises(ValueError) as err:
        check_server_optimizer(build_method(method_name), opt(name))
    msg = str(err.value)
    assert f"server.optimizer={name}" in msg and method_name in msg and "not low rank" in msg
    assert "fedit" in msg  # and says which methods it combines with


def test_registry_split_is_the_documented_one():
    assert sorted(factor_averaging_methods()) == sorted(AVERAGING)
    assert sorted(set(available_methods()) - set(AVERAGING)) == sorted(PRODUCT)
    assert build_method("fedit").averaged_factors(0) == AB


def test_adaptive_needs_positive_tau():
    with pytest.raises(ValueError, match=r"server\.tau=0"):
        check_server_optimizer(build_method("fedit"), opt("fedadam", tau=0.0))
    check_server_optimizer(build_method("fedit"), opt("fedavgm", tau=0.0))  # unused by fedavgm


@pytest.mark.parametrize(
    ("sets", "needle"),
    [
        ({"server.optimizer": "fedadam", "method.name": "fedmomentum"}, "server.optimizer=fedadam .* fedmomentum"),
        ({"server.optimizer": "adam"}, "server.optimizer"),
        ({"server.optimizer": "fedyogi", "server.tau": "0"}, "server.tau"),
        ({"server.beta1": "1.5"}, "server.beta1"),
        ({"server.lr": "-1"}, "server.lr"),
        ({"train.prox_mu": "-0.1"}, "train.prox_mu"),
    ],
)
def test_config_errors_name_the_key(sets, needle):
    from fedlora.engine.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=needle):
        load_config(None, {"method.name": "fedit", **sets})
