"""A study's report: per grid slice, a method table (mean ± std over seeds) and curves; all numbers in JSON.

For every cell the headline is the metric at the FINAL evaluated round (never the running max:
picking the best round on the test set is an evaluation bug). Per (slice, method) over seeds:

* final value: mean ± sample standard deviation (n - 1 in the denominator; ``n`` shown);
* speed: the mean of the metric over the evaluated rounds (the area under the metric-vs-round
  curve divided by its length) and, with ``report.target`` (one number or several), the first round
  and cumulative MB at which the metric reaches each target (the mean over the seeds that reached
  it, and how many did);
* communication: total bytes up + down of the run, in MB;
* paired comparisons (``report.pairs``): for a pair (a, b), over the seeds where both finished
  (the same seed is the same data, partition and client sampling), the mean paired difference
  Δ = a − b of the final value and of the mean over rounds, and how often a was better, tied and
  worse (W-T-L, "better" in the metric's direction);
* a personalised metric (any eval key or record section whose name contains ``personal``, e.g.
  FedSA-LoRA's clients' own models) when the runtime records one;
* a method's client report (``client_report`` in the records, e.g. FedSmoothLoRA's
  ``rm_dropped``): each number's mean over the rounds that report it.
* training momentum (``momentum`` in the records, :mod:`fedlora.engine.momentum`), when recorded:
  the mean aggregation error over rounds, the final path efficiency and the mean update cosine
  over rounds >= 2 (:func:`fedlora.runs.report.momentum_summary`), in a "Training momentum" table.

A study may be run over several machines (run folders are not tracked; the report is): a cell with
no run folder here keeps the numbers the previous ``report.json`` of the same study holds for it,
provided it was made with the same config (the cell's digest, :attr:`Cell.digest`; entries written
before digests were recorded are taken as this spec's). Such cells are marked ``carried``; a run
folder, when present, always wins.

Plots (one PNG per slice): metric vs round and metric vs cumulative MB, one line per method (the
mean over seeds) with a ±1 std band, the untuned base model at round 0; where the cells recorded
momentum, ``<slice>_momentum.png`` too: aggregation error (log axis), path efficiency and update
cosine vs round, one mean line per method. Reading runs and the plotting style are
:mod:`fedlora.runs.report`'s; nothing here needs torch.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedlora import atomic
from fedlora.runs.report import (
    MB,
    MOMENTUM_KEYS,
    MOMENTUM_SUMMARY,
    STYLE,
    _note,
    baseline_metrics,
    eval_series,
    fmt_value,
    int_ticks,
    load_run,
    lower_is_better,
    metrics_of,
    momentum_by_round,
    momentum_series,
    momentum_summary,
    new_figure,
    primary_metric,
    train_records,
    use_agg_backend,
)
from fedlora.study.run import ERROR_FILE, cell_state
from fedlora.study.spec import Cell, StudySpec, cell_name

PNG_DPI = 80
log = logging.getLogger("fedlora.study")


# ---- numbers --------------------------------------------------------------------------------------
def mean_std(values: Sequence[float]) -> tuple[float | None, float | None, int]:
    """``(mean, sample std, n)`` of the finite ``values``; std is ``None`` for fewer than two."""
    xs = [float(v) for v in values if v is not None and math.isfinite(v)]
    n = len(xs)
    if n == 0:
        return None, None, 0
    mean = sum(xs) / n
    if n < 2:
        return mean, None, n
    return mean, math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)), n


def fmt_mean_std(mean: float | None, std: float | None, digits: int = 3, fmt: str | None = None) -> str:
    """``0.812 ± 0.010``; just the mean when there is no std; ``-`` when there is nothing. ``fmt``: a
    format spec for both numbers instead of ``digits`` decimals (``".2e"``: ``1.20e-07 ± 3.00e-08``)."""
    if mean is None:
        return "-"
    fmt = fmt or f".{digits}f"
    return f"{mean:{fmt}}" if std is None else f"{mean:{fmt}} ± {std:{fmt}}"


def reach(curve: Sequence[tuple[int, float, float]], target: float, lower: bool) -> tuple[int, float] | None:
    """(round, cumulative MB) of the first point of ``curve`` (round, MB, value) that reaches ``target``."""
    for rnd, mb, v in curve:
        if math.isfinite(v) and (v <= target if lower else v >= target):
            return rnd, mb
    return None


@dataclass
class CellResult:
    """One cell read back: its status and, when it has records, its curve of the study's metric."""

    name: str
    method: str
    seed: int
    values: dict[str, Any]
    status: str  # finished | partial | failed | missing
    baseline: float | None = None
    curve: list[tuple[int, float, float]] = field(default_factory=list)  # (round, cumulative MB, value)
    final: float | None = None
    final_round: int | None = None
    mb_total: float | None = None
    seconds: float | None = None
    personal: dict[str, float] = field(default_factory=dict)
    client_report: dict[str, float] = field(default_factory=dict)  # mean over the rounds reporting it
    # round -> its training momentum numbers (MOMENTUM_SUMMARY's keys, where recorded); {} before them
    momentum: dict[int, dict[str, float]] = field(default_factory=dict)
    error: str | None = None
    digest: str | None = None  # the cell's config digest (Cell.digest) when it was read
    carried: bool = False  # read from the previous report.json: its run folder is not here

    @property
    def auc(self) -> float | None:
        vs = [v for *_, v in self.curve if math.isfinite(v)]
        return sum(vs) / len(vs) if vs else None

    @property
    def roughness(self) -> float | None:
        """Mean absolute change of the metric between consecutive evaluated rounds (0 = smooth)."""
        vs = [v for *_, v in self.curve if math.isfinite(v)]
        return sum(abs(b - a) for a, b in itertools.pairwise(vs)) / (len(vs) - 1) if len(vs) > 1 else None


