"""From a Flower run config (``[tool.flwr.app.config]`` plus ``--run-config``) to fedlora's Config.

Keys (Flower flattens nested tables with dots, so ``"train.max-steps" = 2`` and
``[tool.flwr.app.config.train] max-steps = 2`` are the same key):

- ``fedlora-config``: a shipped preset name (``default``, ``ci``) or a YAML file (absolute, or
  relative to the working directory of the process running the ServerApp);
- ``fedlora-set``: more overrides in one string, ``"train.lr=5.0e-4; method.settings={tau: 0.9}"``
  (``;``-separated, values read as in ``fedlora run --set``), for keys the app's
  ``pyproject.toml`` does not list (``flwr run --run-config`` only overrides listed keys);
- ``output-dir``: where the run folder ``<output-dir>/<name>`` is written (default: the config's
  ``output_dir``);
- ``round-timeout``: seconds the server waits for a round's replies (missing ones are failures
  of the round; a SuperNode that stops sending heartbeats is reported unavailable by the
  SuperLink sooner, within about a minute in Flower 1.41);
- ``node-wait-timeout``: seconds the server waits for every client's SuperNode to connect;
- ``resume``: ``true`` continues the run in ``<output-dir>/<name>`` from its checkpoint (the same
  run config as when it started; a differing key is an error naming it);
- ``overwrite``: ``true`` starts afresh in a folder that already holds a checkpointed run
  (otherwise that is an error);
- every other key is a dotted fedlora config key, ``-`` read as ``_`` (``"rounds.num-rounds" = 3``
  sets ``rounds.num_rounds``); its value overrides the YAML.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping

from fedlora.engine.config import Config, ConfigError, load_config
from fedlora.settings import parse

RESERVED = ("fedlora-config", "fedlora-set", "output-dir", "round-timeout", "node-wait-timeout", "resume", "overwrite")


@dataclass(frozen=True)
class FlowerOptions:
    """Run-config keys that are not fedlora config keys (parsed by :func:`fedlora.settings.parse`)."""

    round_timeout: float = 3600.0
    node_wait_timeout: float = 300.0
    resume: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        for key in ("round_timeout", "node_wait_timeout"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"{key.replace('_', '-')}={getattr(self, key)!r}: a positive number of seconds")


def options_from(run_config: Mapping[str, Any]) -> FlowerOptions:
    """The Flower-only options of a run config (``round-timeout``, ``node-wait-timeout``,
    ``resume``, ``overwrite``); values may be text, as ``--run-config`` gives them."""
    keys = ("round-timeout", "node-wait-timeout", "resume", "overwrite")
    values = {k.replace("-", "_"): run_config[k] for k in keys if k in run_config and run_config[k] != ""}
    return parse(FlowerOptions, values, owner="flower run config", text=True)


def config_source(name: str) -> Any:
    """A preset's path, or the YAML path itself."""
    if name.endswith((".yaml", ".yml")) or "/" in name:
        return name
    from fedlora.configs import preset_path

    return preset_path(name)


def overrides_from(run_config: Mapping[str, Any]) -> dict[str, str]:
    """The dotted fedlora overrides a run config holds (text, as ``--set`` takes them)."""
    out: dict[str, str] = {}
    for key, value in run_config.items():
        if key in RESERVED:
            continue
        out[key.replace("-", "_")] = value if isinstance(value, str) else json.dumps(value)
    extra = str(run_config.get("fedlora-set", "") or "")
    for item in extra.replace("\n", ";").split(";"):
        if not item.strip():
            continue
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"fedlora-set: {item.strip()!r} is not key=value")
        out[key.strip()] = value.strip()
    output_dir = run_config.get("output-dir")
    if output_dir:
        out["output_dir"] = str(output_dir)
    return out


def resolve(run_config: Mapping[str, Any]) -> tuple[Config, FlowerOptions]:
    """The validated :class:`Config` and the Flower-only options of a run config."""
    source = config_source(str(run_config.get("fedlora-config", "default")))
    cfg = load_config(source, overrides_from(run_config))
    return cfg, options_from(run_config)
