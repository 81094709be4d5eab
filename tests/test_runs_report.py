"""fedlora.runs.report on synthetic run folders (no model): plots, run loading, the comparison table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fedlora.runs.report import (
    RunData,
    compare_runs,
    load_run,
    lower_is_better,
    momentum_by_round,
    momentum_series,
    momentum_summary,
    write_plots,
)

MIN_PNG_BYTES = 10_000


def make_records(
    values: list[float | None],
    *,
    metric: str = "exact_match",
    baseline: float | None = 0.12,
    clients: int = 3,
    skipped: tuple[int, ...] = (),
    rejected: tuple[int, ...] = (),
    mb_per_round: float = 2.5,
    extra_metrics: dict[str, list[float | None]] | None = None,
) -> list[dict]:
    """One baseline line (optional) and one line per entry of ``values`` (None: round not evaluated)."""
    records: list[dict] = []
    if baseline is not None:
        ev = {metric: baseline, "n": 50}
        for k, vs in (extra_metrics or {}).items():
            ev[k] = vs[0] if vs[0] is not None else 0.0
        records.append({"round": 0, "phase": "baseline", "eval": ev, "bytes_total": 0, "eval_seconds": 4.0})
    total = 0
    for t, v in enumerate(values, start=1):
        ids = [str(c) for c in range(clients)]
        train = {
            c: {"loss": 2.0 / t + 0.1 * i, "steps": 4, "examples": 16, "seconds": 1.5 + 0.1 * i}
            for i, c in enumerate(ids)
        }
        skip = t in skipped
        up = 0 if skip else int(mb_per_round * 1e6 * 0.4)
        down = 0 if skip else int(mb_per_round * 1e6 * 0.6)
        total += up + down
        rec = {
            "round": t,
            "phase": "train",
            "clients": ids,
            "train": train,
            "train_loss": sum(s["loss"] for s in train.values()) / len(train),
            "rejected": [{"client": "1", "module": "q_proj", "reason": "non-finite"}] if t in rejected else [],
            "skipped": skip,
            "bytes_up": up,
            "bytes_down": down,
            "bytes_total": total,
            "seconds": {"train": 5.0 + t % 2, "aggregate": 0.4, "eval": 3.0 if v is not None else 0.0},
        }
        if not skip:
            rec["report"] = {"tail_energy": 0.01}
        if v is not None:
            rec["eval"] = {metric: v, "n": 50}
            for k, vs in (extra_metrics or {}).items():
                if vs[t] is not None:
                    rec["eval"][k] = vs[t]
        records.append(rec)
    return records


def write_run(
    root: Path, name: str, records: list[dict], *, method: str = "fedavg", summary: bool = True, seconds: float = 42.0
) -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "config.yaml").write_text(f"name: {name}\nmethod:\n  name: {method}\n")
    if summary:
        train = [r for r in records if r.get("phase") == "train"]
        evals = [r["eval"] for r in records if r.get("eval")]
        base = next((r["eval"] for r in records if r.get("phase") == "baseline"), None)
        final = evals[-1] if evals and (not base or evals[-1] is not base) else None
        (run / "summary.json").write_text(
            json.dumps(
                {
                    "name": name,
                    "method": method,
                    "settings": {},
                    "rounds": len(train),
                    "baseline": base,
                    "final": final,
                    "bytes_total": train[-1]["bytes_total"] if train else 0,
                    "seconds": seconds,
                    "rejected": sum(len(r.get("rejected", [])) for r in records),
                    "skipped_rounds": sum(1 for r in records if r.get("skipped")),
                    "protocol": {},
                }
            )
        )
    return run


def assert_png(path: Path, min_w: int = 800, min_h: int = 500) -> tuple[int, int]:
    import matplotlib.image as mpimg

    assert path.is_file(), path
    assert path.stat().st_size > MIN_PNG_BYTES, (path, path.stat().st_size)
    img = mpimg.imread(path)
    h, w = img.shape[:2]
    assert w >= min_w and h >= min_h, (w, h)
    assert img.shape[2] in (3, 4)
    assert img[..., :3].std() > 0.05  # not a blank canvas
    return w, h


def table_row(table: str, name: str) -> list[str]:
    lines = table.splitlines()
    header = next(line for line in lines if line.startswith("run "))
    row = next(line for line in lines if line.split()[:1] == [name])
    cols, cells = header.split(), row.split()
    assert len(cols) == len(cells), (header, row)
    return dict(zip(cols, cells))


# ---- write_plots ----------------------------------------------------------------------------------
def test_write_plots_full_run(tmp_path):
    records = make_records([None, 0.30, None, 0.45, 0.38], skipped=(3,), rejected=(2,))
    paths = write_plots(records, tmp_path, title="demo (fedavg)")
    assert paths == [tmp_path / "curves.png"]
    w, h = assert_png(paths[0])
    assert w > h  # the 13x9 inch 2x2 figure


@pytest.mark.parametrize(
    "records",
    [
        pytest.param(make_records([None, None, None], baseline=None), id="no-eval-at-all"),
        pytest.param(make_records([None, None], baseline=0.2), id="baseline-only"),
        pytest.param(make_records([0.5]), id="single-round"),
        pytest.param(make_records([0.5], baseline=None, clients=1), id="single-round-single-client"),
        pytest.param(make_records([0.1, 0.2, 0.3], skipped=(1, 2, 3)), id="all-skipped"),
        pytest.param(make_records([]), id="baseline-line-only"),
        pytest.param([], id="empty"),
    ],
)
def test_write_plots_edge_cases(tmp_path, records):
    (path,) = write_plots(records, tmp_path / "run", title="edge")
    assert_png(path)


def test_write_plots_odd_records(tmp_path):
    records = make_records([0.2, 0.3, 0.4])
    records[1]["train_loss"] = None  # every client failed
    records[1]["train"] = {}
    records[2]["train"]["0"]["loss"] = math.nan  # a diverged client
    del records[3]["seconds"]
    records[3]["eval"]["accuracy"] = 0.7  # a metric appearing late
    (path,) = write_plots(records, tmp_path, title="odd")
    assert_png(path)


def test_write_plots_metrics_on_different_scales(tmp_path):
    records = make_records(
        [0.2, 0.3, 0.35], extra_metrics={"perplexity": [40.0, 20.0, 12.0, 9.0], "f1": [0.1, 0.2, 0.3, 0.4]}
    )
    (path,) = write_plots(records, tmp_path, title="scales")
    assert_png(path)


def test_write_plots_leaves_pyplot_alone(tmp_path):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    write_plots(make_records([0.2, 0.3]), tmp_path, title="x")
    assert plt.get_fignums() == before


def with_momentum(records: list[dict], *, energy: bool = False, error: bool = True) -> list[dict]:
    """``records`` with a ``momentum`` section in every train line, as the runtime writes it."""
    for r in records:
        if r.get("phase") != "train":
            continue
        t = r["round"]
        r["momentum"] = {
            "update_norm": 0.0 if r["skipped"] else 1.0 / t,
            "update_cosine": None if t == 1 or r["skipped"] else 0.4 + 0.1 * t,
            "path_efficiency": 1.0 - 0.05 * (t - 1),
            "aggregation_error": 10.0 ** (-7 + t) if error and not r["skipped"] else None,
            "client_update_norm": None if r["skipped"] else 1.1 / t,
        }
        if energy and not r["skipped"]:
            r["momentum"]["energy"] = {"kept": 0.6, "merged": 0.3, "dropped": 0.1, "dropped_of_change": 0.2}
    return records


@pytest.mark.parametrize(
    "records",
    [
        pytest.param(with_momentum(make_records([0.2, None, 0.3, 0.4], skipped=(2,))), id="exact-method"),
        pytest.param(with_momentum(make_records([0.2, 0.3, 0.4]), energy=True), id="fedmomentum-energy"),
        pytest.param(with_momentum(make_records([0.2, 0.3]), error=False), id="fedsa-no-error"),
        pytest.param(with_momentum(make_records([0.5])), id="single-round"),
    ],
)
def test_write_plots_draws_the_training_momentum(tmp_path, records):
    paths = write_plots(records, tmp_path, title="momentum")
    assert paths == [tmp_path / "curves.png", tmp_path / "momentum.png"]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert_png(path)


def test_a_run_from_before_momentum_has_no_momentum_plot(tmp_path):
    paths = write_plots(make_records([0.2, 0.3, 0.4]), tmp_path, title="old run")
    assert paths == [tmp_path / "curves.png"] and not (tmp_path / "momentum.png").exists()
    assert_png(paths[0])


def test_momentum_panels_draw_the_recorded_numbers(tmp_path, monkeypatch):
    """The aggregation error on a log axis without its nulls; the energy split when there is one;
    a note, not a crash, where every aggregation error is null."""
    import matplotlib.axes

    drawn: dict[str, list] = {}
    notes: list[str] = []
    original_plot, original_text = matplotlib.axes.Axes.plot, matplotlib.axes.Axes.text

    def plot(self, *args, **kwargs):
        if kwargs.get("label") and len(args) == 2:
            drawn[kwargs["label"]] = [list(args[0]), list(args[1]), self.get_yscale()]
        return original_plot(self, *args, **kwargs)

    def text(self, x, y, s, *args, **kwargs):
        notes.append(s)
        return original_text(self, x, y, s, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", plot)
    monkeypatch.setattr(matplotlib.axes.Axes, "text", text)
    write_plots(with_momentum(make_records([0.2, 0.3, 0.4, 0.5], skipped=(3,))), tmp_path / "a", title="fedex")
    error = next(v for k, v in drawn.items() if k.startswith("‖update − clients' exact mean‖"))
    assert error == [[1, 2, 4], pytest.approx([1e-6, 1e-5, 1e-3]), "log"]
    assert drawn["cos(update t, update t-1)"][:2] == [[2, 4], pytest.approx([0.6, 0.8])]
    assert drawn["‖global update‖"][:2] == [[1, 2, 3, 4], [1.0, 0.5, 0.0, 0.25]]
    assert not any("aggregation error" in n for n in notes)

    drawn.clear()
    write_plots(with_momentum(make_records([0.2, 0.3]), energy=True, error=False), tmp_path / "b", title="fedsa")
    assert drawn["kept in the LoRA"][:2] == [[1, 2], [0.6, 0.6]] and "dropped / the round's change" in drawn
    assert "‖global update‖" not in drawn and not any("exact mean‖ /" in k for k in drawn)
    assert any(n.startswith("no aggregation error recorded") for n in notes)


def test_momentum_readers_skip_nulls_and_old_records():
    records = with_momentum(make_records([0.2, 0.3, 0.4]), energy=True)
    records[2]["momentum"]["aggregation_error"] = None
    records[1]["momentum"]["update_cosine"] = -0.9  # round 1: not in the mean (rounds >= 2)
    del records[3]["momentum"]  # a line without the section
    by_round = momentum_by_round(records)
    assert sorted(by_round) == [1, 2]
    assert by_round[2]["energy.dropped"] == 0.1 and "aggregation_error" not in by_round[2]
    assert by_round[1]["update_cosine"] == -0.9
    assert momentum_series(by_round, "path_efficiency") == [(1, 1.0), (2, 0.95)]
    summary = momentum_summary(by_round)
    assert summary == {
        "aggregation_error": pytest.approx(1e-6),
        "aggregation_error_first": None,  # round 1 of 2 is not in the first quarter
        "aggregation_error_last": None,  # round 2 has no error
        "path_efficiency": 0.95,
        "update_cosine": pytest.approx(0.6),
    }
    assert momentum_by_round(make_records([0.2])) == {}
    assert set(momentum_summary({}).values()) == {None}


def test_momentum_summary_compares_the_first_and_the_last_quarter_of_rounds():
    by_round = {r: {"aggregation_error": 0.01 * r} for r in range(1, 9)}  # 8 rounds, error growing
    summary = momentum_summary(by_round)
    assert summary["aggregation_error_first"] == pytest.approx(0.015)  # rounds 1, 2
    assert summary["aggregation_error_last"] == pytest.approx(0.075)  # rounds 7, 8
    assert summary["aggregation_error"] == pytest.approx(0.045)


# ---- load_run -------------------------------------------------------------------------------------
def test_load_run(tmp_path):
    records = make_records([0.2, 0.4])
    run = write_run(tmp_path, "alpha", records, method="fedmomentum")
    data = load_run(run)
    assert isinstance(data, RunData)
    assert (data.name, data.method, data.path) == ("alpha", "fedmomentum", run)
    assert data.records == records
    assert data.summary["rounds"] == 2
    assert load_run(run / "metrics.jsonl").name == "alpha"


def test_load_run_without_summary_uses_config(tmp_path):
    run = write_run(tmp_path, "beta", make_records([0.2]), method="fedrot", summary=False)
    data = load_run(run)
    assert (data.name, data.method, data.summary) == ("beta", "fedrot", {})


def test_load_run_without_metrics_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no metrics\.jsonl"):
        load_run(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_run(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=r"metrics\.jsonl"):
        compare_runs([tmp_path / "empty"], None)


def test_load_run_partial_last_line_and_corrupt_middle(tmp_path):
    run = write_run(tmp_path, "cut", make_records([0.2, 0.3]), summary=False)
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"round": 3, "phase": "tr')  # killed mid-write
    assert [r["round"] for r in load_run(run).records] == [0, 1, 2]
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[1] = "garbage"
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2"):
        load_run(run)


# ---- compare_runs ---------------------------------------------------------------------------------
def test_compare_reports_final_not_running_max(tmp_path):
    # best != final in both directions, so a running max (or "last best") would show the wrong number
    a = write_run(tmp_path, "peaky", make_records([0.30, 0.55, 0.41, 0.40]), method="fedavg", seconds=10.0)
    b = write_run(tmp_path, "steady", make_records([0.20, None, 0.35, 0.50], rejected=(2, 3)), method="fedmomentum")
    c = write_run(tmp_path, "dips", make_records([0.60, 0.20, 0.25], baseline=None), method="ffa")
    table = compare_runs([a, b, c], None)
    assert "metric: exact_match" in table
    ra, rb, rc = table_row(table, "peaky"), table_row(table, "steady"), table_row(table, "dips")
    assert (ra["FINAL"], ra["best"], ra["best@round"], ra["base"]) == ("0.4000", "0.5500", "2", "0.1200")
    assert (rb["FINAL"], rb["best"], rb["best@round"]) == ("0.5000", "0.5000", "4")
    assert (rc["FINAL"], rc["best"], rc["best@round"], rc["base"]) == ("0.2500", "0.6000", "1", "-")
    assert (ra["method"], ra["rounds"], ra["MB"], ra["seconds"], ra["rejected"]) == (
        "fedavg",
        "4",
        "10.00",
        "10.0",
        "0",
    )
    assert (rb["rejected"], rc["MB"]) == ("2", "7.50")
    # FINAL is the headline column: it comes before best
    header = next(line for line in table.splitlines() if line.startswith("run "))
    assert header.index("FINAL") < header.index("best")
    # rows in the given order, whatever it is
    names = {"peaky", "steady", "dips"}
    for order in ([a, b, c], [b, c, a]):
        rows = [
            ln.split()[0] for ln in compare_runs(order, None).splitlines() if ln.split()[:1] and ln.split()[0] in names
        ]
        assert rows == [p.name for p in order]


def test_compare_loss_like_metric_best_is_min(tmp_path):
    run = write_run(tmp_path, "ppl", make_records([30.0, 12.0, 15.0], metric="perplexity", baseline=50.0))
    row = table_row(compare_runs([run], None), "ppl")
    assert (row["FINAL"], row["best"], row["best@round"]) == ("15.0000", "12.0000", "2")


@pytest.mark.parametrize(
    ("metric", "lower"),
    [
        ("exact_match", False),
        ("accuracy", False),
        ("pass@1", False),
        ("answer_match", False),
        ("eval_loss", True),
        ("perplexity", True),
        ("test_wer", True),
        ("char_error_rate", True),
    ],
)
def test_lower_is_better(metric, lower):
    assert lower_is_better(metric) is lower


def test_compare_different_metrics_get_their_own_columns(tmp_path):
    a = write_run(tmp_path, "math", make_records([0.1, 0.3, 0.2]))
    b = write_run(tmp_path, "cls", make_records([0.6, 0.8, 0.7], metric="accuracy", baseline=0.5))
    table = compare_runs([a, b], None)
    assert "metrics differ" in table
    ra, rb = table_row(table, "math"), table_row(table, "cls")
    cols = ["base", "FINAL", "best", "best@round"]
    assert [ra[f"exact_match:{c}"] for c in cols] == ["0.1200", "0.2000", "0.3000", "2"]
    assert [ra[f"accuracy:{c}"] for c in cols] == ["-"] * 4
    assert [rb[f"exact_match:{c}"] for c in cols] == ["-"] * 4
    assert [rb[f"accuracy:{c}"] for c in cols] == ["0.5000", "0.7000", "0.8000", "2"]


def test_compare_handles_missing_eval_and_missing_summary(tmp_path):
    noeval = write_run(tmp_path, "noeval", make_records([None, None], baseline=None))
    nosummary = write_run(tmp_path, "nosum", make_records([0.2, 0.3, None]), summary=False)
    empty = write_run(tmp_path, "empty", [], summary=False)
    out = tmp_path / "cmp" / "compare.png"
    table = compare_runs([noeval, nosummary, empty], out)
    r0, r1, r2 = table_row(table, "noeval"), table_row(table, "nosum"), table_row(table, "empty")
    assert (r0["FINAL"], r0["best"], r0["rounds"]) == ("-", "-", "2")
    assert (r1["FINAL"], r1["best"], r1["best@round"], r1["rounds"]) == ("0.3000", "0.3000", "2", "3")
    # no summary: wall time is the sum of the recorded phases (baseline eval 4 + train 17 + aggregate 1.2 + eval 6)
    assert r1["seconds"] == "28.2"
    assert (r2["rounds"], r2["MB"], r2["FINAL"]) == ("0", "0.00", "-")
    assert_png(out, min_w=1200, min_h=400)


def test_compare_plot(tmp_path):
    runs = [
        write_run(tmp_path, f"run{i}", make_records([0.1 * i + 0.05 * t for t in range(5)], mb_per_round=1 + i))
        for i in range(1, 4)
    ]
    out = tmp_path / "compare.png"
    table = compare_runs(runs, out)
    assert f"plot: {out}" in table
    w, h = assert_png(out, min_w=1200, min_h=400)
    assert w > 2 * h


def test_write_plots_draws_the_clients_own_models(tmp_path, monkeypatch):
    import matplotlib.axes

    records = make_records([0.2, 0.3, 0.4])
    for r, (w, u) in zip(records[1:], [(0.5, 0.45), (0.6, 0.5), (0.7, 0.65)]):
        r["personal"] = {"weighted": {"exact_match": w}, "unweighted": {"exact_match": u}, "clients": 2}
    drawn: list[tuple[str, list[float]]] = []
    original = matplotlib.axes.Axes.plot

    def spy(self, *args, **kwargs):
        if "clients' own models" in str(kwargs.get("label", "")):
            drawn.append((kwargs["label"], list(args[1])))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    (path,) = write_plots(records, tmp_path, title="fedsa")
    assert_png(path)
    labels = {label: ys for label, ys in drawn}
    assert labels["exact_match: clients' own models, weighted"] == [0.5, 0.6, 0.7]
    assert labels["exact_match: clients' own models, unweighted"] == [0.45, 0.5, 0.65]
    assert len(drawn) == 4  # panel (a) by round and (b) by communication


def test_compare_adds_the_clients_own_models_where_a_run_has_them(tmp_path):
    fedsa = make_records([0.12, 0.12])
    for r, (w, u) in zip(fedsa[1:], [(0.5, 0.4), (0.62, 0.55)]):
        r["personal"] = {"weighted": {"exact_match": w}, "unweighted": {"exact_match": u}, "clients": 3}
    a = write_run(tmp_path, "sa", fedsa, method="fedsa_lora")
    b = write_run(tmp_path, "it", make_records([0.3, 0.4]), method="fedit")
    table = compare_runs([a, b], None)
    ra, rb = table_row(table, "sa"), table_row(table, "it")
    assert (ra["FINAL"], ra["own(w)"], ra["own(u)"]) == ("0.1200", "0.6200", "0.5500")
    assert (rb["FINAL"], rb["own(w)"], rb["own(u)"]) == ("0.4000", "-", "-")
    assert "own(w) / own(u)" in table
    assert "own(w)" not in compare_runs([b], None)


# ---- compare: runs evaluated on different test sets ------------------------------------------------
def _with_protocol(run: Path, protocol: dict, *, file: bool = True) -> Path:
    """Give a synthetic run the protocol a real one records (protocol.json, or only in summary.json)."""
    if file:
        (run / "protocol.json").write_text(json.dumps(protocol))
    else:
        summary = json.loads((run / "summary.json").read_text())
        (run / "summary.json").write_text(json.dumps({**summary, "protocol": protocol}))
    return run


def _math(n_test: int = 4, **settings) -> dict:
    return {
        "task": "math",
        "kind": "causal_lm",
        "seed": 0,
        "settings": {"source": "generated", "n_test": n_test, **settings},
    }


def _warnings(table: str) -> list[str]:
    return [line for line in table.splitlines() if line.startswith("warning:")]


def test_compare_runs_on_the_same_test_set_has_no_warning(tmp_path):
    a = _with_protocol(write_run(tmp_path, "a", make_records([0.2, 0.3])), _math(50))
    b = _with_protocol(write_run(tmp_path, "b", make_records([0.4, 0.5]), method="fedit"), _math(50), file=False)
    c = write_run(tmp_path, "c", make_records([0.1]))  # an old run without a protocol: n still agrees
    assert not _warnings(compare_runs([a, b, c], None))
    assert "warning" not in compare_runs([a], None)


@pytest.mark.parametrize(
    ("other", "n", "detail"),
    [
        (_math(50), 40, "test examples: 50 (a) vs 40 (b)"),
        (_math(50, split_test="validation", split_train="train"), 50, "task.settings.split_test"),
        (_math(50, source="gsm8k.jsonl"), 50, "task.settings.source: generated (a) vs gsm8k.jsonl (b)"),
        ({**_math(50), "seed": 1}, 50, "data seed: 0 (a) vs 1 (b)"),
        ({**_math(50), "task": "instruction"}, 50, "task: math (a) vs instruction (b)"),
        ({**_math(50), "task": "classification", "dataset": "sst2"}, 50, "task: math (a) vs classification (b)"),
    ],
)
def test_compare_warns_when_the_test_sets_differ(tmp_path, other, n, detail):
    a = _with_protocol(write_run(tmp_path, "a", make_records([0.2, 0.3])), _math(50, split_test="test"))
    records = make_records([0.4, 0.5])
    for r in records:
        if r.get("eval"):
            r["eval"]["n"] = n
    b = _with_protocol(
        write_run(tmp_path, "b", records), {**other, "settings": {"split_test": "test", **other["settings"]}}
    )
    table = compare_runs([a, b], None)
    (warning,) = _warnings(table)
    assert "different test sets" in warning and "not comparable" in warning
    assert detail in table
    assert table.index(warning) < table.index("run ")  # before the table, not buried under it


def test_compare_test_set_ignores_training_only_settings(tmp_path):
    a = _with_protocol(write_run(tmp_path, "a", make_records([0.2])), _math(50, n_train=64, max_new_tokens=24))
    b = _with_protocol(write_run(tmp_path, "b", make_records([0.3])), _math(50, n_train=640, max_new_tokens=24))
    assert not _warnings(compare_runs([a, b], None))
    # code evaluates a fixed problem file: its seed and training source do not change it, n_eval does
    code = {"task": "code", "seed": 0, "settings": {"source": "generated", "eval_set": "humaneval", "n_eval": 20}}
    c = _with_protocol(write_run(tmp_path, "c", make_records([0.2])), code)
    d = _with_protocol(write_run(tmp_path, "d", make_records([0.2])), {**code, "seed": 3})
    assert not _warnings(compare_runs([c, d], None))
    e = _with_protocol(
        write_run(tmp_path, "e", make_records([0.2])), {**code, "settings": {**code["settings"], "n_eval": 164}}
    )
    assert "task.settings.n_eval: 20 (c) vs 164 (e)" in compare_runs([c, e], None)