def _personal(record: dict[str, Any], metric: str | None) -> dict[str, float]:
    """Personalised values of ``metric`` in one record (e.g. FedSA-LoRA's clients' own models).

    Eval keys whose name contains ``personal``, and in a record section named ``personal*`` every
    sub-dict (``weighted``, ``unweighted``; not ``per_client``) holding ``metric``, named
    ``<section>.<sub>.<metric>``.
    """
    out = {k: v for k, v in metrics_of(record.get("eval")).items() if "personal" in k}
    for key, value in record.items():
        if "personal" not in key or not isinstance(value, dict):
            continue
        for sub, inner in value.items():
            nums = metrics_of(inner) if sub != "per_client" else {}
            if metric in nums:
                out[f"{key}.{sub}.{metric}"] = nums[metric]
    return out


def read_cell(cell: Cell, metric: str | None) -> tuple[CellResult, str | None]:
    """Read one cell's run folder; returns the result and the metric it found (when none was given)."""
    res = CellResult(cell.name, cell.method, cell.seed, dict(cell.values), "missing", digest=cell.digest)
    run_dir = cell.run_dir
    if (run_dir / ERROR_FILE).is_file():
        lines = (run_dir / ERROR_FILE).read_text().strip().splitlines()
        res.status, res.error = "failed", (lines[-1] if lines else "failed")
    if not (run_dir / "metrics.jsonl").is_file():
        return res, metric
    run = load_run(run_dir)
    metric = metric or primary_metric(run.records, run.summary)
    if res.status != "failed":
        res.status = "finished" if cell_state(cell) == "finished" else "partial"
    train = train_records(run.records)
    if metric:
        res.baseline = baseline_metrics(run.records).get(metric)
        res.curve = [(r, mb, v) for r, mb, v in eval_series(train, metric)]
        if res.curve:
            res.final_round, _, res.final = res.curve[-1]
    res.mb_total = max((float(r.get("bytes_total") or 0) for r in train), default=0.0) / MB
    secs = run.summary.get("seconds")
    res.seconds = float(secs) if isinstance(secs, (int, float)) else None
    for r in train:
        p = _personal(r, metric)
        if p:
            res.personal = p
    reported: dict[str, list[float]] = {}
    for r in train:
        for k, v in metrics_of(r.get("client_report")).items():
            reported.setdefault(k, []).append(v)
    res.client_report = {k: sum(v) / len(v) for k, v in reported.items()}
    res.momentum = _momentum_numbers(momentum_by_round(run.records).items())
    return res, metric


def _momentum_numbers(by_round: Any) -> dict[int, dict[str, float]]:
    """Round -> the :data:`MOMENTUM_KEYS` numbers of ``by_round`` ((round, numbers) pairs, read from
    the records or from a report.json, whose keys are strings); rounds without any are left out."""
    out = {int(r): {k: float(v) for k, v in nums.items() if k in MOMENTUM_KEYS} for r, nums in by_round}
    return {r: nums for r, nums in sorted(out.items()) if nums}


def previous_cells(spec: StudySpec) -> tuple[str | None, dict[str, dict[str, Any]]]:
    """The metric and the finished cells (by name) of the report.json already in ``spec.report_dir``
    for this study; nothing when there is none, it is another study's or it cannot be read."""
    path = spec.report_dir / "report.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None, {}
    except (OSError, ValueError) as exc:
        log.warning("study %s: cannot read the previous %s (%s): no cells carried over", spec.name, path, exc)
        return None, {}
    if not isinstance(data, dict) or data.get("study") != spec.name or not isinstance(data.get("cells"), list):
        return None, {}
    cells = {c["name"]: c for c in data["cells"] if isinstance(c, dict) and c.get("status") == "finished"}
    return data.get("metric"), cells


