"""Client partitioners: disjoint, complete, seeded, and the skew each scheme promises."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora.data.partition import dirichlet, iid, k_classes, natural, partition_report, plot_partition, shards

SETTINGS = settings(max_examples=40, deadline=None)
GROUPS = st.lists(st.sampled_from(["add", "sub", "mul", "div", "frac", "pct"]), min_size=1, max_size=150)


def assert_partition(parts: list[list[int]], n: int) -> None:
    flat = [i for p in parts for i in p]
    assert len(flat) == len(set(flat)), "parts overlap"
    assert sorted(flat) == list(range(n)), "parts do not cover every example exactly once"
    assert all(p == sorted(p) for p in parts)


@SETTINGS
@given(n=st.integers(1, 300), data=st.data(), seed=st.integers(0, 2**31))
def test_iid(n, data, seed):
    c = data.draw(st.integers(1, min(n, 12)))
    parts = iid(n, c, seed)
    assert len(parts) == c
    assert_partition(parts, n)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert parts == iid(n, c, seed)


@SETTINGS
@given(groups=GROUPS, data=st.data(), seed=st.integers(0, 2**31), alpha=st.sampled_from([0.05, 0.3, 1.0, 10.0, 1e4]))
def test_dirichlet(groups, data, seed, alpha):
    n = len(groups)
    c = data.draw(st.integers(1, min(n, 6)))
    min_size = data.draw(st.integers(0, min(3, n // c)))
    try:
        parts = dirichlet(groups, c, alpha, seed, min_size=min_size, max_tries=100)
    except ValueError as exc:  # only the documented "no draw met min_size" failure is allowed
        assert "raise alpha or lower min_size" in str(exc)
        return
    assert len(parts) == c
    assert_partition(parts, n)
    assert min(len(p) for p in parts) >= min_size
    assert parts == dirichlet(groups, c, alpha, seed, min_size=min_size, max_tries=100)


def test_dirichlet_alpha_controls_skew():
    groups = [f"g{i % 8}" for i in range(4000)]
    skew = {a: partition_report(groups, dirichlet(groups, 5, a, seed=1))["label_skew"] for a in (0.1, 1.0, 1e6)}
    assert skew[0.1] > skew[1.0] > skew[1e6]
    assert skew[1e6] < 0.02  # alpha -> inf: every client mirrors the global mix
    sizes = [len(p) for p in dirichlet(groups, 5, 1e6, seed=1)]
    assert max(sizes) - min(sizes) <= 16  # and has ~ the same size
    inf_parts = dirichlet(groups, 5, float("inf"), seed=1)
    assert partition_report(groups, inf_parts)["label_skew"] < 0.01


def test_dirichlet_min_size_is_met_by_resampling():
    groups = [f"g{i % 4}" for i in range(60)]
    parts = dirichlet(groups, 5, 0.1, seed=0, min_size=6)
    assert min(len(p) for p in parts) >= 6
    assert_partition(parts, 60)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": 0.0}, "alpha must be > 0"),
        ({"min_size": 50}, "exceeds"),
        ({"alpha": 1e-3, "min_size": 9, "max_tries": 20}, "raise alpha or lower min_size"),
    ],
)
def test_dirichlet_errors(kwargs, message):
    groups = [f"g{i % 3}" for i in range(40)]
    args = {"alpha": 0.5, "min_size": 1, **kwargs}
    with pytest.raises(ValueError, match=message):
        dirichlet(groups, 4, args.pop("alpha"), 0, **args)


def test_dirichlet_reproduces_and_seeds_differ():
    groups = [f"g{i % 5}" for i in range(200)]
    assert dirichlet(groups, 4, 0.5, 7) == dirichlet(groups, 4, 0.5, 7)
    assert dirichlet(groups, 4, 0.5, 7) != dirichlet(groups, 4, 0.5, 8)


@SETTINGS
@given(groups=GROUPS, data=st.data(), seed=st.integers(0, 2**31))
def test_k_classes(groups, data, seed):
    n, n_groups = len(groups), len(set(groups))
    c = data.draw(st.integers(1, min(n, 8)))
    k = data.draw(st.integers(1, 4))
    if c * min(k, n_groups) < n_groups:
        with pytest.raises(ValueError, match="cannot cover"):
            k_classes(groups, c, k, seed)
        return
    parts = k_classes(groups, c, k, seed)
    assert len(parts) == c
    assert_partition(parts, n)
    for p in parts:
        assert len({groups[i] for i in p}) <= k
    assert parts == shards(groups, c, k, seed)


def test_k_classes_gives_exactly_k_groups_with_ample_data():
    groups = [f"g{i % 6}" for i in range(600)]
    parts = k_classes(groups, 9, 2, seed=3)
    assert all(len({groups[i] for i in p}) == 2 for p in parts)
    assert_partition(parts, 600)


def test_natural():
    groups = ["b", "a", "b", "c", "a", "b"]
    parts = natural(groups)
    assert parts == [[1, 4], [0, 2, 5], [3]]
    assert_partition(parts, len(groups))


def test_iid_errors():
    with pytest.raises(ValueError):
        iid(3, 4, 0)
    with pytest.raises(ValueError):
        iid(3, 0, 0)


def test_report_and_plot(tmp_path):
    groups = [f"g{i % 3}" for i in range(30)]
    parts = dirichlet(groups, 4, 0.5, seed=2)
    rep = partition_report(groups, parts)
    assert rep["num_clients"] == 4 and rep["num_examples"] == 30
    assert rep["groups"] == ["g0", "g1", "g2"]
    assert rep["sizes"] == [len(p) for p in parts]
    for c, p in zip(rep["clients"], parts):
        assert c["groups"] == {g: k for g, k in Counter(groups[i] for i in p).items()}
    assert 0.0 <= rep["label_skew"] <= 1.0
    assert partition_report(groups, natural(groups))["label_skew"] > 0.6
    out = tmp_path / "partition.png"
    plot_partition(rep, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
