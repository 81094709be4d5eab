"""The method registry and ``name=value`` settings parsing."""

from __future__ import annotations

import dataclasses

import pytest

from fedlora.methods import SettingsError, available_methods, build_method, describe_methods, method_class
from fedlora.methods.base import Method
from fedlora.methods.registry import register


def test_parses_strings_by_type():
    m = build_method("fedmomentum", {"tau": "0.5", "merge_every": "3", "split": "left", "precision": "float64"})
    s = m.settings
    assert s.tau == 0.5 and isinstance(s.tau, float)
    assert s.merge_every == 3 and isinstance(s.merge_every, int)
    assert s.split == "left" and s.precision == "float64"
    # native values pass through; an int for a float setting becomes a float
    s2 = build_method("fedmomentum", {"tau": 1, "merge_every": 0}).settings
    assert s2.tau == 1.0 and isinstance(s2.tau, float) and s2.merge_every == 0
    assert build_method("fedrot_lora", {"lam": "0.25", "align": "B"}).settings.lam == 0.25
    assert build_method("flora", {"seed": "17"}).settings.seed == 17
    assert build_method("fedsmooth_lora", {"gamma": "16", "zeta_mode": "decay"}).settings.gamma == 16.0


@pytest.mark.parametrize(("text", "value"), [("true", True), ("TRUE", True), ("yes", True), ("on", True), ("1", True)])
def test_bool_true(text, value):
    assert build_method("fedex_lora", {"compress": text}).settings.compress is value


@pytest.mark.parametrize("text", ["false", "False", "no", "off", "0", " 0 "])
def test_bool_false(text):
    assert build_method("fedex_lora", {"compress": text}).settings.compress is False


def test_defaults():
    assert build_method("fedmomentum").settings == method_class("fedmomentum").Settings()
    assert build_method("fedmomentum", {}).settings.tau == 0.99


def test_unknown_method():
    with pytest.raises(SettingsError) as err:
        build_method("fedavg")
    msg = str(err.value)
    assert "fedavg" in msg
    for name in available_methods():
        assert name in msg


def test_unknown_setting_names_key_and_allowed():
    with pytest.raises(SettingsError) as err:
        build_method("fedmomentum", {"rho": "1"})
    msg = str(err.value)
    assert "rho" in msg and "fedmomentum" in msg
    for key in ("tau", "split", "merge_every", "precision"):
        assert key in msg
    with pytest.raises(SettingsError, match=r"allowed: \(none\)"):
        build_method("fedit", {"lam": "1"})


def test_bad_literal_names_allowed_values():
    with pytest.raises(SettingsError) as err:
        build_method("fedmomentum", {"split": "diagonal"})
    msg = str(err.value)
    assert "split" in msg and "diagonal" in msg
    for allowed in ("balanced", "left", "right"):
        assert allowed in msg
    with pytest.raises(SettingsError, match=r"first=.C.*choose one of B, A"):
        build_method("rolora", {"first": "C"})


@pytest.mark.parametrize(
    ("method", "key", "value", "kind"),
    [
        ("fedmomentum", "tau", "abc", "float"),
        ("fedmomentum", "tau", "", "float"),
        ("fedmomentum", "merge_every", "1.5", "int"),
        ("flora", "seed", "x", "int"),
        ("fedex_lora", "compress", "maybe", "bool"),
        ("fedsmooth_lora", "gamma", "1,5", "float"),
    ],
)
def test_bad_values_name_the_key(method, key, value, kind):
    with pytest.raises(SettingsError) as err:
        build_method(method, {key: value})
    msg = str(err.value)
    assert key in msg and method in msg and kind in msg, msg


@pytest.mark.parametrize(
    ("method", "key", "value"),
    [
        ("fedmomentum", "tau", "1.5"),
        ("fedmomentum", "tau", "-0.01"),
        ("fedmomentum", "merge_every", "-1"),
        ("fedrot_lora", "lam", "2"),
        ("fedrot_lora", "lam", "-0.5"),
        ("fedsmooth_lora", "gamma", "0"),
    ],
)
def test_out_of_range_rejected(method, key, value):
    with pytest.raises(SettingsError) as err:
        build_method(method, {key: value})
    assert key in str(err.value) and method in str(err.value)


def test_edge_values_accepted():
    assert build_method("fedmomentum", {"tau": "0"}).settings.tau == 0.0
    assert build_method("fedmomentum", {"tau": "1"}).settings.tau == 1.0
    assert build_method("fedrot_lora", {"lam": "0"}).settings.lam == 0.0
    assert build_method("fedrot_lora", {"lam": "1"}).settings.lam == 1.0


def test_constructor_overrides_are_validated():
    cls = method_class("fedmomentum")
    assert cls(tau=0.5).settings.tau == 0.5
    assert cls(cls.Settings(tau=0.3), merge_every=2).settings == cls.Settings(tau=0.3, merge_every=2)
    with pytest.raises(ValueError, match="tau"):
        cls(tau=2.0)


def test_describe_methods_lists_everything():
    text = describe_methods()
    for name in available_methods():
        assert f"{name}: {method_class(name).summary}" in text
        for f in dataclasses.fields(method_class(name).Settings):
            assert f"    {f.name} (" in text
            assert f.metadata.get("help", "") in text
    assert "split (balanced|left|right, default 'balanced')" in text
    assert "tau (float, default 0.99)" in text


def test_register_rejects_duplicates_and_bad_names():
    class Dup(Method):
        name = "fedit"

        def aggregate(self, state, uploads, weights=None):
            raise NotImplementedError

    with pytest.raises(ValueError, match="unique"):
        register(Dup)

    class Upper(Dup):
        name = "FedThing"

    with pytest.raises(ValueError, match="lowercase"):
        register(Upper)
    assert "FedThing" not in available_methods()
    assert method_class("fedit").__name__ == "FedIT"