def carried_cell(cell: Cell, entry: dict[str, Any] | None) -> CellResult | None:
    """A finished cell of the previous report, for ``cell`` whose run folder is not here: only when it
    was made with the same config (same digest; an entry written before digests were recorded is
    taken as this spec's, which wrote it) and the same grid values."""
    if entry is None or entry.get("values") != cell.values:
        return None
    if entry.get("digest") not in (None, cell.digest):
        return None  # the spec changed since: the old numbers are not this cell's
    try:
        return CellResult(
            cell.name,
            cell.method,
            cell.seed,
            dict(cell.values),
            "finished",
            baseline=entry.get("baseline"),
            curve=[(int(r), float(mb), float(v)) for r, mb, v in entry.get("curve") or []],
            final=entry.get("final"),
            final_round=entry.get("final_round"),
            mb_total=entry.get("mb_total"),
            seconds=entry.get("seconds"),
            personal=dict(entry.get("personal") or {}),
            client_report=dict(entry.get("client_report") or {}),
            momentum=_momentum_numbers((entry.get("momentum") or {}).items()),
            digest=cell.digest,
            carried=True,
        )
    except (TypeError, ValueError, AttributeError):
        return None


@dataclass
class Group:
    """One (slice, method) over seeds: only finished cells count."""

    slice: dict[str, Any]
    method: str
    n: int
    seeds: list[int]
    final_mean: float | None
    final_std: float | None
    auc_mean: float | None
    auc_std: float | None
    baseline_mean: float | None
    mb_total: float | None
    seconds_mean: float | None
    rough_mean: float | None = None
    # per report target (its f"{t:g}"): (mean rounds to reach it, mean MB, seeds that reached it)
    to_target: dict[str, tuple[float | None, float | None, int]] = field(default_factory=dict)
    personal: dict[str, tuple[float | None, float | None, int]] = field(default_factory=dict)
    client_report: dict[str, tuple[float | None, float | None, int]] = field(default_factory=dict)
    momentum: dict[str, tuple[float | None, float | None, int]] = field(default_factory=dict)  # MOMENTUM_SUMMARY's


def summarise(
    cells: Sequence[CellResult], slices: Sequence[str], methods: Sequence[str], targets: Sequence[float], lower: bool
) -> list[Group]:
    """One :class:`Group` per (slice value combination, method) that has at least one cell."""
    groups: list[Group] = []
    keys: dict[tuple, dict[str, Any]] = {}
    for c in cells:
        keys.setdefault(tuple(repr(c.values.get(s)) for s in slices), {s: c.values.get(s) for s in slices})
    for key, sl in keys.items():
        for m in methods:
            mine = [c for c in cells if c.method == m and tuple(repr(c.values.get(s)) for s in slices) == key]
            if not mine:
                continue
            done = [c for c in mine if c.status == "finished" and c.final is not None]
            fm, fs, n = mean_std([c.final for c in done])
            am, asd, _ = mean_std([c.auc for c in done])
            bm, _, _ = mean_std([c.baseline for c in done if c.baseline is not None])
            mbm, _, _ = mean_std([c.mb_total for c in done if c.mb_total is not None])
            sm, _, _ = mean_std([c.seconds for c in done if c.seconds is not None])
            g = Group(sl, m, n, sorted(c.seed for c in done), fm, fs, am, asd, bm, mbm, sm)
            g.rough_mean = mean_std([c.roughness for c in done])[0]
            for target in targets if done else []:
                hits = [h for h in (reach(c.curve, target, lower) for c in done) if h]
                g.to_target[f"{target:g}"] = (
                    mean_std([h[0] for h in hits])[0],
                    mean_std([h[1] for h in hits])[0],
                    len(hits),
                )
            names = sorted({k for c in done for k in c.personal})
            g.personal = {k: mean_std([c.personal[k] for c in done if k in c.personal]) for k in names}
            names = sorted({k for c in done for k in c.client_report})
            g.client_report = {k: mean_std([c.client_report[k] for c in done if k in c.client_report]) for k in names}
            runs = [momentum_summary(c.momentum) for c in done if c.momentum]
            g.momentum = {k: mean_std([r[k] for r in runs]) for k in MOMENTUM_SUMMARY} if runs else {}
            groups.append(g)
    return groups


@dataclass
class Paired:
    """One claimed ordering (a over b) in one slice, over the seeds where both cells finished."""

    slice: dict[str, Any]
    a: str
    b: str
    n: int
    final_diff: float | None  # mean of a - b at the final round
    final_wtl: tuple[int, int, int]  # seeds where a is better, tied, worse
    auc_diff: float | None  # mean of a - b of the mean over rounds
    auc_wtl: tuple[int, int, int]


def _signed(x: float, digits: int = 3) -> str:
    """``+0.033`` / ``-0.200``; a difference that rounds to zero is ``+0.000``, never ``-0.000``."""
    return f"{round(x, digits) + 0.0:+.{digits}f}"


def _wtl(diffs: Sequence[float], lower: bool) -> tuple[int, int, int]:
    better = [-d if lower else d for d in diffs]
    return sum(d > 0 for d in better), sum(d == 0 for d in better), sum(d < 0 for d in better)


