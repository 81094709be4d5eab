"""The round engine: rounds of sampled clients, one global state, one base model on the server.

One round, as data::

    server state --(trainer: each sampled client)--> method.client_start -> local training
      -> method.client_finish -> upload (+ the client's record: memory, optimizer, cursor)
      -> screen_uploads (bad ones rejected by client and module)
      -> method.aggregate -> new global state + backbone delta (applied once, kept in a ledger)
      -> server optimizer on the averaged factors, if ``server.optimizer`` (methods/server_opt.py)
      -> momentum diagnostics of the global update (``engine/momentum.py``)
      -> evaluation (the global model; also each client's own model for methods with
         client-local parts, see ``engine/personal.py``) -> metrics.jsonl line -> atomic checkpoint

Who trains the clients is the runtime's one decision, behind the public seam of
:mod:`fedlora.engine.trainer` (:class:`~fedlora.engine.local.LocalTrainer` in this process,
:class:`~fedlora.flower.server_app.FlowerTrainer` on Flower SuperNodes); everything else above is
this module's, the same for every runtime. The engine holds no method-specific code: what differs
between methods lives in ``fedlora.methods``. Everything needed to continue is checkpointed after
every round (global factors, method state, the server optimizer's moments, the ledger of backbone
deltas, client records, data cursors, RNG state, the trainer's own state), so ``--resume`` after a
kill at any moment finishes with the same metrics as an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

from fedlora import atomic
from fedlora.engine import faults
from fedlora.engine.checkpoint import (
    factors_from_tree,
    factors_tree,
    ledger_from_tree,
    ledger_tree,
    load_checkpoint,
    record_from_tree,
    record_tree,
    save_checkpoint,
)
from fedlora.engine.client import ClientRecord
from fedlora.engine.config import Config, clients_per_round
from fedlora.engine.momentum import MomentumTracker, initial_tracker
from fedlora.engine.personal import evaluate_personal, personal_enabled
from fedlora.engine.privacy import (
    NoisePlan,
    check_resumed_budget,
    plan_noise,
    private_aggregate,
    record_round,
    spend_report,
)
from fedlora.engine.setup import (
    build_binding,
    build_run_method,
    device_for,
    personal_test_sets,
    prepare_data,
    sample_clients,
)
from fedlora.engine.trainer import ClientTrainer
from fedlora.lowrank import FactoredDelta, svd_device
from fedlora.methods import GlobalState, Method
from fedlora.methods.server_opt import server_step
from fedlora.methods.validation import screen_uploads
from fedlora.privacy import PrivacyLedger
from fedlora.progress import Progress, quiet_library_bars, terminal_width, tracking
from fedlora.runs.trackers import Trackers

log = logging.getLogger("fedlora")


class RoundEngine:
    """A federated fine-tuning run: rounds of the config's method, local training by ``trainer``
    (see the module docstring; the public attributes a trainer reads are listed in
    :mod:`fedlora.engine.trainer`)."""

    def __init__(self, cfg: Config, trainer: ClientTrainer, *, progress: bool = True) -> None:
        self.cfg = cfg
        self.trainer = trainer
        self.run_dir = cfg.run_dir
        self.progress_mode = "auto" if progress else "off"
        self.method: Method = build_run_method(cfg)
        if cfg.rounds.personal_eval == "on" and not trainer.holds_client_records:
            raise ValueError(
                f"rounds.personal_eval=on: the {trainer.name} runtime does not evaluate personal models "
                "(clients' memories stay with the clients); use auto or off"
            )
        self.personal = personal_enabled(cfg.rounds.personal_eval, self.method) and trainer.holds_client_records
        self.device = device_for(cfg.model.device)
        # the run's state, set by run(): fresh or restored from the checkpoint
        self.state: GlobalState
        self.ledger: list[dict[str, FactoredDelta]] = []
        self.clients: dict[str, ClientRecord] = {}
        self.global_extras: dict[str, torch.Tensor] = {}
        self.server_opt: dict[str, torch.Tensor] = {}  # the server optimizer's moments (methods/server_opt.py)
        self.noise: NoisePlan | None = None  # privacy.mode's resolved noise (engine/privacy.py), set up with the data
        self.spend = PrivacyLedger(cfg.privacy.accountant)  # the DP steps taken so far
        self.bytes_total = 0
        self.momentum: MomentumTracker | None = None  # rounds.momentum's running sums (engine/momentum.py)

    # ---- set-up -------------------------------------------------------------------------------
    def _setup(self) -> None:
        from fedlora.data.partition import partition_report, plot_partition

        cfg = self.cfg
        p = cfg.partition
        log.info("preparing data: task %s, %d clients (%s partition)", cfg.task.name, p.num_clients, p.scheme)
        data = prepare_data(cfg)
        log.info("data: %d train, %d test examples", len(data.train), len(data.test))
        self.task, self.train_examples, self.test_examples = data.task, data.train, data.test
        self.parts = data.parts
        self.client_ids = data.client_ids
        self.noise = plan_noise(cfg, data.sizes)  # before the model: a budget it cannot meet costs nothing
        if self.noise is not None:
            n = self.noise
            log.info(
                "privacy: %s-level DP, noise multiplier %s, clip %g, epsilon %.4g at delta %g over the run (%s)",
                n.mode,
                f"{n.sigma_min:.4g}-{n.sigma:.4g} (per client)" if n.mode == "sample" else f"{n.sigma:.4g}",
                n.clip,
                n.planned_epsilon,
                n.delta,
                n.accountant,
            )
        self.personal_sets = personal_test_sets(cfg, data) if self.personal else {}
        report = partition_report(data.groups, self.parts)
        atomic.write_json(self.run_dir / "partition.json", report)
        try:
            plot_partition(report, self.run_dir / "partition.png")
        except Exception as exc:  # a plot must never stop a run
            log.warning("partition plot failed: %s", exc)
        if self.progress_mode != "off" and terminal_width(sys.stderr) == 0:
            quiet_library_bars()  # a log gets fedlora's lines, not transformers' redrawn bars
        log.info("loading model %s (%s) on %s", cfg.model.name, cfg.model.dtype, self.device)
        t = time.perf_counter()
        self.tokenizer, self.binding = build_binding(cfg, self.device)
        self.global_extras = self.binding.extras()
        base = sum(p.numel() for p in self.binding.model.parameters())
        log.info(
            "model ready in %.0f s: %.0fM parameters%s, LoRA rank %d on %d modules, backbone deltas: %s",
            time.perf_counter() - t,
            base / 1e6,
            f" ({cfg.model.quantization})" if cfg.model.quantization != "none" else "",
            cfg.lora.rank,
            len(self.binding.layers),
            self.binding.backbone_mode,
        )

    # ---- state --------------------------------------------------------------------------------
    def _initial_state(self) -> GlobalState:
        return GlobalState(round=0, factors=self.binding.get_factors(), spec=self.binding.spec)

    def _checkpoint(self, metrics_lines: int) -> None:
        s = self.state
        save_checkpoint(
            self.run_dir / "checkpoint",
            {
                "round": s.round,
                "factors": factors_tree(s.factors),
                "method_state": s.method_state,
                "server_opt": self.server_opt,
                "privacy": self.spend.to_dict(),
                "ledger": ledger_tree(self.ledger),
                "momentum": self.momentum.to_tree() if self.momentum is not None else None,
                "clients": {c: record_tree(r) for c, r in self.clients.items()},
                "extras": self.global_extras,
                "bytes_total": self.bytes_total,
                "metrics_lines": metrics_lines,
                "torch_rng": torch.get_rng_state(),
                "elapsed": self.elapsed + (time.perf_counter() - self.t0),
                "runtime": self.trainer.checkpoint_state(),
            },
        )

    def _restore(self) -> int:
        ck = load_checkpoint(self.run_dir / "checkpoint")
        self.state = GlobalState(
            round=ck["round"],
            factors=factors_from_tree(ck["factors"]),
            spec=self.binding.spec,
            method_state=ck["method_state"],
        )
        self.server_opt = ck.get("server_opt") or {}  # absent from checkpoints written before it
        if ck.get("privacy"):
            self.spend = PrivacyLedger.from_dict(ck["privacy"])
        self.ledger = ledger_from_tree(ck["ledger"])
        for deltas in self.ledger:
            self.binding.apply_delta(deltas)  # replay, in order: same float ops as the original run
        self.momentum = None
        if self.cfg.rounds.momentum:
            if ck.get("momentum"):
                self.momentum = MomentumTracker.from_tree(ck["momentum"], self.ledger)
            else:
                log.warning("the checkpoint has no momentum sums (written without rounds.momentum): none logged")
        self.clients = {c: record_from_tree(r) for c, r in ck["clients"].items()}
        self.global_extras = ck["extras"]
        self.bytes_total = ck["bytes_total"]
        self.elapsed = ck["elapsed"]
        torch.set_rng_state(ck["torch_rng"])
        self.trainer.restore(ck.get("runtime") or {})
        return int(ck["metrics_lines"])

    # ---- evaluation ---------------------------------------------------------------------------
    def _eval_progress(self, what: str) -> Progress:
        """Progress of one evaluation (the task's batched loops report into it)."""
        return Progress(desc=f"evaluating {what}", unit="example", mode=self.progress_mode, leave=False, position=1)

    def _evaluate(self) -> dict[str, float]:
        self.binding.set_factors(self.state.factors)
        if self.global_extras:
            self.binding.set_extras(self.global_extras)
        self.binding.model.eval()
        with torch.no_grad(), tracking(self._eval_progress(f"round {self.state.round}")):
            return self.task.evaluate(self.binding.model, self.tokenizer, self.test_examples)

    def _evaluate_personal(self) -> dict[str, Any]:
        """Each trained client's own model on its matched test set (see ``engine/personal.py``)."""
        with tracking(self._eval_progress(f"round {self.state.round}: clients' own models")):
            return evaluate_personal(
                self.binding,
                self.method,
                self.state,
                self.clients,
                self.task,
                self.tokenizer,
                self.test_examples,
                self.personal_sets,
                self.global_extras,
            )

    def _protocol(self) -> dict[str, Any]:
        """The task's evaluation protocol, plus how clients' own models are evaluated if they are."""
        protocol = dict(self.task.protocol())
        if self.personal:
            sizes = [len(v) for v in self.personal_sets.values()]
            protocol["personal_evaluation"] = {
                "models": f"each client that has trained: {self.method.name}'s personal_factors (its own model)",
                "test_sets": "drawn from the held-out test split with the client's train group mix "
                "(data.partition.matched_test_sets; natural partitions: its own group's test examples)",
                "max_per_client": self.cfg.rounds.personal_test_size or len(self.test_examples),
                "sizes": {"min": min(sizes, default=0), "max": max(sizes, default=0)},
                "weighted": "mean over clients weighted by their test examples (pooled)",
                "unweighted": "mean over clients, each once",
            }
        return protocol

    def _evaluate_base(self) -> dict[str, float]:
        self.binding.model.eval()
        progress = self._eval_progress("the untuned base model")
        with torch.no_grad(), self.binding.model.disable_adapter(), tracking(progress):
            return self.task.evaluate(self.binding.model, self.tokenizer, self.test_examples)

    # ---- the run ------------------------------------------------------------------------------
    def run(self, *, resume: bool = False) -> dict[str, Any]:
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        _setup_logging(self.run_dir)
        metrics_path = self.run_dir / "metrics.jsonl"
        atomic.write_text(self.run_dir / "config.yaml", _yaml(cfg.to_dict()))
        lc = cfg.logging
        self.trackers = Trackers(
            lc.trackers, run_name=cfg.name, project=lc.project, wandb_mode=lc.wandb_mode, mlflow_uri=lc.mlflow_uri
        )
        ok = False
        try:
            self.trackers.start(cfg.to_dict(), self.run_dir, resume)  # before the model: a failing start costs nothing
            self._setup()
            self.trainer.bind(self)
            try:
                summary = self._run(resume, metrics_path)
            finally:
                self.trainer.close()
            ok = True
            return summary
        finally:
            self.trackers.close(ok)

    def _run(self, resume: bool, metrics_path: Path) -> dict[str, Any]:
        cfg = self.cfg
        self.t0 = time.perf_counter()
        self.elapsed = 0.0
        if resume:
            lines = self._restore()
            if self.noise is not None:
                check_resumed_budget(self.spend, self.noise, self.state.round, cfg.rounds.num_rounds)
            _truncate_lines(metrics_path, lines)
            log.info("resumed %s at round %d", self.run_dir, self.state.round)
            for record in _read_records(metrics_path):  # the checkpointed records a killed run had not sent
                self.trackers.log(record)
        else:
            self.state = self._initial_state()
            self.ledger = []
            self.momentum = initial_tracker(self.state.factors) if cfg.rounds.momentum else None
            self.server_opt = {}
            self.spend = PrivacyLedger(cfg.privacy.accountant)
            self.clients = {}
            self.bytes_total = 0
            atomic.write_text(metrics_path, "")
            baseline = None
            if cfg.rounds.eval_baseline:
                log.info("evaluating the untuned base model on %d test examples", len(self.test_examples))
                t = time.perf_counter()
                base = self._evaluate_base()
                baseline = {
                    "round": 0,
                    "phase": "baseline",
                    "eval": base,
                    "bytes_total": 0,
                    "eval_seconds": time.perf_counter() - t,
                }
                _append(metrics_path, baseline)
                log.info("base model: %s", _fmt(base))
            self._checkpoint(_count_lines(metrics_path))
            if baseline is not None:
                self.trackers.log(baseline)
        atomic.write_json(self.run_dir / "protocol.json", self._protocol())

        k = clients_per_round(cfg, len(self.client_ids))
        total_steps = cfg.rounds.num_rounds * k * cfg.train.max_steps if cfg.train.max_steps else None
        done_steps = self.state.round * k * cfg.train.max_steps if cfg.train.max_steps else 0
        bar = Progress(total_steps, initial=done_steps, unit="step", mode=self.progress_mode)
        try:
            while self.state.round < cfg.rounds.num_rounds:
                record = self._round(k, bar)
                _append(metrics_path, record)
                bar.set_description(f"round {self.state.round}/{cfg.rounds.num_rounds}: writing the checkpoint")
                self._checkpoint(_count_lines(metrics_path))
                self.trackers.log(record)  # after the checkpoint: a resumed run never writes this round again
                faults.fault("after_checkpoint", self.state.round)
            bar.set_description(f"{cfg.rounds.num_rounds} rounds done")
        finally:
            bar.close()
        return self._finish(metrics_path)

    def _round(self, k: int, bar: Progress) -> dict[str, Any]:
        cfg, t = self.cfg, self.state.round
        before = self.state
        sampled = sample_clients(cfg.seed, t, self.client_ids, k)
        t_train = time.perf_counter()
        trained = self.trainer.train(sampled, bar)
        uploads, train_stats, extras = trained.uploads, trained.stats, trained.extras
        train_seconds = time.perf_counter() - t_train

        ranks = trained.ranks if self.method.heterogeneous_ranks else None
        screening = screen_uploads(uploads, self.state, self.method, ranks)
        rejected = trained.failures + [
            {"client": e.client_id, "module": e.module, "reason": e.problem} for e in screening.rejected
        ]
        for e in screening.rejected:
            log.warning("round %d: rejected %s", t + 1, e)
        accepted = screening.accepted
        record: dict[str, Any] = {
            "round": t + 1,
            "phase": "train",
            "clients": sampled,
            "train": train_stats,
            "rejected": rejected,
        }
        t_agg = time.perf_counter()
        if len(accepted) < cfg.rounds.min_clients:
            log.warning(
                "round %d skipped: %d accepted updates < min_clients=%d", t + 1, len(accepted), cfg.rounds.min_clients
            )
            self.state = GlobalState(t + 1, self.state.factors, self.state.spec, self.state.method_state)
            record.update(skipped=True, bytes_up=0, bytes_down=0)
            if self.momentum is not None:
                record["momentum"] = self.momentum.skip()
        else:
            keep = {u.client_id for u in accepted}
            kept_extras = [e for u, e in zip(uploads, extras) if u.client_id in keep]
            with svd_device(self.device):  # uploads live on the CPU; the QRs/SVDs run on the model's device
                if self.noise is not None and self.noise.mode == "client":
                    result, new_extras = private_aggregate(
                        self.method, self.state, accepted, kept_extras, self.noise, cfg.seed
                    )
                else:
                    result = self.method.aggregate(self.state, accepted)
                    weights = [u.num_examples for u in accepted]
                    new_extras = _mean_extras(kept_extras, weights) if kept_extras and kept_extras[0] else {}
                result, self.server_opt = server_step(cfg.server, self.method, self.state, result, self.server_opt)
            if self.noise is not None:
                record_round(self.spend, self.noise, train_stats)
            deltas = dict(result.backbone_delta)
            state = result.state
            if state.round >= cfg.rounds.num_rounds:
                state, final = self.method.finalize(state)
                for m, d in final.items():
                    deltas[m] = deltas[m].extend(d) if m in deltas else d
            deltas = {m: d for m, d in deltas.items() if not d.is_empty}
            if deltas:
                self.binding.apply_delta(deltas)
            self.ledger.append(deltas)
            if self.momentum is not None:
                record["momentum"] = self.momentum.observe(
                    self.method, before, state, deltas, accepted, result.report, self.device
                )
            self.state = state
            if new_extras:
                self.global_extras = new_extras
            bytes_down = result.bytes_down * k
            self.bytes_total += result.bytes_up + bytes_down
            record.update(
                skipped=False,
                bytes_up=result.bytes_up,
                bytes_down=bytes_down,
                backbone_delta_rank=sum(d.rank for d in deltas.values()),
                report=_summarise(result.report),
            )
            side = self.binding.backbone_report()
            if side:  # the side path's size, and what its rank cap dropped (model/side.py)
                record["backbone"] = side
        agg_seconds = time.perf_counter() - t_agg
        losses = [s["loss"] for s in train_stats.values()]
        record["train_loss"] = sum(losses) / len(losses) if losses else None
        client_report = _summarise({cid: s["report"] for cid, s in train_stats.items() if s.get("report")})
        if client_report:
            record["client_report"] = client_report
            log.info("round %d: clients' method report (mean): %s", t + 1, _fmt(client_report))
        record["bytes_total"] = self.bytes_total
        if self.noise is not None:
            record["privacy"] = spend_report(self.spend, self.noise)
            spent = record["privacy"]["epsilon"]
            log.info("round %d: privacy spent: epsilon %.4g at delta %g", t + 1, spent, self.noise.delta)
        every = cfg.rounds.eval_every
        eval_seconds = 0.0
        if (every and (t + 1) % every == 0) or t + 1 == cfg.rounds.num_rounds:
            bar.set_description(f"round {t + 1}/{cfg.rounds.num_rounds}: evaluating")
            t_eval = time.perf_counter()
            record["eval"] = self._evaluate()
            log.info("round %d: train loss %s, %s", t + 1, _num(record["train_loss"]), _fmt(record["eval"]))
            if self.personal:
                record["personal"] = self._evaluate_personal()
                if record["personal"]:
                    p = record["personal"]
                    log.info(
                        "round %d: personal models of %d clients: weighted %s; unweighted %s",
                        t + 1,
                        p["clients"],
                        _fmt(p["weighted"]),
                        _fmt(p["unweighted"]),
                    )
            eval_seconds = time.perf_counter() - t_eval
        record["seconds"] = {"train": train_seconds, "aggregate": agg_seconds, "eval": eval_seconds}
        record.update(trained.record)
        return record

    def _finish(self, metrics_path: Path) -> dict[str, Any]:
        from fedlora.runs.report import write_plots

        records = _read_records(metrics_path)
        final_dir = self.run_dir / "final"
        merged = _merge_ledger([self.binding.init_delta, *self.ledger])
        changed = self.method.changes_backbone or bool(self.binding.init_delta)
        self.binding.save_adapter(final_dir, self.state.factors, merged if changed else None)
        evals = [r for r in records if r.get("eval")]
        baseline = next((r["eval"] for r in records if r.get("phase") == "baseline"), None)
        final = evals[-1]["eval"] if evals and evals[-1].get("phase") != "baseline" else None
        personal = next((r["personal"] for r in reversed(records) if r.get("personal")), None)
        if self.personal:
            for cid, record in sorted(self.clients.items()):
                factors = self.method.personal_factors(self.state, record.memory)
                if factors is not None:
                    self.binding.save_adapter(final_dir / "clients" / cid, factors, merged if changed else None)
        summary = {
            "name": self.cfg.name,
            "method": self.method.name,
            "settings": self.cfg.method.settings,
            "rounds": self.state.round,
            "baseline": baseline,
            "final": final,
            "final_personal": {k: personal[k] for k in ("weighted", "unweighted", "clients")} if personal else None,
            "bytes_total": self.bytes_total,
            "seconds": self.elapsed + (time.perf_counter() - self.t0),
            "rejected": sum(len(r.get("rejected", [])) for r in records),
            "skipped_rounds": sum(1 for r in records if r.get("skipped")),
            "protocol": self._protocol(),
            "privacy": spend_report(self.spend, self.noise) if self.noise is not None else None,
            **self.trainer.summary(),
        }
        atomic.write_json(self.run_dir / "summary.json", summary)
        self.trackers.summary(summary)
        try:
            write_plots(records, self.run_dir, title=f"{self.cfg.name} ({self.method.name})")
        except Exception as exc:
            log.warning("plots failed: %s", exc)
        if baseline and final:
            log.info("untuned base model: %s", _fmt(baseline))
            log.info("federated %s after %d rounds: %s", self.method.name, self.state.round, _fmt(final))
        return summary


# ---- helpers --------------------------------------------------------------------------------------
def _merge_ledger(ledger: list[dict[str, FactoredDelta]]) -> dict[str, FactoredDelta]:
    merged: dict[str, FactoredDelta] = {}
    for step in ledger:
        for m, d in step.items():
            merged.setdefault(m, FactoredDelta(d.d_out, d.d_in)).extend(d)
    return {m: d.compress() for m, d in merged.items()}


def _mean_extras(extras: list[dict[str, torch.Tensor]], weights: list[int]) -> dict[str, torch.Tensor]:
    total = float(sum(weights))
    return {
        k: sum(e[k].double() * (w / total) for e, w in zip(extras, weights)).to(extras[0][k].dtype) for k in extras[0]
    }


def _summarise(report: dict[str, dict[str, float]]) -> dict[str, float]:
    """Mean of each number over the report's entries (modules, or clients): the detail is too long
    for a line."""
    sums: dict[str, list[float]] = {}
    for values in report.values():
        for k, v in values.items():
            sums.setdefault(k, []).append(float(v))
    return {k: sum(v) / len(v) for k, v in sums.items()}


def _append(path: Path, record: dict[str, Any]) -> None:
    atomic.append_line(path, json.dumps(record))


def _read_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _count_lines(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip())


def _truncate_lines(path: Path, n: int) -> None:
    lines = [line for line in path.read_text().splitlines() if line.strip()][:n] if path.exists() else []
    atomic.write_text(path, "".join(line + "\n" for line in lines))


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {_num(v)}" for k, v in metrics.items())


def _num(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _yaml(data: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


def _setup_logging(run_dir: Path) -> None:
    log.setLevel(logging.INFO)
    for h in list(log.handlers):
        log.removeHandler(h)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    fh = logging.FileHandler(run_dir / "log.txt")
    fh.setFormatter(fmt)
    sh = logging.StreamHandler(sys.stderr)
    sh.setFormatter(fmt)
    log.addHandler(fh)
    log.addHandler(sh)
    log.propagate = False
