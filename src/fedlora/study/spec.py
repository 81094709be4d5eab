"""A study spec: one base config, overrides, a grid of axes and per-method overrides -> cells.

A study spec is a YAML file::

    name: study_glue                 # used in titles
    base: glue_minilm                # a shipped preset name, or a config YAML path (relative to the spec)
    output_dir: runs/study_glue      # every cell is a normal run folder <output_dir>/<cell name>
    report_dir: docs/results/glue    # report.md, report.json and the PNGs
    overrides:                       # dotted config keys set in every cell
      rounds.num_rounds: 8
      train.max_steps: 5
    grid:                            # the cartesian product; the FIRST axis varies slowest
      seed: [0, 1, 2]
      partition.alpha: [0.5, 100]
      partition.num_clients: [3, 10]
      method.name: [fedit, fedmomentum]
    methods:                         # per-method overrides, applied after the grid values
      fedrot_lora: {method.settings: {lam: 0.5}}
      flexlora: {lora.client_ranks: [8, 4, 2]}   # a list is cycled over client ids 0..num_clients-1
    arms:                            # optional: named variants, on the grid's ``arm`` axis
      fedit: {method.name: fedit}
      fedit+scaffold: {method.name: fedit, train.scaffold: true}
    report:                          # optional
      metric: accuracy               # default: the task's headline metric (first of its eval dict)
      target: 0.8                    # rounds/MB to reach it (direction from the metric's name); or a
                                     # list, e.g. [0.8, 0.95]: the rounds/MB to reach each
      slices: [partition.alpha, partition.num_clients]   # one table/plot per slice
      pairs: [[fedmomentum, fedit]]  # paired comparisons over seeds (a claim: first beats second)

Cells are built as: base config -> ``overrides`` -> the cell's grid values (an ``arm`` value:
that arm's overrides) -> the method's overrides -> (command-line ``--set``) ->
``output_dir``/``name``. A study whose grid has an ``arm`` axis compares arms (several may run
one method: FedIT with and without SCAFFOLD): the report groups cells and pairs them by arm
name, where other studies use the method's name; with a ``method.name`` axis as well, by
``<method>@<arm>`` (each method at each privacy level). When a cell's ``method.name``
differs from the base config's, ``method.settings`` is reset to ``{}`` first (settings of one
method are errors for another) unless the method's overrides set it. Every cell is validated
with :func:`fedlora.engine.config.config_from_dict`; a malformed spec raises :class:`StudySpecError`
naming the key.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from fedlora.engine.config import Config, ConfigError, config_from_dict

SPEC_KEYS = (
    "name", "base", "output_dir", "report_dir", "overrides", "grid", "methods", "arms", "report", "description"
)
REPORT_KEYS = ("metric", "target", "slices", "pairs")
METHOD_AXIS = "method.name"
ARM_AXIS = "arm"
SEED_AXIS = "seed"


class StudySpecError(ValueError):
    """A study spec key that is missing, unknown or has a bad value (the message names it)."""


@dataclass
class Cell:
    """One run of the study: its grid values, its folder name and its validated config."""

    index: int
    name: str
    values: dict[str, Any]
    config: Config

    @property
    def run_dir(self) -> Path:
        return self.config.run_dir

    @property
    def method(self) -> str:
        """What the report groups by: its method; on a study with arms, its arm, or
        ``<method>@<arm>`` where the grid has both axes."""
        return group_label(self.values) or self.config.method.name

    @property
    def seed(self) -> int:
        return self.config.seed

    @property
    def digest(self) -> str:
        """What the cell computes, as 16 hex digits: the sha256 of its config keys that differ from
        the schema's defaults (a key added to the schema later, at its default, leaves it unchanged)."""
        return config_digest(self.config)