def compare_pair(cells: Sequence[CellResult], a: str, b: str, sl: dict[str, Any], lower: bool) -> Paired:
    """Paired comparison of methods ``a`` and ``b`` in slice ``sl`` (cells matched by seed)."""

    def finished(method: str) -> dict[int, CellResult]:
        return {
            c.seed: c
            for c in cells
            if c.method == method
            and c.status == "finished"
            and c.final is not None
            and all(repr(c.values.get(k)) == repr(v) for k, v in sl.items())
        }

    ca, cb = finished(a), finished(b)
    seeds = sorted(set(ca) & set(cb))
    final = [ca[s].final - cb[s].final for s in seeds]  # type: ignore[operator]
    auc = [ca[s].auc - cb[s].auc for s in seeds if ca[s].auc is not None and cb[s].auc is not None]  # type: ignore[operator]
    return Paired(sl, a, b, len(seeds), mean_std(final)[0], _wtl(final, lower), mean_std(auc)[0], _wtl(auc, lower))


# ---- the report -----------------------------------------------------------------------------------
@dataclass
class StudyReport:
    """Everything :func:`build_report` computed; :meth:`markdown` and :meth:`to_json` render it."""

    spec: StudySpec
    metric: str | None
    lower: bool
    cells: list[CellResult]
    groups: list[Group]
    methods: list[str]
    plots: dict[str, Path] = field(default_factory=dict)
    momentum_plots: dict[str, Path] = field(default_factory=dict)  # by slice name, as plots
    pairs: list[Paired] = field(default_factory=list)

    def slice_keys(self, finished_only: bool = False) -> list[dict[str, Any]]:
        """The slices in grid order; ``finished_only``: those with at least one finished cell."""
        seen: dict[str, dict[str, Any]] = {}
        for g in self.groups:
            seen.setdefault(slice_name(g.slice), g.slice)
        if finished_only:
            done = {slice_name(g.slice) for g in self.groups if g.n}
            return [v for k, v in seen.items() if k in done]
        return list(seen.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "study": self.spec.name,
            "spec": self.spec.ref or (str(self.spec.path) if self.spec.path else None),
            "base": self.spec.base,
            "overrides": self.spec.overrides,
            "grid": self.spec.grid,
            "methods_overrides": self.spec.methods,
            "arms": self.spec.arms,
            "metric": self.metric,
            "direction": "lower is better" if self.lower else "higher is better",
            "targets": self.spec.targets,
            "headline": "value at the final evaluated round (not the running max); mean and sample std over seeds",
            "cells": [asdict(c) | {"auc": c.auc, "roughness": c.roughness} for c in self.cells],
            "groups": [asdict(g) for g in self.groups],
            "pairs": [asdict(p) for p in self.pairs],
            "plots": {k: str(v) for k, v in self.plots.items()},
            "momentum_plots": {k: str(v) for k, v in self.momentum_plots.items()},
        }

    def markdown(self, image_prefix: str = "", heading: str = "#") -> str:
        """A ``docs/results.md``-ready report (images linked as ``image_prefix + file name``)."""
        spec, metric = self.spec, self.metric or "metric"
        direction = "lower is better" if self.lower else "higher is better"
        counts = {s: sum(c.status == s for c in self.cells) for s in ("finished", "partial", "failed", "missing")}
        ref = spec.ref or (str(spec.path) if spec.path else "SPEC")
        out = [f"{heading} Study `{spec.name}`", ""]
        if spec.description:
            out += [spec.description.strip(), ""]
        out += [
            f"- base config: `{spec.base}`; overrides: "
            + (", ".join(f"`{k}={_inline(v)}`" for k, v in spec.overrides.items()) or "none"),
            "- grid: " + "; ".join(f"`{k}` ∈ {{{', '.join(_inline(v) for v in vs)}}}" for k, vs in spec.grid.items()),
        ]
        if spec.methods:
            out.append("- per-method overrides: " + _named_overrides(spec.methods))
        if spec.arms:
            out.append("- arms (grouped and paired by name): " + _named_overrides(spec.arms))
        out += [
            f"- cells: {len(self.cells)} ({counts['finished']} finished, {counts['partial']} unfinished, "
            f"{counts['failed']} failed, {counts['missing']} not run); only finished cells enter the tables"
            + (
                f"; {carried} finished cells were carried over from the previous report.json (their run "
                "folders are not on the machine that wrote this report)"
                if (carried := sum(c.carried for c in self.cells))
                else ""
            ),
            f"- metric: **{metric}** ({direction}), the value at the FINAL round (never the best round), "
            "mean ± sample std over seeds (n = seeds finished)",
            "- speed: `mean over rounds` = area under the metric-vs-round curve / rounds"
            + (
                f"; rounds / MB to reach {metric} {'≤' if self.lower else '≥'} "
                + " and ".join(f"{t:g}" for t in spec.targets)
                + " (mean over the seeds that reached it, k/n reached)"
                if spec.targets
                else ""
            ),
            "- smoothness: `mean abs. change / round` = mean |metric(t) − metric(t−1)| over rounds 1..R "
            "(lower = smoother), mean over seeds",
            "- MB = total bytes communicated up + down over the run, in 10^6 bytes",
            f"- regenerate this report: `fedlora study --report-only {ref}`; run the missing cells: "
            f"`fedlora study {ref}`",
            "",
        ]
        slices = self.slice_keys(finished_only=True)
        empty = [s for s in self.slice_keys() if s not in slices]
        if len(slices) > 1:
            out += [f"{heading}# Overview: final {metric} (mean ± std over seeds)", ""]
            head = ["method"] + [slice_label(s) for s in slices]
            rows = []
            for m in self.methods:
                row = [m]
                for s in slices:
                    g = self._group(s, m)
                    row.append(f"{fmt_mean_std(g.final_mean, g.final_std)} (n={g.n})" if g and g.n else "-")
                rows.append(row)
            base_row = ["untuned base"]
            for s in slices:
                bs = [g.baseline_mean for g in self.groups if slice_name(g.slice) == slice_name(s) and g.baseline_mean]
                base_row.append(f"{sum(bs) / len(bs):.3f}" if bs else "-")
            rows.append(base_row)
            out += [*_md_table(head, rows), ""]
        if self.pairs:
            out += self._pairs_markdown(slices, heading)
        for s in slices:
            label = slice_label(s) or "all cells"
            out += [f"{heading}# {label}", ""]
            png = self.plots.get(slice_name(s))
            if png is not None:
                out += [f"![{metric} vs round and vs MB, {label}]({image_prefix}{png.name})", ""]
            png = self.momentum_plots.get(slice_name(s))
            if png is not None:
                out += [f"![training momentum vs round, {label}]({image_prefix}{png.name})", ""]
            personal = sorted({k for g in self.groups if slice_name(g.slice) == slice_name(s) for k in g.personal})
            reported = sorted({k for g in self.groups if slice_name(g.slice) == slice_name(s) for k in g.client_report})
            head = ["method", f"final {metric}", "n", "mean over rounds", "mean abs. change / round"]
            if len(spec.targets) == 1:
                head += ["rounds to target", "MB to target"]
            else:
                head += [f"{what} to {t:g}" for t in spec.targets for what in ("rounds", "MB")]
            head += ["MB total", "s / run"] + [f"{k} (final)" for k in personal]
            head += [f"{k} (mean over rounds)" for k in reported]
            rows = []
            for m in self.methods:
                g = self._group(s, m)
                if g is None:
                    continue
                row = [m, fmt_mean_std(g.final_mean, g.final_std), str(g.n), fmt_mean_std(g.auc_mean, g.auc_std)]
                row.append(fmt_value(g.rough_mean, 3))
                for t in spec.targets:
                    rounds, mb, reached = g.to_target.get(f"{t:g}", (None, None, 0))
                    if reached:
                        row += [f"{rounds:.1f} ({reached}/{g.n})", f"{mb:,.1f}"]
                    else:
                        row += [f"not reached (0/{g.n})", "-"]
                row += [f"{g.mb_total:,.1f}" if g.mb_total is not None else "-", fmt_value(g.seconds_mean, 0)]
                for k in personal:
                    pm, ps, pn = g.personal.get(k, (None, None, 0))
                    row.append(f"{fmt_mean_std(pm, ps)} (n={pn})" if pn else "-")
                for k in reported:
                    rm, rs, rn = g.client_report.get(k, (None, None, 0))
                    row.append(fmt_mean_std(rm, rs) if rn else "-")
                rows.append(row)
            bs = [g.baseline_mean for g in self.groups if slice_name(g.slice) == slice_name(s) and g.baseline_mean]
            if bs:
                out += [f"Untuned base model: {metric} {sum(bs) / len(bs):.3f}.", ""]
            out += [*_md_table(head, rows), ""]
            out += self._momentum_markdown(s, heading)
        bad = [c for c in self.cells if c.status in ("failed", "partial")]
        if bad:
            out += [f"{heading}# Cells not in the tables", ""]
            why = {"partial": "unfinished (still running, or killed: `fedlora study` resumes it)", "failed": "failed"}
            out += [f"- `{c.name}`: {why[c.status]}" + (f" ({c.error})" if c.error else "") for c in bad]
            out.append("")
        missing = [c for c in self.cells if c.status == "missing"]
        if missing:
            out += [
                f"{len(missing)} cells were not run: "
                + ", ".join(f"`{c.name}`" for c in missing[:12])
                + (", …" if len(missing) > 12 else ""),
                "",
            ]
        if empty:
            out += ["Slices with no finished cell yet (no table, no plot): " + "; ".join(map(slice_label, empty)), ""]
        return "\n".join(out)

    def _pairs_markdown(self, slices: list[dict[str, Any]], heading: str) -> list[str]:
        metric = self.metric or "metric"
        out = [
            f"{heading}# Paired comparisons: a over b, same seed (same data, partition and client sampling)",
            "",
            f"Each entry: mean Δ = a − b of the final {metric} and of its mean over rounds, then how many seeds "
            f"a was better, tied, worse (W-T-L; {'lower' if self.lower else 'higher'} is better).",
            "",
        ]
        head = ["a over b"] + [slice_label(s) or "all cells" for s in slices]
        rows = []
        for a, b in self.spec.pairs:
            row = [f"{a} over {b}"]
            for s in slices:
                p = next((p for p in self.pairs if (p.a, p.b) == (a, b) and slice_name(p.slice) == slice_name(s)), None)
                if p is None or not p.n:
                    row.append("-")
                    continue
                row.append(
                    f"final {_signed(p.final_diff)} ({'-'.join(map(str, p.final_wtl))}); "
                    f"mean {_signed(p.auc_diff)} ({'-'.join(map(str, p.auc_wtl))})"
                    if p.final_diff is not None and p.auc_diff is not None
                    else "-"
                )
            rows.append(row)
        return [*out, *_md_table(head, rows), ""]

    def _momentum_markdown(self, s: dict[str, Any], heading: str) -> list[str]:
        """Slice ``s``'s "Training momentum" table (nothing when no cell of it recorded momentum)."""
        groups = self.momentum_groups(s)
        if not groups:
            return []
        out = [
            f"{heading}## Training momentum",
            "",
            "Per round (`momentum` in the records): the cosine of consecutive global updates, the path "
            "efficiency ‖Σ updates‖ / Σ ‖updates‖ (1 = a straight path) and the aggregation error "
            "‖update − exact mean of the clients' updates‖ / ‖exact mean‖ (about 1e-7 for exact methods, "
            "unknown where the uploads do not determine the clients' updates); mean ± std over seeds "
            "(n = seeds that recorded it).",
            "",
        ]
        head = ["method", "n", *(label for label, _ in MOMENTUM_SUMMARY.values())]
        rows = []
        for g in groups:
            n = max(k for _, _, k in g.momentum.values())
            row = [g.method, str(n)]
            row += [fmt_mean_std(*g.momentum[k][:2], fmt=fmt) for k, (_, fmt) in MOMENTUM_SUMMARY.items()]
            rows.append(row)
        return [*out, *_md_table(head, rows), ""]

    def momentum_groups(self, s: dict[str, Any]) -> list[Group]:
        """Slice ``s``'s groups (in method order) with training momentum numbers."""
        return [g for m in self.methods if (g := self._group(s, m)) is not None and g.momentum]

    def _group(self, s: dict[str, Any], method: str) -> Group | None:
        key = slice_name(s)
        return next((g for g in self.groups if g.method == method and slice_name(g.slice) == key), None)


