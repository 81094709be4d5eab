"""The YAML files shipped with fedlora: run presets (``fedlora run --preset NAME``) and study specs
(``fedlora study NAME``), and how to find them. The lowest layer that knows about them: the CLI,
the study runner and the Flower app all look presets up here."""

from __future__ import annotations

from importlib.resources.abc import Traversable

SPEC_MARKERS = ("base", "grid")
"""Top-level keys every study spec has (``fedlora.study.spec`` requires both) and no run config can have."""


def shipped_configs() -> Traversable:
    """The folder of YAML files shipped with the package (presets and study specs)."""
    from importlib import resources

    return resources.files(__name__)


def is_study_spec(path: Traversable) -> bool:
    """Whether a YAML file is a study spec (``fedlora study``) rather than a run config: its top level
    has a spec's required ``base``/``grid`` keys."""
    import yaml

    try:
        data = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and any(k in data for k in SPEC_MARKERS)


def preset_names() -> list[str]:
    """The shipped presets (``fedlora run --preset NAME``): the package's configs that are run
    configs, not study specs; sorted."""
    return sorted(p.name[:-5] for p in shipped_configs().iterdir() if p.name.endswith(".yaml") and not is_study_spec(p))


def preset_path(name: str):
    """A config shipped with the package (``default``, ``ci``, ...); a study spec is not one."""
    path = shipped_configs() / f"{name}.yaml"
    if path.is_file() and is_study_spec(path):
        raise ValueError(f"{name!r} is a study spec, not a preset: run it with `fedlora study {name}`")
    if not path.is_file():
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(preset_names())}")
    return path


__all__ = ["SPEC_MARKERS", "is_study_spec", "preset_names", "preset_path", "shipped_configs"]