def config_digest(config: Config) -> str:
    """sha256 (16 hex digits) of ``config``'s dotted keys whose values differ from ``Config()``'s."""

    def flat(cfg: Config) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in cfg.to_dict().items():
            if isinstance(value, dict):  # a section: model, lora, method, ... (settings dicts stay whole)
                out.update({f"{key}.{k}": v for k, v in value.items()})
            else:
                out[key] = value
        return out

    default = flat(Config())
    changed = {k: v for k, v in flat(config).items() if k not in default or default[k] != v}
    return hashlib.sha256(json.dumps(changed, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class StudySpec:
    """A parsed study spec (see the module docstring); :meth:`cells` expands the grid."""

    name: str
    base: str
    base_data: dict[str, Any]
    output_dir: Path
    report_dir: Path
    grid: dict[str, list[Any]]
    overrides: dict[str, Any] = field(default_factory=dict)
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)
    arms: dict[str, dict[str, Any]] = field(default_factory=dict)
    metric: str | None = None
    targets: list[float] = field(default_factory=list)  # report.target: one number or a list
    slices: list[str] = field(default_factory=list)
    pairs: list[tuple[str, str]] = field(default_factory=list)
    description: str = ""
    path: Path | None = None
    ref: str | None = None  # how the user named the spec (a shipped name or the path given)

    def cells(self, extra: Mapping[str, Any] | None = None) -> list[Cell]:
        """Every cell of the grid in order (the first axis varies slowest); ``extra`` = ``--set``."""
        axes = list(self.grid)
        out = []
        for i, combo in enumerate(itertools.product(*(self.grid[a] for a in axes))):
            values = dict(zip(axes, combo))
            name = cell_name(values)
            data = self.cell_data(values, extra)
            data["output_dir"] = str(self.output_dir)
            data["name"] = name
            try:
                cfg = config_from_dict(data)
            except ConfigError as exc:
                raise StudySpecError(f"cell {name}: {exc}") from None
            out.append(Cell(index=i, name=name, values=values, config=cfg))
        names = [c.name for c in out]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise StudySpecError(f"grid: two cells get the same folder name {dup!r} (repeated axis values?)")
        return out

    def cell_data(self, values: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The nested config dict of the cell with grid ``values`` (before validation)."""
        data = copy.deepcopy(self.base_data)
        for key, value in self.overrides.items():
            set_dotted(data, key, value, where=f"overrides.{key}")
        base_method = (data.get("method") or {}).get("name", "fedmomentum")
        sets: list[tuple[str, Any, str]] = []  # the cell's own keys, in order: arms expanded
        for key, value in values.items():
            if key == ARM_AXIS:
                sets += [(k, v, f"arms.{value}.{k}") for k, v in self.arms[str(value)].items()]
            else:
                sets.append((key, value, f"grid.{key}"))
        method = next((v for k, v, _ in reversed(sets) if k == "method.name"), base_method)
        own = self.methods.get(str(method), {})
        if method != base_method and "method.settings" not in own:
            # another method than the base's: its settings start empty, before the cell's own apply
            set_dotted(data, "method.settings", {}, where="grid.method.name")
        for key, value, where in sets:
            set_dotted(data, key, value, where=where)
        for key, value in own.items():
            set_dotted(data, key, value, where=f"methods.{method}.{key}")
        for key, value in (extra or {}).items():
            set_dotted(data, key, value, where=f"--set {key}")
        lora = data.get("lora") or {}
        ranks = lora.get("client_ranks")
        if isinstance(ranks, list):
            num = int((data.get("partition") or {}).get("num_clients", 4))
            if not ranks or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in ranks):
                raise StudySpecError(f"lora.client_ranks must be positive integers, got {ranks!r}")
            lora["client_ranks"] = {str(c): ranks[c % len(ranks)] for c in range(num)}
        return data


def group_label(values: Mapping[str, Any]) -> str | None:
    """The arm, ``<method>@<arm>`` on a grid with both axes, or ``None`` (no arm axis)."""
    if ARM_AXIS not in values:
        return None
    arm = str(values[ARM_AXIS])
    return f"{values[METHOD_AXIS]}@{arm}" if METHOD_AXIS in values else arm


def cell_name(values: Mapping[str, Any]) -> str:
    """A folder name from grid values: ``method.name`` by its value, other axes as ``<last key part><value>``."""
    parts = []
    for key, value in values.items():
        text = _short(value)
        parts.append(text if key in (METHOD_AXIS, ARM_AXIS) else f"{key.rsplit('.', 1)[-1]}{text}")
    return "-".join(parts)


def _short(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value) if not isinstance(value, (dict, list)) else yaml.safe_dump(value, default_flow_style=True)
    return re.sub(r"[^A-Za-z0-9_.+]+", "_", text.strip()).strip("_") or "x"


def set_dotted(data: dict[str, Any], key: str, value: Any, *, where: str) -> None:
    """Set ``data[a][b][c] = value`` for ``key = "a.b.c"`` (sections created as needed).

    ``method.settings`` / ``task.settings`` / ``lora.client_ranks`` accept a mapping as a whole;
    a deeper key (``method.settings.lam``) sets one entry.
    """
    if not isinstance(key, str) or not key or any(not p for p in key.split(".")):
        raise StudySpecError(f"{where}: {key!r} is not a dotted config key (e.g. train.lr)")
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise StudySpecError(f"{where}: {part!r} is not a section in {key!r}")
        node = child
    node[parts[-1]] = copy.deepcopy(value)


def _resolve_base(base: Any, spec_dir: Path) -> tuple[str, dict[str, Any]]:
    if not isinstance(base, str) or not base:
        raise StudySpecError(f"base: expected a preset name or a config path, got {base!r}")
    path = Path(base)
    if not path.is_absolute():
        path = spec_dir / path
    if base.endswith((".yaml", ".yml")) or path.is_file():
        if not path.is_file():
            raise StudySpecError(f"base: config file {path} does not exist")
    else:
        from fedlora.configs import preset_path

        try:
            path = Path(str(preset_path(base)))
        except ValueError as exc:
            raise StudySpecError(f"base: {exc}") from None
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise StudySpecError(f"base: {path} is not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise StudySpecError(f"base: {path} must hold a mapping")
    return base, data


def _mapping(raw: dict[str, Any], key: str) -> dict[str, Any]:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise StudySpecError(f"{key}: expected a mapping, got {type(value).__name__}")
    return value


def _pairs(raw: Any, grid_methods: list[str], axis: str = METHOD_AXIS) -> list[tuple[str, str]]:
    """``report.pairs``: a list of ``[a, b]`` method (or arm) pairs, both on the grid's ``axis``."""
    if not isinstance(raw, list):
        raise StudySpecError(f"report.pairs: expected a list of [method, method] pairs, got {raw!r}")
    out = []
    for pair in raw:
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(m, str) for m in pair)):
            raise StudySpecError(f"report.pairs: expected [method, method], got {pair!r}")
        for m in pair:
            if m not in grid_methods:
                raise StudySpecError(f"report.pairs: {m!r} is not on the grid's {axis} axis")
        if pair[0] == pair[1]:
            raise StudySpecError(f"report.pairs: a method paired with itself ({pair[0]!r})")
        out.append((pair[0], pair[1]))
    return out