def slice_name(values: dict[str, Any]) -> str:
    return cell_name(values) if values else "all"


def _named_overrides(named: dict[str, dict[str, Any]]) -> str:
    """``name: `key=value`, ...; name: ...`` (per-method overrides, arms)."""
    return "; ".join(f"{n}: " + ", ".join(f"`{k}={_inline(v)}`" for k, v in o.items()) for n, o in named.items())


def slice_label(values: dict[str, Any]) -> str:
    """``alpha = 0.5, num_clients = 3`` (the last part of each dotted key)."""
    return ", ".join(f"{k.rsplit('.', 1)[-1]} = {_inline(v)}" for k, v in values.items())


def _inline(v: Any) -> str:
    return json.dumps(v) if isinstance(v, (dict, list)) else str(v)


def _md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


# ---- plots ----------------------------------------------------------------------------------------
def _mean_by_round(series: Sequence[dict[int, float]]) -> list[tuple[int, float, float]]:
    """(round, mean, std) over ``series`` (round -> value, one per cell) at the rounds every one of
    them has, where some value is finite."""
    out = []
    for rnd in sorted(set().union(*series)) if series else []:
        if all(rnd in one for one in series):
            m, s, _ = mean_std([one[rnd] for one in series])
            if m is not None:
                out.append((rnd, m, s or 0.0))
    return out


