"""The seam between the round engine and a runtime: who trains a round's sampled clients.

The engine (:class:`~fedlora.engine.rounds.RoundEngine`) decides everything a run must decide
the same way on every runtime: the seeded sample of clients, upload screening,
``method.aggregate``, the backbone ledger, evaluation, the ``metrics.jsonl`` line, the
checkpoint, the final adapter and ``summary.json``. A runtime supplies one object, a
:class:`ClientTrainer`, that turns "these clients, this global state" into their uploads:

* :class:`~fedlora.engine.local.LocalTrainer`: in this process, one client after another on the
  engine's one model (the embedded default, ``fedlora run``);
* :class:`~fedlora.engine.ray_runtime.RayTrainer`: a pool of Ray workers on this machine, each
  holding one base model (``engine.backend: ray``);
* :class:`~fedlora.flower.server_app.FlowerTrainer`: ``train`` messages to Flower SuperNodes,
  each running the same client step (:func:`fedlora.engine.client.client_round`).

The hooks, in the order the engine calls them:

1. :meth:`ClientTrainer.bind` once, after the engine has set up data and model and before it
   restores a checkpoint or trains a round. The engine's public attributes are the run:
   ``cfg``, ``method``, ``binding`` (the server's model), ``tokenizer``, ``task``,
   ``train_examples``, ``parts``, ``client_ids``, ``device``, ``run_dir``, ``progress_mode``, and
   the state a trainer reads each round: ``state`` (the :class:`~fedlora.methods.GlobalState`),
   ``global_extras`` (``modules_to_save`` tensors such as a classifier head), ``ledger`` (the
   backbone deltas applied so far, in order) and ``clients`` (the clients' records: memory,
   optimizer state, data cursor; the engine checkpoints them, a trainer whose clients keep
   their records elsewhere leaves it empty and says so with ``holds_client_records = False``).
2. :meth:`ClientTrainer.restore` at a resume, after the engine restored its own state, with
   what :meth:`ClientTrainer.checkpoint_state` returned when that checkpoint was written; it
   raises ``ValueError`` for a checkpoint it cannot continue (another runtime's).
3. :meth:`ClientTrainer.train` once per round: the sampled ids in order, a progress bar. It
   never raises for one client: a client that fails (an exception, a timeout, an error reply) is
   a ``failures`` entry with its reason, and the round goes on without it.
4. :meth:`ClientTrainer.checkpoint_state` each time the engine writes a checkpoint (after every
   round): a tree of JSON values and tensors saved with it (:mod:`fedlora.trees`).
5. :meth:`ClientTrainer.summary` at the end: keys added to ``summary.json``; then
   :meth:`ClientTrainer.close`, also when the run stops on an error.

A trainer holds no method-specific code and changes no global state: the engine applies the
aggregate. To add a runtime, subclass :class:`ClientTrainer`, implement :meth:`train` (and the
other hooks if the runtime has state of its own), and run ``RoundEngine(cfg, YourTrainer()).run()``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from fedlora.methods import ClientUpload

if TYPE_CHECKING:  # the engine imports this module; the name is for type hints only
    from fedlora.engine.rounds import RoundEngine
    from fedlora.progress import Progress


@dataclass
class TrainedClients:
    """One round's local training, in sampled order (a failed client appears in ``failures`` only).

    ``uploads``: the clients' uploads. ``stats``: per client id, its training statistics
    (``loss``, ``steps``, ``examples``, ... and the method's ``report``). ``failures``:
    ``{"client": id, "reason": text}`` per client that produced no upload. ``extras``: per
    upload, the client's ``modules_to_save`` tensors (``{}`` when there are none). ``ranks``: per
    client id, its LoRA rank. ``record``: keys the runtime adds to this round's metrics line
    (the Flower runtime: ``wire``, the bytes its messages carried).
    """

    uploads: list[ClientUpload] = field(default_factory=list)
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: list[dict[str, str]] = field(default_factory=list)
    extras: list[dict[str, torch.Tensor]] = field(default_factory=list)
    ranks: dict[str, int] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)

    def add(self, upload: ClientUpload, stats: dict[str, Any], extras: dict[str, torch.Tensor], rank: int) -> None:
        """Record one client's successful local training."""
        self.uploads.append(upload)
        self.stats[upload.client_id] = stats
        self.extras.append(extras)
        self.ranks[upload.client_id] = rank

    def fail(self, client_id: str, reason: str) -> None:
        """Record a client that produced no upload, and why."""
        self.failures.append({"client": client_id, "reason": reason})


class ClientTrainer:
    """Trains a round's sampled clients for the :class:`~fedlora.engine.rounds.RoundEngine`
    (see the module docstring for the contract). Subclasses implement :meth:`train`."""

    name: str = "local"
    """Names the runtime in checkpoints (``runtime.name``) and log lines."""
    holds_client_records: bool = True
    """True when ``engine.clients`` holds the clients' records (so the engine checkpoints them and
    can evaluate clients' own models); False when they live with the clients (Flower's nodes)."""

    engine: RoundEngine

    def bind(self, engine: RoundEngine) -> None:
        """Called once, after the engine's set-up (data and model) and before any round."""
        self.engine = engine

    def train(self, clients: list[str], progress: Progress) -> TrainedClients:
        """Local training of ``clients`` (ids, in sampled order) from ``engine.state``."""
        raise NotImplementedError

    def checkpoint_state(self) -> dict[str, Any]:
        """What this runtime adds to each checkpoint (JSON values and tensors)."""
        return {"name": self.name} if self.name != "local" else {}

    def restore(self, saved: dict[str, Any]) -> None:
        """Continue from a checkpoint whose :meth:`checkpoint_state` was ``saved``."""
        if (saved.get("name") or "local") != self.name:
            raise ValueError(
                f"this checkpoint was written by the {saved.get('name')} runtime, not the {self.name} "
                "runtime (what that runtime keeps is not in it): resume it there"
            )

    def summary(self) -> dict[str, Any]:
        """Keys this runtime adds to ``summary.json``."""
        return {}

    def close(self) -> None:
        """Release what :meth:`bind` started (workers, connections); called once the run stops."""