def parse_spec(raw: Any, spec_dir: Path | str = ".", path: Path | None = None) -> StudySpec:
    """Validate a parsed study spec (a dict); relative paths in ``base`` are relative to ``spec_dir``."""
    if not isinstance(raw, dict):
        raise StudySpecError("study spec: the top level must be a mapping")
    unknown = [k for k in raw if k not in SPEC_KEYS]
    if unknown:
        raise StudySpecError(f"unknown key {unknown[0]!r}; allowed: {', '.join(SPEC_KEYS)}")
    for key in ("base", "grid"):
        if key not in raw:
            raise StudySpecError(f"{key}: required key missing")
    name = raw.get("name") or (path.stem if path else "study")
    if not isinstance(name, str):
        raise StudySpecError(f"name: expected a string, got {name!r}")
    base, base_data = _resolve_base(raw["base"], Path(spec_dir))
    grid = _mapping(raw, "grid")
    if not grid:
        raise StudySpecError("grid: needs at least one axis (e.g. method.name: [fedit, fedmomentum])")
    for axis, values in grid.items():
        if not isinstance(values, list) or not values:
            raise StudySpecError(f"grid.{axis}: expected a non-empty list of values, got {values!r}")
        if len({repr(v) for v in values}) != len(values):
            raise StudySpecError(f"grid.{axis}: repeated values {values!r}")
        if axis in ("name", "output_dir"):
            raise StudySpecError(f"grid.{axis}: set by the study itself, not a grid axis")
    overrides = _mapping(raw, "overrides")
    methods = _mapping(raw, "methods")
    for m, over in methods.items():
        if not isinstance(over, dict):
            raise StudySpecError(f"methods.{m}: expected a mapping of dotted keys, got {over!r}")
    from fedlora.methods import available_methods

    known = set(available_methods())
    for m in list(methods) + [str(v) for v in grid.get(METHOD_AXIS, [])]:
        if m not in known:
            where = f"methods.{m}" if m in methods else f"grid.{METHOD_AXIS}"
            raise StudySpecError(f"{where}: unknown method {m!r}; available: {', '.join(sorted(known))}")
    arms = _mapping(raw, "arms")
    for a, over in arms.items():
        if not isinstance(over, dict) or not over:
            raise StudySpecError(f"arms.{a}: expected a non-empty mapping of dotted keys, got {over!r}")
        if any(k in ("name", "output_dir", "seed") for k in over):
            raise StudySpecError(f"arms.{a}: name, output_dir and seed are the study's, not an arm's")
    if (ARM_AXIS in grid) != bool(arms):
        raise StudySpecError("arms and grid.arm go together: name the arms, and list them on the grid's arm axis")
    for a in grid.get(ARM_AXIS, []):
        if str(a) not in arms:
            raise StudySpecError(f"grid.{ARM_AXIS}: unknown arm {a!r}; defined: {', '.join(arms)}")
    for a, over in arms.items():
        m = over.get(METHOD_AXIS)
        if m is not None and str(m) not in known:
            raise StudySpecError(f"arms.{a}.{METHOD_AXIS}: unknown method {m!r}; available: {', '.join(sorted(known))}")
    report = _mapping(raw, "report")
    bad = [k for k in report if k not in REPORT_KEYS]
    if bad:
        raise StudySpecError(f"unknown key report.{bad[0]}; allowed: {', '.join(REPORT_KEYS)}")
    metric = report.get("metric")
    if metric is not None and not isinstance(metric, str):
        raise StudySpecError(f"report.metric: expected a metric name, got {metric!r}")
    target = report.get("target")
    targets = target if isinstance(target, list) else [] if target is None else [target]
    if not all(isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) for t in targets) or (
        isinstance(target, list) and (not target or len(set(target)) < len(target))
    ):
        raise StudySpecError(f"report.target: expected a finite number or a list of distinct ones, got {target!r}")
    default_slices = [a for a in grid if a not in (METHOD_AXIS, ARM_AXIS, SEED_AXIS)]
    slices = report.get("slices", default_slices)
    if not isinstance(slices, list) or any(s not in grid or s in (METHOD_AXIS, ARM_AXIS, SEED_AXIS) for s in slices):
        raise StudySpecError(
            f"report.slices: expected grid axes other than {METHOD_AXIS}, {ARM_AXIS} and {SEED_AXIS}, got {slices!r}"
        )
    if ARM_AXIS in grid and METHOD_AXIS in grid:
        labels = [str(group_label({METHOD_AXIS: m, ARM_AXIS: a})) for m in grid[METHOD_AXIS] for a in grid[ARM_AXIS]]
        group_axis = f"{METHOD_AXIS} x {ARM_AXIS} (<method>@<arm>)"
    else:
        group_axis = ARM_AXIS if ARM_AXIS in grid else METHOD_AXIS
        labels = [str(m) for m in grid.get(group_axis, [])]
    pairs = _pairs(report.get("pairs", []), labels, group_axis)
    spec_dir = Path(spec_dir)
    spec = StudySpec(
        name=name,
        base=base,
        base_data=base_data,
        output_dir=Path(raw.get("output_dir") or f"runs/{name}"),
        report_dir=Path(raw.get("report_dir") or Path(raw.get("output_dir") or f"runs/{name}") / "report"),
        grid={k: list(v) for k, v in grid.items()},
        overrides=dict(overrides),
        methods={k: dict(v) for k, v in methods.items()},
        arms={k: dict(v) for k, v in arms.items()},
        metric=metric,
        targets=[float(t) for t in targets],
        slices=list(slices),
        pairs=pairs,
        description=str(raw.get("description") or ""),
        path=path,
    )
    spec.cells()  # validate every cell now: a bad key fails before any run starts
    return spec