def _mean_curve(cells: Sequence[CellResult]) -> list[tuple[int, float, float, float]]:
    """(round, mean MB, mean, std) over ``cells`` at the rounds every one of them evaluated."""
    mbs = {r: m for r, m, _ in _mean_by_round([{r: mb for r, mb, _ in c.curve} for c in cells])}
    return [(r, mbs[r], m, s) for r, m, s in _mean_by_round([{r: v for r, _, v in c.curve} for c in cells])]


def _finished(report: StudyReport, s: dict[str, Any], method: str) -> list[CellResult]:
    """The finished cells of ``method`` in slice ``s``."""
    key = slice_name(s)
    return [
        c
        for c in report.cells
        if c.method == method and c.status == "finished" and slice_name({k: c.values.get(k) for k in s}) == key
    ]


_ARM_LINESTYLES = ("-", "--", ":", "-.")


def _arm_split(methods: Sequence[str]) -> list[tuple[str, str]] | None:
    """``(method, arm)`` per name when every name is ``<method>@<arm>`` (a study with named arms
    and a method axis), else ``None``."""
    split = [m.split("@", 1) for m in methods]
    return [(p[0], p[1]) for p in split] if methods and all(len(p) == 2 for p in split) else None


def method_styles(methods: Sequence[str]) -> dict[str, tuple[tuple[float, ...], str]]:
    """A colour and a line style per method name, no two alike while there are at most 20 names
    (or 20 methods x 4 arms). Names of the form ``<method>@<arm>`` (a study with named arms) get a
    colour per method and a line style per arm, so each method's arms read as one family and each
    arm as one dash pattern; other names get a colour each (tab10, tab20 beyond 10)."""
    import matplotlib

    pairs = _arm_split(methods) or [(m, "") for m in methods]
    families = list(dict.fromkeys(f for f, _ in pairs))
    arms = list(dict.fromkeys(a for _, a in pairs))
    palette = matplotlib.colormaps["tab10" if len(families) <= 10 else "tab20"]
    return {
        m: (palette(families.index(f) % palette.N), _ARM_LINESTYLES[arms.index(a) % len(_ARM_LINESTYLES)])
        for m, (f, a) in zip(methods, pairs)
    }


