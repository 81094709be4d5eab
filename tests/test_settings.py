"""fedlora.settings: one parser for the config, the methods' and the tasks' settings."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest

from fedlora.settings import SettingsError, describe, parse, type_name


@dataclass
class Inner:
    depth: int = field(default=1, metadata={"help": "how deep", "min": 0})


@dataclass
class Demo:
    rate: float = field(default=0.5, metadata={"help": "a rate", "min": 0.0, "max": 1.0})
    count: int = 3
    flag: bool = False
    mode: Literal["fast", "slow"] = "fast"
    level: Literal[1, 2] = 1
    label: str = "x"
    seed: int | None = None
    names: list[str] = field(default_factory=list)
    ks: list[int] = field(default_factory=lambda: [1])
    ranks: dict[str, int] = field(default_factory=dict, metadata={"min": 1})
    extra: dict[str, Any] = field(default_factory=dict)
    inner: Inner = field(default_factory=Inner)


# ---- the mechanism, on a local dataclass ---------------------------------------------------------
def test_defaults_and_native_values():
    assert parse(Demo, {}) == Demo()
    d = parse(Demo, {"rate": 0.25, "count": 7, "flag": True, "mode": "slow", "seed": 4, "names": ["a", "b"]})
    assert (d.rate, d.count, d.flag, d.mode, d.seed, d.names) == (0.25, 7, True, "slow", 4, ["a", "b"])


def test_ints_are_accepted_for_floats_and_become_floats():
    d = parse(Demo, {"rate": 1})
    assert d.rate == 1.0 and isinstance(d.rate, float)
    with pytest.raises(SettingsError, match="rate must be a float, got True"):
        parse(Demo, {"rate": True})


def test_numeric_strings_are_floats_everywhere():  # YAML 1.1 reads 5e-4 as a string
    assert parse(Demo, {"rate": "5e-4"}).rate == 5e-4
    with pytest.raises(SettingsError, match="rate must be a float, got 'abc'"):
        parse(Demo, {"rate": "abc"})


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, "nan", "inf", "-inf", "NaN", 10**400])
def test_non_finite_floats_are_refused_by_key(bad):
    with pytest.raises(SettingsError, match=r"^demo: rate=(nan|inf|-inf) is not a finite number$"):
        parse(Demo, {"rate": bad}, owner="demo")


def test_unknown_key_names_it_and_the_allowed_ones():
    with pytest.raises(SettingsError) as err:
        parse(Demo, {"rat": 1}, owner="demo")
    msg = str(err.value)
    assert msg.startswith("demo: unknown key 'rat'; allowed: rate, count, flag, mode")
    with pytest.raises(SettingsError, match=r"unknown key 'inner.deep'; allowed: depth$"):
        parse(Demo, {"inner": {"deep": 2}})

    @dataclass
    class Empty:
        pass

    with pytest.raises(SettingsError, match=r"allowed: \(none\)"):
        parse(Empty, {"x": 1})


def test_literal_members_and_their_string_forms():
    assert parse(Demo, {"level": 2}).level == 2
    assert parse(Demo, {"level": "2"}).level == 2  # the string form of a member
    with pytest.raises(SettingsError, match=r"mode='medium' is not allowed; choose one of fast, slow"):
        parse(Demo, {"mode": "medium"})
    with pytest.raises(SettingsError, match="choose one of 1, 2"):
        parse(Demo, {"level": True})  # True == 1, but it is not the member 1


@pytest.mark.parametrize("word", ["true", "TRUE", " yes ", "on", "1", 1])
def test_bool_words_in_text_mode(word):
    assert parse(Demo, {"flag": word}, text=True).flag is True


@pytest.mark.parametrize("word", ["false", "No", "off", "0", 0])
def test_bool_false_words_in_text_mode(word):
    assert parse(Demo, {"flag": word}, text=True).flag is False


@pytest.mark.parametrize("value", ["yes", "true", 1, 0, None])
def test_bools_are_strict_outside_text_mode(value):
    with pytest.raises(SettingsError, match=r"flag must be a bool \(true or false\)"):
        parse(Demo, {"flag": value})
    with pytest.raises(SettingsError, match="flag must be a bool"):
        parse(Demo, {"flag": "maybe"}, text=True)


def test_ints_parse_from_text_only_in_text_mode():
    assert parse(Demo, {"count": " 12 "}, text=True).count == 12
    with pytest.raises(SettingsError, match="count must be an integer, got '12'"):
        parse(Demo, {"count": "12"})
    for bad in ("1.5", 1.5, True):
        with pytest.raises(SettingsError, match="count must be an integer"):
            parse(Demo, {"count": bad}, text=True)


def test_optional():
    assert parse(Demo, {"seed": None}).seed is None
    assert parse(Demo, {"seed": 5}).seed == 5
    assert parse(Demo, {"seed": "null"}, text=True).seed is None
    assert parse(Demo, {"seed": "7"}, text=True).seed == 7
    with pytest.raises(SettingsError, match="seed must be an integer or null, got 'x'"):
        parse(Demo, {"seed": "x"}, text=True)


def test_lists_and_comma_separated_strings():
    assert parse(Demo, {"names": "q_proj, v_proj,"}).names == ["q_proj", "v_proj"]
    assert parse(Demo, {"ks": "1,5"}).ks == [1, 5]
    assert parse(Demo, {"ks": (2, 3)}).ks == [2, 3]
    with pytest.raises(SettingsError, match=r"names must be a list of strings, got \['a', 1\]"):
        parse(Demo, {"names": ["a", 1]})
    with pytest.raises(SettingsError, match="ks must be a list of integers"):
        parse(Demo, {"ks": 3})


def test_dict_entries_are_checked_under_their_key():
    assert parse(Demo, {"ranks": {0: 4, "b": 2}}).ranks == {"0": 4, "b": 2}  # keys become strings
    assert parse(Demo, {"extra": {"tau": "x"}}).extra == {"tau": "x"}  # Any: passed through
    with pytest.raises(SettingsError, match=r"ranks\.a must be an integer, got 'x'"):
        parse(Demo, {"ranks": {"a": "x"}})
    with pytest.raises(SettingsError, match=r"ranks\.a=0 is below the minimum 1"):
        parse(Demo, {"ranks": {"a": 0}})
    with pytest.raises(SettingsError, match="ranks must be a mapping, got 3"):
        parse(Demo, {"ranks": 3})


def test_bounds_and_nested_dataclasses():
    with pytest.raises(SettingsError, match=r"rate=1\.5 is above the maximum 1\.0"):
        parse(Demo, {"rate": 1.5})
    with pytest.raises(SettingsError, match=r"rate=-0\.1 is below the minimum 0\.0"):
        parse(Demo, {"rate": -0.1})
    assert parse(Demo, {"inner": {"depth": 4}}).inner == Inner(4)
    with pytest.raises(SettingsError, match=r"inner\.depth=-1 is below the minimum 0"):
        parse(Demo, {"inner": {"depth": -1}})
    with pytest.raises(SettingsError, match="inner must be a mapping, got 2"):
        parse(Demo, {"inner": 2})
    with pytest.raises(SettingsError, match="settings must be a mapping"):
        parse(Demo, [1])  # type: ignore[arg-type]


def test_strings_are_strict():
    with pytest.raises(SettingsError, match="label must be a string, got 3"):
        parse(Demo, {"label": 3}, text=True)


def test_post_init_errors_pass_through():
    @dataclass
    class Checked:
        n: int = 1

        def __post_init__(self) -> None:
            if self.n < 1:
                raise KeyError("n must be >= 1")

    with pytest.raises(KeyError, match="n must be"):
        parse(Checked, {"n": 0})


def test_describe_flattens_nested_dataclasses():
    docs = {d.key: d for d in describe(Demo)}
    assert docs["rate"].line() == "rate (float, default 0.5): a rate"
    assert docs["mode"].kind == "fast|slow" and docs["names"].default == []
    assert docs["inner.depth"].line() == "inner.depth (int, default 1): how deep"
    assert type_name(int | None) == "int | None"


# ---- the experiment config -------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["train.lr", "lora.alpha", "rounds.clients_per_round", "partition.alpha"])
@pytest.mark.parametrize("text", ["nan", ".nan", ".inf", "-.inf", "inf"])
def test_config_floats_refuse_non_finite_values(key, text):
    from fedlora.engine.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=rf"^{key.replace('.', '[.]')}=-?(nan|inf) is not a finite number$"):
        load_config(None, {key: text})


def test_config_yaml_nan_is_refused(tmp_path):
    from fedlora.engine.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("lora:\n  alpha: .nan\n")
    with pytest.raises(SettingsError, match=r"lora\.alpha=nan is not a finite number"):
        load_config(path)


def test_config_values_parse_as_before():
    from fedlora.engine.config import Config, config_from_dict, load_config

    cfg = load_config(None, {"train.lr": "5e-4", "lora.targets": "q_proj,v_proj", "lora.client_ranks": "{0: 4}"})
    assert cfg.train.lr == 5e-4 and cfg.lora.targets == ["q_proj", "v_proj"] and cfg.lora.client_ranks == {"0": 4}
    assert load_config(None, {"lora.alpha": "32"}).lora.alpha == 32.0
    assert isinstance(load_config(None, {"lora.alpha": "32"}).lora.alpha, float)
    assert config_from_dict(Config().to_dict()) == Config()
    with pytest.raises(SettingsError, match=r"lora\.client_ranks\.0=0 is below the minimum 1"):
        load_config(None, {"lora.client_ranks": "{0: 0}"})
    with pytest.raises(SettingsError, match=r"unknown key 'train\.lrr'; allowed: optimizer, lr"):
        load_config(None, {"train.lrr": "1"})


# ---- method settings (text mode) -------------------------------------------------------------------
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", math.nan, math.inf])
def test_method_floats_refuse_non_finite_values(value):
    from fedlora.methods import build_method

    with pytest.raises(SettingsError, match=r"^fedmomentum: tau=-?(nan|inf) is not a finite number$"):
        build_method("fedmomentum", {"tau": value})
    with pytest.raises(SettingsError, match=r"fedrot_lora: lam=-?(nan|inf) is not a finite number"):
        build_method("fedrot_lora", {"lam": value})


def test_method_settings_through_the_config():
    from fedlora.engine.config import load_config

    assert load_config(None, {"method.name": "fedex_lora", "method.settings.compress": "1"}).method.settings == {
        "compress": 1
    }
    with pytest.raises(SettingsError, match=r"^method: fedmomentum: tau=nan is not a finite number$"):
        load_config(None, {"method.settings.tau": ".nan"})


def test_registry_lookups():
    from fedlora.methods import available_methods, method_class
    from fedlora.methods.registry import METHODS

    assert METHODS.names() == available_methods() and "fedit" in METHODS
    with pytest.raises(SettingsError, match="unknown method 'fedavg'; available: fedex_lora, fedit"):
        method_class("fedavg")


# ---- task settings -----------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["nan", "inf", math.nan, -math.inf])
def test_task_floats_refuse_non_finite_values(value):
    from fedlora.tasks import build_task

    with pytest.raises(SettingsError, match=r"^code task: temperature=-?(nan|inf) is not a finite number$"):
        build_task("code", {"temperature": value})
    with pytest.raises(SettingsError, match=r"^shakespeare task: test_fraction=-?(nan|inf) is not a finite number$"):
        build_task("shakespeare", {"test_fraction": value})


def test_task_settings_are_parsed_into_the_task_settings_class():
    from fedlora.tasks import TASKS, build_task

    task = build_task("code", {"temperature": 1, "n_samples": 5, "k": [1, 5], "seed": None}, seed=4)
    assert task.settings.temperature == 1.0 and isinstance(task.settings.temperature, float)
    assert type(task.settings) is TASKS.get("code").Settings and task.seed == 4
    assert build_task("math", {}).settings == TASKS.get("math").Settings()
    with pytest.raises(SettingsError, match=r"^math task: unknown key 'bogus'; allowed: source, n_train"):
        build_task("math", {"bogus": 1})
    with pytest.raises(SettingsError, match=r"^commonsense task: scoring='vote' is not allowed; choose one of"):
        build_task("commonsense", {"scoring": "vote"})
    with pytest.raises(SettingsError, match=r"^math task: use_chat_template must be a bool \(true or false\), got 1$"):
        build_task("math", {"use_chat_template": 1})
    with pytest.raises(SettingsError, match=r"^unknown task 'nope'; available: classification, code, commonsense"):
        build_task("nope")


def test_every_task_is_registered_with_a_settings_dataclass():
    import dataclasses

    from fedlora.tasks import TASKS

    assert TASKS.names() == ["classification", "code", "commonsense", "instruction", "math", "shakespeare"]
    for name in TASKS.names():
        cls = TASKS.get(name)
        assert cls.name == name and dataclasses.is_dataclass(cls.Settings)
