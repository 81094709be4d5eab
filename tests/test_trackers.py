"""logging.trackers: TensorBoard event files, a W&B offline run and an MLflow store, read back,
hold what metrics.jsonl holds (each round once, also across a resume), the config as
hyper-parameters and summary.json's values; a tracker that is not installed is a ConfigError."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from fedlora.configs import preset_path
from fedlora.engine import faults
from fedlora.engine.config import ConfigError, load_config
from fedlora.engine.local import run_experiment
from fedlora.runs.trackers import STATE_FILE, flatten, flatten_params, missing_packages
from helpers import tiny_llama

ALL = ["tensorboard", "wandb", "mlflow"]
installed = pytest.mark.skipif(
    any(missing_packages(n) for n in ALL), reason="needs tensorboard, wandb, mlflow-skinny (fedlora[trackers])"
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(autouse=True)
def _wandb_home(tmp_path, monkeypatch):
    """W&B's own settings and caches go to the test's folder, never the user's."""
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)


def config(tmp_path, model, name: str, trackers=ALL, **sets):
    base = {
        "output_dir": str(tmp_path),
        "name": name,
        "model.name": str(model),
        "task.settings": "{n_train: 24, n_test: 2, max_new_tokens: 4, max_length: 64}",
        "rounds.num_rounds": "2",
        "train.max_steps": "1",
        "logging.trackers": json.dumps(trackers),
    }
    return load_config(preset_path("ci"), {**base, **sets})


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def expected(run: Path) -> dict[str, dict[int, float]]:
    """key -> {round: value} of every number in metrics.jsonl."""
    out: dict[str, dict[int, float]] = {}
    for record in metrics(run):
        for k, v in flatten(record).items():
            out.setdefault(k, {})[record["round"]] = v
    return out


# ---- readers ----------------------------------------------------------------------------------
def tensorboard_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def tensorboard_text(run: Path, tag: str) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    return [e.tensor_proto.string_val[0].decode() for e in acc.Tensors(f"{tag}/text_summary")]