def _legend_columns(methods: Sequence[str], entries: int) -> int:
    """Legend columns for ``entries`` lines: for ``<method>@<arm>`` names (listed arm by arm) a
    column per arm, one row per method, and a last column for what follows (the untuned base);
    else up to 6."""
    pairs = _arm_split(methods)
    if pairs:
        return max(1, math.ceil(entries / len({f for f, _ in pairs})))
    return min(6, max(1, entries))


def plot_slice(report: StudyReport, s: dict[str, Any], out: Path) -> Path:
    """``out``: metric vs round and vs cumulative MB for one slice, a line (mean) + band (±std) per method."""
    use_agg_backend()
    import matplotlib
    from matplotlib.ticker import FuncFormatter, NullFormatter

    styles = method_styles(report.methods)
    metric = report.metric or "metric"
    with matplotlib.rc_context(STYLE):
        fig, axes = new_figure(1, 2, (12, 5.0))
        a, b = axes[0]
        bases = []
        for m in report.methods:
            done = _finished(report, s, m)
            curve = _mean_curve(done)
            if not curve:
                continue
            bases += [c.baseline for c in done if c.baseline is not None]
            color, ls = styles[m]
            rs, mbs, ms, ss = zip(*curve)
            lo = [x - y for x, y in zip(ms, ss)]
            hi = [x + y for x, y in zip(ms, ss)]
            label = f"{m} (n={len(done)})"
            b.plot(mbs, ms, lw=1.6, ls=ls, marker="o", ms=3, color=color, label=label)
            b.fill_between(mbs, lo, hi, color=color, alpha=0.12, lw=0)
            base_m = mean_std([c.baseline for c in done if c.baseline is not None])[0]
            if base_m is not None:  # round 0: the untuned base model, before any byte was sent
                rs, ms, lo, hi = (0, *rs), (base_m, *ms), (base_m, *lo), (base_m, *hi)
            a.plot(rs, ms, lw=1.6, ls=ls, marker="o", ms=3, color=color, label=label)
            a.fill_between(rs, lo, hi, color=color, alpha=0.12, lw=0)
        if bases:
            base = sum(bases) / len(bases)
            for ax in (a, b):
                ax.axhline(base, ls="--", lw=1.1, color="0.4", label="untuned base" if ax is a else None)
        a.set(title=f"{metric} by round", xlabel="round (0 = untuned base)", ylabel=metric)
        int_ticks(a)
        b.set(title=f"{metric} by communication", xlabel="cumulative MB, up + down (log scale)", ylabel=metric)
        b.set_xscale("log")
        b.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
        b.xaxis.set_minor_formatter(NullFormatter())
        _finish_slice_figure(fig, a, report, s, out)
    return out


