"""Experiment trackers: TensorBoard, Weights & Biases and MLflow mirror a run folder.

``logging.trackers: [tensorboard, wandb, mlflow]`` sends every ``metrics.jsonl`` record to each
tracker, flattened to its numbers (``eval/accuracy``, ``train/client_0/loss``,
``seconds/train``, ``report/...``; strings and lists are left out), with the round as the step;
the resolved config goes in as hyper-parameters and ``summary.json`` as the run's final values.
Every tracker works offline, writing into the run folder:

* ``tensorboard``: event files in ``<run>/tensorboard/`` (``torch.utils.tensorboard``), the config
  as text and HParams, the summary as text;
* ``wandb``: ``wandb.init(mode="offline", dir=<run>)``, so ``<run>/wandb/offline-run-*/``
  (``wandb sync`` uploads it later; ``logging.wandb_mode=online`` logs live), the summary as the
  run's summary;
* ``mlflow``: a SQLite store ``<run>/mlflow.db`` with artifacts in ``<run>/mlartifacts/`` (MLflow 3
  refuses new file stores) or ``logging.mlflow_uri``; the config as params, the summary as
  ``summary/...`` metrics at the last round and a ``summary.json`` artifact.

Resume. :class:`Trackers` keeps ``<run>/trackers.json`` (written atomically): each tracker's ids
(the W&B run id, the MLflow run id) and the last round it was sent. A resumed run continues the
same TensorBoard folder, W&B run and MLflow run and sends only the rounds after that one; the
engine sends a record after its checkpoint, so a record a killed run wrote but did not checkpoint
(and writes again on resume) never reached a tracker. What a kill can leave behind is settled per
tracker: a resumed TensorBoard writer purges the steps from the next unsent round on, MLflow skips
the rounds its run's history already holds, and W&B, whose service buffers its transaction log
(a SIGKILL loses the rounds it had not written yet), reads the rounds its earlier offline runs
hold back with ``wandb leet inspect --json`` and sends the others again.

This module imports no tracker package at import time and nothing from the engine: the engine
calls it with plain dicts (``fedlora.engine.rounds``); the config check asks
:func:`missing_packages` before anything loads.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import secrets
import shutil
import time
from pathlib import Path
from typing import Any, Protocol

from fedlora import atomic

log = logging.getLogger("fedlora")

STATE_FILE = "trackers.json"
# tracker -> (module, pip package) pairs it needs
PACKAGES: dict[str, tuple[tuple[str, str], ...]] = {
    "tensorboard": (("tensorboard", "tensorboard"),),
    "wandb": (("wandb", "wandb"),),
    "mlflow": (("mlflow", "mlflow-skinny"), ("sqlalchemy", "sqlalchemy"), ("alembic", "alembic")),
}
# what each tracker writes into the run folder (cleared when a run starts afresh there)
OUTPUTS = ("tensorboard", "wandb", "mlflow.db", "mlartifacts", STATE_FILE)


def tracker_names() -> list[str]:
    return list(PACKAGES)


def missing_packages(name: str) -> list[str]:
    """The pip packages tracker ``name`` needs that are not installed."""
    return [pip for module, pip in PACKAGES[name] if importlib.util.find_spec(module) is None]


def flatten(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of a (nested) record under ``/``-joined keys; booleans as 0/1, the rest left out."""
    out: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "/"))
        elif isinstance(value, (bool, int, float)):
            out[name] = float(value)
    return out