def wandb_records(run: Path) -> list[dict]:
    """Every record of the run's offline W&B runs (a resume adds one), via W&B's documented
    reader of its transaction log, ``wandb leet inspect --json``."""
    out = []
    for folder in sorted((run / "wandb").glob("offline-run-*")):
        exe = Path(sys.executable).with_name("wandb")
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "wandb"]
        done = subprocess.run([*cmd, "leet", "inspect", "--json", str(folder)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        out += [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    return out


def wandb_history(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        if r["type"] != "history":
            continue
        step = int(r["history"]["step"]["num"])
        for k, v in r["history"]["item"].items():
            if not k.startswith("_"):
                out.setdefault(k, []).append((step, float(v)))
    return out


def mlflow_run(run: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    run_id = json.loads((run / STATE_FILE).read_text())["mlflow"]["run_id"]
    return client, client.get_run(run_id)


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6)  # TensorBoard keeps float32


# ---- tests ------------------------------------------------------------------------------------
@installed
def test_each_tracker_holds_metrics_jsonl_the_config_and_the_summary(tmp_path, tiny):
    cfg = config(tmp_path, tiny, "all")
    summary = run_experiment(cfg, progress=False)
    run = cfg.run_dir
    want = expected(run)
    assert [r["round"] for r in metrics(run)] == [0, 1, 2]
    assert {"eval/exact_match", "train_loss", "bytes_up", "bytes_total", "seconds/train"} <= set(want)
    assert any(k.startswith("train/") and k.endswith("/loss") for k in want)

    tb = tensorboard_scalars(run)
    assert set(tb) == set(want)
    for key, values in want.items():
        got = dict(tb[key])
        assert len(tb[key]) == len(got) == len(values), key
        assert all(close(got[r], v) for r, v in values.items()), key
    assert json.loads(tensorboard_text(run, "config")[0].strip("`\n")) == cfg.to_dict()
    assert json.loads(tensorboard_text(run, "summary")[0].strip("`\n")) == summary

    records = wandb_records(run)
    history = wandb_history(records)
    assert set(history) == set(want)
    for key, values in want.items():
        assert [s for s, _ in history[key]] == sorted(values), key
        assert all(close(v, values[s]) for s, v in history[key]), key
    runs = [r["run"] for r in records if r["type"] == "run"]
    assert runs[0]["config"]["update"]["train"]["lr"] == cfg.train.lr
    assert runs[0]["config"]["update"]["logging"]["trackers"] == ALL
    summaries = {}
    for r in records:
        if r["type"] == "summary":
            summaries.update(r["summary"].get("update", {}))
    assert summaries["final/exact_match"] == summary["final"]["exact_match"]
    assert summaries["bytes_total"] == summary["bytes_total"]

    client, mlrun = mlflow_run(run)
    assert mlrun.info.status == "FINISHED" and mlrun.info.run_name == cfg.name
    assert mlrun.data.params == {k: str(v) for k, v in flatten_params(cfg.to_dict()).items()}
    for key, values in want.items():
        hist = sorted((m.step, m.value) for m in client.get_metric_history(mlrun.info.run_id, key))
        assert hist == sorted(values.items()), key
    assert mlrun.data.metrics["summary/final/exact_match"] == summary["final"]["exact_match"]
    saved = Path(client.download_artifacts(mlrun.info.run_id, "summary.json", str(tmp_path)))
    assert json.loads(saved.read_text()) == summary


@installed
def test_a_resumed_run_continues_each_tracker_and_holds_each_round_once(tmp_path, tiny, monkeypatch):
    cfg = config(tmp_path, tiny, "resumed", **{"rounds.num_rounds": "3"})
    real = faults.fault

    def stop(event, round_, client_index=None):
        if event == "after_checkpoint" and round_ == 2:
            raise KeyboardInterrupt  # an interruption after round 2 reached the trackers
        real(event, round_, client_index)

    monkeypatch.setattr(faults, "fault", stop)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, progress=False)
    monkeypatch.setattr(faults, "fault", real)
    run = cfg.run_dir
    state = json.loads((run / STATE_FILE).read_text())
    assert {state[n]["logged"] for n in ALL} == {2}
    # a kill between a tracker's write and trackers.json's: rounds 1-2 look unsent to TensorBoard
    # and MLflow, which must not hold them twice
    state["tensorboard"]["logged"] = state["mlflow"]["logged"] = 0
    (run / STATE_FILE).write_text(json.dumps(state))
    ids = (state["wandb"]["id"], state["mlflow"]["run_id"])

    run_experiment(cfg, resume=True, progress=False)
    state = json.loads((run / STATE_FILE).read_text())
    assert (state["wandb"]["id"], state["mlflow"]["run_id"]) == ids
    assert {state[n]["logged"] for n in ALL} == {3}
    want = expected(run)
    assert [r["round"] for r in metrics(run)] == [0, 1, 2, 3]

    tb = tensorboard_scalars(run)
    for key, values in want.items():
        assert [s for s, _ in tb[key]] == sorted(values), key
        assert all(close(v, values[s]) for s, v in tb[key]), key

    records = wandb_records(run)
    assert len(list((run / "wandb").glob("offline-run-*"))) == 2
    assert {r["run"]["run_id"] for r in records if r["type"] == "run"} == {ids[0]}
    history = wandb_history(records)
    for key, values in want.items():
        assert [s for s, _ in history[key]] == sorted(values), key

    client, mlrun = mlflow_run(run)
    assert mlrun.info.status == "FINISHED"
    for key, values in want.items():
        steps = [m.step for m in client.get_metric_history(ids[1], key)]
        assert sorted(steps) == sorted(values), key


@installed
def test_a_fresh_run_in_the_same_folder_replaces_the_trackers_outputs(tmp_path, tiny):
    cfg = config(tmp_path, tiny, "again", trackers=["tensorboard"], **{"rounds.num_rounds": "1"})
    run_experiment(cfg, progress=False)
    first = sorted((cfg.run_dir / "tensorboard").iterdir())
    run_experiment(cfg, progress=False)
    second = sorted((cfg.run_dir / "tensorboard").iterdir())
    assert len(first) == len(second) == 1 and first != second
    assert [s for s, _ in tensorboard_scalars(cfg.run_dir)["bytes_total"]] == [0, 1]


def test_no_trackers_write_nothing(tmp_path, tiny):
    cfg = config(tmp_path, tiny, "none", trackers=[], **{"rounds.num_rounds": "1", "rounds.eval_baseline": "false"})
    run_experiment(cfg, progress=False)
    assert not any((cfg.run_dir / n).exists() for n in ("tensorboard", "wandb", "mlflow.db", STATE_FILE))


@pytest.mark.parametrize(
    ("tracker", "module", "package"),
    [("tensorboard", "tensorboard", "tensorboard"), ("wandb", "wandb", "wandb"), ("mlflow", "mlflow", "mlflow-skinny")],
)
def test_a_tracker_that_is_not_installed_is_an_error_naming_the_key_and_the_package(
    monkeypatch, tracker, module, package
):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))
    with pytest.raises(ConfigError, match=rf"logging\.trackers: {tracker} needs the {package} package"):
        load_config(preset_path("ci"), {"logging.trackers": f"[{tracker}]"})


def test_unknown_or_repeated_trackers_are_errors():
    with pytest.raises(ConfigError, match=r"logging\.trackers: unknown tracker 'comet'; use tensorboard, wandb"):
        load_config(preset_path("ci"), {"logging.trackers": "[comet]"})
    if not missing_packages("tensorboard"):
        with pytest.raises(ConfigError, match="named twice"):
            load_config(preset_path("ci"), {"logging.trackers": "[tensorboard, tensorboard]"})
    assert load_config(preset_path("ci")).logging.trackers == []


def test_flatten_keeps_numbers_under_slash_joined_keys():
    record = {
        "round": 2,
        "phase": "train",
        "clients": ["a", "b"],
        "skipped": False,
        "train": {"a": {"loss": 1.5, "steps": 2}},
        "eval": {"exact_match": 0.25},
        "train_loss": None,
    }
    assert flatten(record) == {
        "round": 2.0,
        "skipped": 0.0,
        "train/a/loss": 1.5,
        "train/a/steps": 2.0,
        "eval/exact_match": 0.25,
    }
    assert flatten_params({"a": {"b": 1, "c": [1, 2], "d": {}}, "e": None}) == {
        "a.b": 1,
        "a.c": "[1, 2]",
        "a.d": "{}",
        "e": "null",
    }


@installed
@pytest.mark.drill  # a real SIGKILL of `fedlora run` and a resume (~45 s): run with `pytest -m drill`
def test_sigkill_after_a_checkpoint_and_resume_hold_each_round_once(tmp_path, tiny):
    """A real kill (``FEDLORA_FAULT``: SIGKILL right after round 1's checkpoint and trackers), then
    ``fedlora run --resume``: the W&B offline run and MLflow run go on, no round twice."""
    import os

    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true"}
    env.pop("WANDB_SERVICE", None)  # an earlier test's W&B service: each process gets its own, as from a shell
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"), env.get("PYTHONPATH", "")])
    sets = {
        "output_dir": str(tmp_path),
        "name": "killed",
        "model.name": str(tiny),
        "task.settings": "{n_train: 24, n_test: 2, max_new_tokens: 4, max_length: 64}",
        "rounds.num_rounds": "2",
        "train.max_steps": "1",
        "logging.trackers": "[tensorboard, wandb, mlflow]",
    }
    args = [sys.executable, "-m", "fedlora.cli", "run", "--preset", "ci", "--no-progress"]
    args += [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    killed = subprocess.run(args, capture_output=True, text=True, env={**env, "FEDLORA_FAULT": "after_checkpoint:1"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    run = tmp_path / "killed"
    assert {v["logged"] for v in json.loads((run / STATE_FILE).read_text()).values()} == {1}
    resumed = subprocess.run(
        [sys.executable, "-m", "fedlora.cli", "run", "--resume", str(run), "--no-progress"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    want = expected(run)
    assert [r["round"] for r in metrics(run)] == [0, 1, 2]
    tb, history = tensorboard_scalars(run), wandb_history(wandb_records(run))
    client, mlrun = mlflow_run(run)
    for key, values in want.items():
        assert [s for s, _ in tb[key]] == sorted(values), key
        assert [s for s, _ in history[key]] == sorted(values), key
        assert sorted(m.step for m in client.get_metric_history(mlrun.info.run_id, key)) == sorted(values), key
    assert mlrun.info.status == "FINISHED"