def _finish_slice_figure(fig, ax, report: StudyReport, s: dict[str, Any], out: Path) -> None:
    """One legend (``ax``'s lines) under the panels, the slice as the title; save to ``out``."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        from matplotlib.lines import Line2D

        ncols = _legend_columns(report.methods, len(handles))
        blank = -len(handles) % ncols  # fill the grid: matplotlib evens out columns, shifting entries
        handles += [Line2D([], [], alpha=0.0)] * blank
        labels += [""] * blank
        fig.legend(handles, labels, loc="outside lower center", ncols=ncols, fontsize=8)
    fig.suptitle(f"{report.spec.name}: {slice_label(s) or 'all cells'} (mean ± std over seeds)", fontsize=11)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic.save_figure(out, fig, dpi=PNG_DPI)


# momentum key -> (panel title, y label, log axis)
_MOMENTUM_PANELS = {
    "aggregation_error": ("aggregation error vs the clients' exact mean", "relative error (log scale)", True),
    "path_efficiency": ("path efficiency (1 = a straight path)", "‖Σ updates‖ / Σ ‖updates‖", False),
    "update_cosine": ("cosine of consecutive global updates", "cosine", False),
}


def plot_slice_momentum(report: StudyReport, s: dict[str, Any], out: Path) -> Path:
    """``out``: one slice's training momentum against round, a line (mean over seeds) + band (±std,
    on the linear axes) per method: aggregation error (log axis), path efficiency, update cosine."""
    use_agg_backend()
    import matplotlib

    styles = method_styles(report.methods)
    with matplotlib.rc_context(STYLE):
        fig, axes = new_figure(1, len(_MOMENTUM_PANELS), (15, 4.6))
        for ax, (key, (title, ylabel, log_axis)) in zip(axes[0], _MOMENTUM_PANELS.items()):
            for m in report.methods:
                color, ls = styles[m]
                done = [c for c in _finished(report, s, m) if c.momentum]
                curve = _mean_by_round([dict(momentum_series(c.momentum, key)) for c in done])
                curve = [(r, v, sd) for r, v, sd in curve if v > 0 or not log_axis]
                if curve:
                    rs, ms, ss = zip(*curve)
                    ax.plot(rs, ms, lw=1.6, ls=ls, marker="o", ms=3, color=color, label=f"{m} (n={len(done)})")
                    if not log_axis:
                        lo, hi = [x - y for x, y in zip(ms, ss)], [x + y for x, y in zip(ms, ss)]
                        ax.fill_between(rs, lo, hi, color=color, alpha=0.12, lw=0)
            if ax.lines and log_axis:
                ax.set_yscale("log")
            if not ax.lines:
                _note(ax, f"no {key.replace('_', ' ')} recorded")
            ax.set(title=title, xlabel="round", ylabel=ylabel)
            int_ticks(ax)
        _finish_slice_figure(fig, axes[0][1], report, s, out)  # every run with momentum has a path efficiency
    return out


def build_report(spec: StudySpec, extra: dict[str, Any] | None = None, *, plots: bool = True) -> StudyReport:
    """Read every cell of ``spec`` and compute the report (plots written to ``spec.report_dir``)."""
    cells = spec.cells(extra)
    metric = spec.metric
    results = []
    for c in cells:
        res, found = read_cell(c, metric)
        metric = metric or found
        results.append(res)
    if spec.metric is None and metric is not None:  # cells read before the metric was known
        results = [read_cell(c, metric)[0] for c in cells]
    old_metric, old_cells = previous_cells(spec)
    if old_cells and old_metric is not None and metric in (None, old_metric):
        metric = old_metric  # cells whose run folders are elsewhere keep the numbers their report holds
        for i, c in enumerate(cells):
            if results[i].status == "missing":
                results[i] = carried_cell(c, old_cells.get(c.name)) or results[i]
    lower = lower_is_better(metric) if metric else False
    methods = list(dict.fromkeys(c.method for c in cells))
    groups = summarise(results, spec.slices, methods, spec.targets, lower)
    report = StudyReport(spec, metric, lower, results, groups, methods)
    done = report.slice_keys(finished_only=True)
    report.pairs = [compare_pair(results, a, b, s, lower) for a, b in spec.pairs for s in done]
    if plots:
        for s in report.slice_keys():
            png = spec.report_dir / f"{slice_name(s)}.png"
            momentum_png = spec.report_dir / f"{slice_name(s)}_momentum.png"
            if s in done:
                report.plots[slice_name(s)] = plot_slice(report, s, png)
            else:
                png.unlink(missing_ok=True)  # an earlier report's plot of cells that are gone
            if s in done and report.momentum_groups(s):
                report.momentum_plots[slice_name(s)] = plot_slice_momentum(report, s, momentum_png)
            else:
                momentum_png.unlink(missing_ok=True)
    return report


def write_report(spec: StudySpec, extra: dict[str, Any] | None = None) -> StudyReport:
    """Write ``report.md``, ``report.json`` and one PNG per slice into ``spec.report_dir``."""
    report = build_report(spec, extra)
    spec.report_dir.mkdir(parents=True, exist_ok=True)
    atomic.write_text(spec.report_dir / "report.md", report.markdown())
    atomic.write_text(spec.report_dir / "report.json", json.dumps(report.to_json(), indent=1, default=str) + "\n")
    return report


__all__ = [
    "CellResult",
    "Group",
    "Paired",
    "StudyReport",
    "build_report",
    "compare_pair",
    "fmt_mean_std",
    "mean_std",
    "reach",
    "write_report",
]
