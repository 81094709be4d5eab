"""The embedded runtime (``fedlora run``): the sampled clients train in this process, one after
another, on the engine's one model.

One base model serves every client: each client's start factors are loaded into the PEFT model,
trained (:func:`fedlora.engine.client.client_round`) and read back, so memory does not grow with
the number of clients. Clients' records (memories, optimizer states, data cursors) live in
``engine.clients`` and are checkpointed by the engine.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from fedlora.engine import faults
from fedlora.engine.client import ClientRecord, client_round
from fedlora.engine.config import Config
from fedlora.engine.rounds import RoundEngine
from fedlora.engine.setup import client_rank, local_data, packed_batches
from fedlora.engine.trainer import ClientTrainer, TrainedClients
from fedlora.methods import ClientUpload
from fedlora.progress import Progress

log = logging.getLogger("fedlora")


class LocalTrainer(ClientTrainer):
    """Local training of the sampled clients, in order, in this process; a client that raises
    (out of memory included) is a failure of the round, not of the run."""

    name = "local"

    def train(self, clients: list[str], progress: Progress) -> TrainedClients:
        engine = self.engine
        t, k, rounds = engine.state.round, len(clients), engine.cfg.rounds.num_rounds
        out = TrainedClients()
        for pos, cid in enumerate(clients):
            progress.set_description(f"round {t + 1}/{rounds} client {cid} ({pos + 1}/{k})")
            try:
                upload, stats, extras = self.train_client(cid, progress)
            except Exception as exc:  # one client's failure (OOM included) must not stop the run
                log.error(
                    "round %d: client %s failed during local training: %s: %s", t + 1, cid, type(exc).__name__, exc
                )
                out.fail(cid, f"{type(exc).__name__}: {exc}")
                if engine.device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            out.add(upload, stats, extras, client_rank(engine.cfg, cid))
            faults.fault("after_client", t, pos)
        return out

    def train_client(
        self, cid: str, progress: Progress
    ) -> tuple[ClientUpload, dict[str, Any], dict[str, torch.Tensor]]:
        """Client ``cid``'s local training from the engine's global state on the engine's model."""
        engine = self.engine

        def on_step(step: int, loss: float) -> None:
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.3f}")

        out = client_round(
            engine.binding,
            engine.method,
            engine.state,
            engine.clients.setdefault(cid, ClientRecord()),
            local_data(
                engine.cfg,
                cid,
                engine.train_examples,
                engine.parts,
                engine.task,
                engine.tokenizer,
                engine.device,
                packed=packed_batches(engine.cfg, engine.binding),
            ),
            engine.cfg.train,
            rank=client_rank(engine.cfg, cid),
            num_rounds=engine.cfg.rounds.num_rounds,
            global_extras=engine.global_extras,
            noise=engine.noise,
            on_step=on_step,
        )
        return out.upload, out.stats, out.extras


def local_run(cfg: Config, *, progress: bool = True) -> RoundEngine:
    """The run ``cfg`` on the embedded runtime (call ``.run()`` on it): clients one after another
    in this process (``engine.backend: local``) or in parallel Ray workers (``ray``)."""
    if cfg.engine.backend == "ray":
        from fedlora.engine.ray_runtime import RayTrainer

        return RoundEngine(cfg, RayTrainer(), progress=progress)
    return RoundEngine(cfg, LocalTrainer(), progress=progress)


def run_experiment(cfg: Config, *, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the experiment ``cfg`` on the embedded runtime and return its summary."""
    return local_run(cfg, progress=progress).run(resume=resume)
