"""The Ray backend of ``fedlora run`` (``engine.backend: ray``): a round's clients train in
parallel workers on one machine, with nothing to start by hand.

Ray directly, not Flower's simulation engine: Flower's ``run_simulation`` would add a SuperLink,
message records and a ClientApp per call around the same thing (actors holding a model), and
its ClientApp rebuilds its state from the message each call; an actor pool keeps one base model
per worker for the whole run and needs only the engine's seam (:class:`ClientTrainer`). The
multi-machine case is the Flower deployment (``fedlora.flower``), with the same config.

* ``engine.workers`` actors (``engine.cpus_per_worker`` CPU cores and ``engine.gpus_per_worker``
  GPUs each, fractions allowed) each build the run's model once (:func:`build_binding`, the same
  seeded set-up as the server) and swap clients' factors in, as the local runtime does.
* Each worker keeps the backbone in step with the server by replaying the ledger entries it has
  not applied yet, in order (the same float operations: bit-identical weights, side path
  included); a fresh worker replays them all.
* A client's record (data cursor, the method's memory such as FedSA-LoRA's B, a carried
  optimizer state) travels with the client: the engine keeps it (``engine.clients``, in the
  checkpoint) and sends it with the task, the worker sends it back updated. So any worker can
  train any client, and a run resumes on either backend.
* Clients go to whichever worker is free, in sampled order; results are taken in sampled order.
  ``client_round`` seeds torch from (seed, round, client), so the uploads equal the local
  runtime's on the CPU (the test compares whole runs).
* Everything crossing a process boundary is a safetensors blob with a JSON skeleton
  (:func:`fedlora.trees.to_bytes`), never pickle.
* A worker that dies (killed, out of memory) fails its client for the round, named in
  ``rejected``; it is replaced by a fresh worker, which replays the ledger.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from typing import Any

import torch

from fedlora import trees
from fedlora.engine.checkpoint import (
    factors_from_tree,
    factors_tree,
    ledger_from_tree,
    ledger_tree,
    record_from_tree,
    record_tree,
)
from fedlora.engine.client import ClientRecord
from fedlora.engine.setup import client_rank
from fedlora.engine.trainer import ClientTrainer, TrainedClients
from fedlora.methods import ClientUpload, GlobalState
from fedlora.methods.base import LoRASpec
from fedlora.progress import Progress

log = logging.getLogger("fedlora")


# ---- what crosses the boundary: the checkpoint's trees ------------------------------------------
def state_tree(state: GlobalState) -> dict[str, Any]:
    spec = [state.spec.rank, state.spec.alpha, state.spec.use_rslora]
    return {
        "round": state.round,
        "factors": factors_tree(state.factors),
        "method_state": state.method_state,
        "spec": spec,
    }


def state_from_tree(tree: dict[str, Any]) -> GlobalState:
    rank, alpha, rslora = tree["spec"]
    spec = LoRASpec(int(rank), float(alpha), bool(rslora))
    return GlobalState(int(tree["round"]), factors_from_tree(tree["factors"]), spec, tree["method_state"])


# ---- the worker ----------------------------------------------------------------------------------
class ClientWorker:
    """One Ray actor: the run's model built once, clients trained one at a time on it."""

    def __init__(self, config: dict[str, Any]) -> None:
        from fedlora.engine.config import config_from_dict
        from fedlora.engine.setup import build_binding, build_run_method, device_for, prepare_data

        torch.set_num_threads(max(1, int(config.pop("_threads", 1))))
        self.cfg = config_from_dict(config)
        self.device = device_for(self.cfg.model.device)
        self.data = prepare_data(self.cfg)
        self.tokenizer, self.binding = build_binding(self.cfg, self.device)
        self.method = build_run_method(self.cfg)
        self.applied = 0

    def ready(self) -> bool:
        return True

    def pid(self) -> int:
        import os

        return os.getpid()

    def train(self, state_blob: bytes, ledger_blob: bytes, first: int, cid: str, record_blob: bytes) -> bytes:
        """Apply ledger entries ``first..`` not yet applied, train client ``cid`` from the state."""
        from fedlora.engine.client import client_round
        from fedlora.engine.privacy import plan_noise
        from fedlora.engine.setup import local_data, packed_batches

        if first != self.applied:
            raise RuntimeError(f"worker holds {self.applied} ledger entries, was sent entries from {first}")
        for step in ledger_from_tree(trees.from_bytes(ledger_blob)):
            self.binding.apply_delta(step)
            self.applied += 1
        tree = trees.from_bytes(state_blob)
        record = record_from_tree(trees.from_bytes(record_blob))
        t = time.perf_counter()
        out = client_round(
            self.binding,
            self.method,
            state_from_tree(tree["state"]),
            record,
            local_data(
                self.cfg,
                cid,
                self.data.train,
                self.data.parts,
                self.data.task,
                self.tokenizer,
                self.device,
                packed=packed_batches(self.cfg, self.binding),
            ),
            self.cfg.train,
            rank=client_rank(self.cfg, cid),
            num_rounds=self.cfg.rounds.num_rounds,
            global_extras=tree["extras"],
            noise=plan_noise(self.cfg, self.data.sizes),  # the server's plan: same config, same data
        )
        return trees.to_bytes(
            {
                "factors": factors_tree(out.upload.factors),
                "num_examples": out.upload.num_examples,
                "step_size": out.upload.step_size,
                "stats": out.stats,
                "extras": out.extras,
                "record": record_tree(record),
                "seconds": time.perf_counter() - t,
            }
        )