def load_spec(path: Path | str) -> StudySpec:
    """Read and validate a study spec YAML file (a path, or the name of a shipped ``study_*`` spec)."""
    p = Path(path)
    if not p.is_file() and not str(path).endswith((".yaml", ".yml")):
        from importlib import resources

        shipped = resources.files("fedlora") / "configs" / f"{path}.yaml"
        if shipped.is_file():
            p = Path(str(shipped))
    try:
        raw = yaml.safe_load(p.read_text())
    except OSError as exc:
        raise StudySpecError(f"{path}: cannot read the study spec ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise StudySpecError(f"{path}: not valid YAML ({exc})") from None
    spec = parse_spec(raw, p.parent, path=p)
    spec.ref = str(path)
    return spec


def cell_filter(spec: StudySpec, only: Mapping[str, list[Any]]) -> Callable[[Cell], bool]:
    """A predicate keeping the cells whose grid value on every axis of ``only`` is one of the listed ones.

    ``only`` maps grid axes to allowed values (``{"seed": [0], "partition.alpha": [0.5]}``): a slice of
    the grid to run first (one seed before the others, the non-IID column on a CPU). An axis that is
    not in the grid, or a value the axis does not have, is a :class:`StudySpecError` naming it.
    """
    for axis, allowed in only.items():
        if axis not in spec.grid:
            raise StudySpecError(f"--only {axis}: not a grid axis of {spec.name} (axes: {', '.join(spec.grid)})")
        missing = [v for v in allowed if v not in spec.grid[axis]]
        if missing:
            have = ", ".join(str(v) for v in spec.grid[axis])
            raise StudySpecError(f"--only {axis}={missing[0]}: not among the grid's values ({have})")
    return lambda cell: all(cell.values[axis] in allowed for axis, allowed in only.items())


__all__ = [
    "Cell",
    "StudySpec",
    "StudySpecError",
    "cell_filter",
    "cell_name",
    "config_digest",
    "load_spec",
    "parse_spec",
    "set_dotted",
]