def flatten_params(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as ``.``-joined keys (the config's own dotted names) with scalar values;
    lists and empty dicts as their JSON text."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten_params(value, name + "."))
        elif isinstance(value, (list, tuple, dict)):
            out[name] = json.dumps(value)
        elif value is None:
            out[name] = "null"
        else:
            out[name] = value
    return out


class Tracker(Protocol):
    """One backend. ``start`` gets the resolved config, the run folder and, on resume, what it
    returned when the run began plus ``logged`` (the last round sent; ``None`` for a fresh run),
    and returns the ids to keep for a resume (and ``logged``, where the backend knows better what
    it holds); ``log`` gets each ``metrics.jsonl`` record once,
    in order, with its round as ``step``; ``summary`` gets ``summary.json`` once at the end;
    ``close(ok)`` ends the run (``ok``: it finished)."""

    name: str

    def start(self, config: dict[str, Any], run_dir: Path, resume: dict[str, Any] | None) -> dict[str, Any]: ...

    def log(self, record: dict[str, Any], step: int) -> None: ...

    def summary(self, summary: dict[str, Any], step: int) -> None: ...

    def close(self, ok: bool) -> None: ...


class TensorBoardTracker:
    name = "tensorboard"

    def start(self, config: dict[str, Any], run_dir: Path, resume: dict[str, Any] | None) -> dict[str, Any]:
        from torch.utils.tensorboard import SummaryWriter

        # a resumed writer purges the steps from the next unsent round on (a write a kill cut short)
        purge = int(resume.get("logged", -1)) + 1 if resume is not None else None
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge)
        if resume is None:
            from torch.utils.tensorboard.summary import hparams

            self.writer.add_text("config", _code(json.dumps(config, indent=2)), 0)
            params = {
                k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flatten_params(config).items()
            }
            for summary in hparams(params, {}):
                self.writer.file_writer.add_summary(summary)
        return {}

    def log(self, record: dict[str, Any], step: int) -> None:
        for key, value in flatten(record).items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def summary(self, summary: dict[str, Any], step: int) -> None:
        self.writer.add_text("summary", _code(json.dumps(summary, indent=2)), step)
        self.writer.flush()

    def close(self, ok: bool) -> None:
        self.writer.close()


class WandbTracker:
    name = "wandb"

    def __init__(self, project: str, run_name: str, mode: str = "offline") -> None:
        self.project, self.run_name, self.mode = project, run_name, mode

    def start(self, config: dict[str, Any], run_dir: Path, resume: dict[str, Any] | None) -> dict[str, Any]:
        import wandb

        run_id = resume.get("id") if resume else None
        run_id = run_id or secrets.token_hex(4)  # W&B's id shape: 8 lowercase characters
        settings = wandb.Settings(
            silent=True,
            console="off",
            x_disable_stats=True,
            disable_git=True,
            save_code=False,
            x_save_requirements=False,
        )
        self.run = wandb.init(
            project=self.project,
            name=self.run_name,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            mode=self.mode,  # type: ignore[arg-type]
            config=config,
            settings=settings,
            reinit="create_new",
        )
        if resume and self.mode == "offline":
            # W&B's service buffers its transaction log: a killed run may have lost rounds it was
            # sent, so the rounds it holds are read back from the log, not from trackers.json
            return {"id": run_id, "logged": _wandb_last_step(run_dir / "wandb", run_id)}
        return {"id": run_id}

    def log(self, record: dict[str, Any], step: int) -> None:
        self.run.log(flatten(record), step=step)

    def summary(self, summary: dict[str, Any], step: int) -> None:
        self.run.summary.update(flatten(summary))

    def close(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)


class MlflowTracker:
    name = "mlflow"

    def __init__(self, project: str, run_name: str, uri: str = "") -> None:
        self.project, self.run_name, self.uri = project, run_name, uri

    def start(self, config: dict[str, Any], run_dir: Path, resume: dict[str, Any] | None) -> dict[str, Any]:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = self.uri or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
        self.client = MlflowClient(tracking_uri=uri)
        self.floor = -1  # rounds the run's history already holds (a resumed run skips them)
        if resume and resume.get("run_id"):
            self.run_id = resume["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            history = self.client.get_metric_history(self.run_id, "round")
            self.floor = max((m.step for m in history), default=-1)
            return {"run_id": self.run_id}
        experiment = self.client.get_experiment_by_name(self.project)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            where = None if self.uri else (run_dir / "mlartifacts").resolve().as_uri()
            experiment_id = self.client.create_experiment(self.project, artifact_location=where)
        self.run_id = self.client.create_run(experiment_id, run_name=self.run_name).info.run_id
        params = [Param(k, str(v)) for k, v in flatten_params(config).items()]
        for i in range(0, len(params), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=params[i : i + 100])
        return {"run_id": self.run_id}

    def _metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in values.items() if math.isfinite(v)]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def log(self, record: dict[str, Any], step: int) -> None:
        if step > self.floor:
            self._metrics(flatten(record), step)

    def summary(self, summary: dict[str, Any], step: int) -> None:
        self._metrics(flatten(summary, "summary/"), step)
        self.client.log_dict(self.run_id, summary, "summary.json")

    def close(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


class Trackers:
    """The run's trackers, and the state that lets a resumed run continue them (module docstring)."""

    def __init__(
        self,
        names: list[str],
        *,
        run_name: str,
        project: str = "",
        wandb_mode: str = "offline",
        mlflow_uri: str = "",
    ) -> None:
        project = project or run_name
        make = {
            "tensorboard": lambda: TensorBoardTracker(),
            "wandb": lambda: WandbTracker(project, run_name, wandb_mode),
            "mlflow": lambda: MlflowTracker(project, run_name, mlflow_uri),
        }
        self.trackers: list[Tracker] = [make[n]() for n in names]
        self.started: list[Tracker] = []
        self.state: dict[str, dict[str, Any]] = {}

    def start(self, config: dict[str, Any], run_dir: Path, resume: bool) -> None:
        """Start each tracker: a fresh run clears the folder's tracker outputs of an earlier run
        there (as ``metrics.jsonl`` is rewritten); a resumed one continues them."""
        self.path = run_dir / STATE_FILE
        saved: dict[str, Any] = {}
        if resume and self.path.is_file():
            try:
                saved = json.loads(self.path.read_text())
            except ValueError as exc:
                log.warning("ignoring unreadable %s: %s", self.path, exc)
        if not resume:
            for name in OUTPUTS:
                target = run_dir / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
        for tracker in self.trackers:
            before = saved.get(tracker.name) if resume else None
            ids = tracker.start(config, run_dir, before)
            self.started.append(tracker)
            logged = before.get("logged", -1) if before else -1
            self.state[tracker.name] = {"logged": logged, **ids}  # a tracker may know better (W&B)
        if self.trackers:
            self._save()

    def log(self, record: dict[str, Any]) -> None:
        """Send one ``metrics.jsonl`` record to each tracker that has not had its round yet."""
        step = int(record.get("round", 0))
        for tracker in self.started:
            state = self.state[tracker.name]
            if step <= state["logged"]:
                continue
            try:
                tracker.log(record, step)
            except Exception as exc:  # a tracker must never stop a run
                log.warning("%s: logging round %d failed: %s", tracker.name, step, exc)
                continue
            state["logged"] = step
            self._save()

    def summary(self, summary: dict[str, Any]) -> None:
        step = int(summary.get("rounds", 0))
        for tracker in self.started:
            try:
                tracker.summary(summary, step)
            except Exception as exc:
                log.warning("%s: logging the summary failed: %s", tracker.name, exc)

    def close(self, ok: bool) -> None:
        for tracker in self.started:
            try:
                tracker.close(ok)
            except Exception as exc:
                log.warning("%s: closing failed: %s", tracker.name, exc)
        self.started = []

    def _save(self) -> None:
        atomic.write_json(self.path, self.state)


def _wandb_last_step(folder: Path, run_id: str) -> int:
    """The last step the offline runs ``<folder>/offline-run-*-<run_id>`` hold (-1: none), read
    with W&B's reader of its transaction log, ``wandb leet inspect --json``."""
    import subprocess
    import sys

    exe = Path(sys.executable).with_name("wandb")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "wandb"]
    last = -1
    for run in sorted(folder.glob(f"offline-run-*-{run_id}")):
        done = subprocess.run([*cmd, "leet", "inspect", "--json", str(run)], capture_output=True, text=True)
        if done.returncode != 0:
            log.warning("wandb: cannot read %s (%s); rounds may repeat", run, done.stderr.strip()[-300:])
            continue
        for line in done.stdout.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a record torn by a kill
            if record.get("type") == "history":
                last = max(last, int(record["history"].get("step", {}).get("num", -1)))
    return last


def _code(text: str) -> str:
    """Markdown code block (TensorBoard renders text summaries as Markdown)."""
    return "```\n" + text + "\n```"