# ---- the trainer ---------------------------------------------------------------------------------
class RayTrainer(ClientTrainer):
    """Trains a round's clients on a pool of Ray workers (see the module docstring)."""

    name = "ray"

    def __init__(self) -> None:
        self.workers: list[Any] = []
        self.applied: list[int] = []
        self.owns_ray = False  # started Ray here: shut it down at close

    def bind(self, engine) -> None:  # type: ignore[no-untyped-def]
        import ray

        super().bind(engine)
        e = engine.cfg.engine
        if not ray.is_initialized():
            t = time.perf_counter()
            ray.init(
                num_cpus=max(1, round(e.workers * max(e.cpus_per_worker, 1.0))),
                num_gpus=torch.cuda.device_count() if e.gpus_per_worker > 0 else 0,
                include_dashboard=False,
                configure_logging=False,
                log_to_driver=True,
            )
            self.owns_ray = True
            log.info("ray started in %.1f s", time.perf_counter() - t)
        options = {"num_cpus": e.cpus_per_worker, "num_gpus": e.gpus_per_worker, "max_restarts": 0}
        self._actor = ray.remote(**options)(ClientWorker)
        t = time.perf_counter()
        self.workers = [self._new_worker() for _ in range(e.workers)]
        ray.get([w.ready.remote() for w in self.workers])
        self.applied = [0] * len(self.workers)
        log.info("%d ray workers ready in %.1f s (one base model each)", len(self.workers), time.perf_counter() - t)

    def _new_worker(self) -> Any:
        cfg = self.engine.cfg.to_dict()
        cfg["_threads"] = max(1, int(self.engine.cfg.engine.cpus_per_worker))
        return self._actor.remote(cfg)

    def _replace(self, w: int) -> None:
        import ray

        with contextlib.suppress(Exception):  # already gone
            ray.kill(self.workers[w])
        self.workers[w] = self._new_worker()
        self.applied[w] = 0

    def restore(self, saved: dict[str, Any]) -> None:
        if (saved.get("name") or "local") not in ("local", "ray"):  # the same records: either continues
            super().restore(saved)

    def checkpoint_state(self) -> dict[str, Any]:
        return {}  # the clients' records are the engine's; a local run may continue this one

    def train(self, clients: list[str], progress: Progress) -> TrainedClients:
        import ray

        e = self.engine
        t, rounds = e.state.round, e.cfg.rounds.num_rounds
        state_blob = ray.put(trees.to_bytes({"state": state_tree(e.state), "extras": e.global_extras}))
        ledger = ledger_tree(e.ledger)
        queue, running, results = deque(clients), {}, {}
        idle = deque(range(len(self.workers)))
        while queue or running:
            while queue and idle:
                w, cid = idle.popleft(), queue.popleft()
                first = self.applied[w]
                record = trees.to_bytes(record_tree(e.clients.get(cid) or ClientRecord()))
                ref = self.workers[w].train.remote(state_blob, trees.to_bytes(ledger[first:]), first, cid, record)
                running[ref] = (w, cid)
            done, _ = ray.wait(list(running), num_returns=1)
            ref = done[0]
            w, cid = running.pop(ref)
            try:
                results[cid] = trees.from_bytes(ray.get(ref))
                self.applied[w] = len(e.ledger)
            except Exception as exc:  # a worker's crash or death fails this client, not the run
                text = str(exc).strip()
                reason = f"ray worker {w}: {type(exc).__name__}: {text.splitlines()[-1] if text else ''}".strip()
                results[cid] = reason
                log.error("round %d: client %s failed: %s", t + 1, cid, reason)
                self._replace(w)  # dead, or its model state unknown after the error: a fresh worker
            idle.append(w)
            progress.set_description(f"round {t + 1}/{rounds}: {len(results)}/{len(clients)} clients trained")
            if isinstance(results[cid], dict):
                progress.update(int(results[cid]["stats"].get("steps", 0)))
        out = TrainedClients()
        for cid in clients:
            r = results[cid]
            if isinstance(r, str):
                out.fail(cid, r)
                continue
            e.clients[cid] = record_from_tree(r["record"])
            upload = ClientUpload(cid, factors_from_tree(r["factors"]), int(r["num_examples"]), float(r["step_size"]))
            out.add(upload, r["stats"], r["extras"], client_rank(e.cfg, cid))
        return out

    def close(self) -> None:
        import ray

        for w in self.workers:
            with contextlib.suppress(Exception):
                ray.kill(w)
        self.workers = []
        if self.owns_ray:
            ray.shutdown()
            self.owns_ray = False
