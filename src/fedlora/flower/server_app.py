"""The Flower ServerApp: fedlora's rounds over ``grid.send_and_receive``, not Flower's FedAvg.

The server is the round engine (:class:`~fedlora.engine.rounds.RoundEngine`) with a
:class:`FlowerTrainer` as its client trainer (the public seam of :mod:`fedlora.engine.trainer`):
local training is replaced by messages. Sampling (``sample_clients``), upload screening,
``method.aggregate``, the backbone ledger, evaluation of the global model (the server holds the
model too), the ``metrics.jsonl`` lines, ``summary.json`` and ``final/`` are the engine's, so a
Flower run of a config reproduces ``fedlora run`` of it (same sampled clients, losses and
evaluation, up to float rounding in the clients' processes).

One round:

1. sample client ids with the simulation's seeded rule; client ``i`` is the SuperNode whose
   ``node_config["partition-id"]`` is ``i`` (learned by a ``query`` handshake);
2. send each sampled node a ``train`` message with what it lacks to hold this round's state
   (:mod:`fedlora.flower.sync`: changed state tensors, missing backbone-delta factor pairs);
3. turn replies into :class:`~fedlora.methods.ClientUpload` s in sampled order; an error reply
   or a missing one (``round-timeout``) is a failed client, as a crash is in the simulation;
4. the rest is the engine's round.

Each metrics line gains ``wire``: the bytes put in ArrayRecords this round
(``count_bytes()``: ``down``, ``up``), their raw tensor bytes of factors, method state and
backbone deltas (``down_payload``, ``up_payload``) and of ``modules_to_save`` extras such as a
classifier head (``down_extras``, ``up_extras``; not in the methods' accounting).
``up_payload`` equals the method's ``bytes_up`` (when no upload is rejected);
``down_payload`` of round t+1 equals the method's ``bytes_down`` of round t (the broadcast of
round t's result to the k clients of the next round) when each sampled node held the previous
version; see README "Flower deployment" for the exact differences.

Nothing on the server is lost: after every round it writes the engine's atomic checkpoint
(``<run>/checkpoint``) plus its run key (which names the nodes' folders) and the sync
bookkeeping (:meth:`~fedlora.flower.sync.StateSync.bookkeeping`); ``resume=true`` in the run
config continues the run from it (same run config; the nodes' mirrors and client records are on
their disks, versioned by round, so a round the server had started again starts from the same
client records). Clients' memories live on the nodes, so there is no personalised evaluation of
client models here (``rounds.personal_eval=on`` is refused).
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any, Mapping

import torch
import yaml
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedlora.engine.config import Config
from fedlora.engine.rounds import RoundEngine
from fedlora.engine.setup import client_rank
from fedlora.engine.trainer import ClientTrainer, TrainedClients
from fedlora.flower.config import FlowerOptions, resolve
from fedlora.flower.records import (
    diff_content,
    factors_from_record,
    from_record,
    payload_bytes,
    train_stats_from_metrics,
)
from fedlora.flower.sync import EXTRA_PREFIX, NodeVersion, StateSync, flatten_state, seeded_state
from fedlora.methods import ClientUpload
from fedlora.progress import Progress

log = logging.getLogger("fedlora")
WIRE_KEYS = ("down", "up", "down_payload", "up_payload", "down_extras", "up_extras")


def config_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def new_run_key(name: str) -> str:
    """``<name>-<12 hex digits>``: names every node's folder for one run (fresh per new run,
    kept across resumes)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-")[:40] or "run"
    return f"{stem}-{uuid.uuid4().hex[:12]}"


def _flat_dict(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and v and k not in ("settings", "client_ranks"):
            out.update(_flat_dict(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_run_dir(cfg: Config, opts: FlowerOptions) -> None:
    """``resume=true``: the run folder must hold a checkpoint of this same config. Otherwise a
    folder holding a checkpoint is only replaced with ``overwrite=true``."""
    run_dir = cfg.run_dir
    if opts.resume:
        saved_path = run_dir / "config.yaml"
        if not saved_path.is_file() or not (run_dir / "checkpoint").exists():
            raise ValueError(f"resume=true: {run_dir} holds no checkpointed run (output-dir and name place it)")
        saved = _flat_dict(yaml.safe_load(saved_path.read_text()))
        now = _flat_dict(yaml.safe_load(config_yaml(cfg)))
        differ = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))
        if differ:
            raise ValueError(
                f"resume=true: the run config differs from {saved_path} in {', '.join(differ)}; "
                "resume with the run config the run started with"
            )
    elif (run_dir / "checkpoint").exists() and not opts.overwrite:
        raise ValueError(
            f"{run_dir} already holds a run: resume=true continues it, overwrite=true starts again, "
            "name=NEW writes elsewhere"
        )


def reply_node(reply: Message, sent: list[Message]) -> int:
    """The node a reply answers for: the destination of the message it replies to (an error the
    SuperLink makes for an unavailable node comes from the SuperLink itself), else its source."""
    to = reply.metadata.reply_to_message_id
    for m in sent:
        if to and m.metadata.message_id == to:
            return m.metadata.dst_node_id
    return reply.metadata.src_node_id


class FlowerTrainer(ClientTrainer):
    """Trains a round's clients on Flower SuperNodes through ``grid`` (see the module docstring)."""

    name = "flower"
    holds_client_records = False  # each node keeps its client's record on its own disk

    def __init__(self, grid: Grid, opts: FlowerOptions | None = None, run_key: str = "run") -> None:
        self.grid = grid
        self.opts = opts or FlowerOptions()
        self.run_key = run_key
        self.sync = StateSync()
        self._seeded_cache: tuple[int, dict[str, torch.Tensor]] | None = None
        self.node_of: dict[str, int] = {}
        self.known_nodes: set[int] = set()
        self.config_text = ""
        self.wire_total = dict.fromkeys(WIRE_KEYS, 0)

    def bind(self, engine: RoundEngine) -> None:
        super().bind(engine)
        self.cfg = engine.cfg
        self.client_ids = engine.client_ids
        self.config_text = config_yaml(engine.cfg)

    # ---- nodes --------------------------------------------------------------------------------
    def _wait_for_nodes(self) -> list[int]:
        want = self.cfg.partition.num_clients
        deadline = time.monotonic() + self.opts.node_wait_timeout
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) >= want:
                return nodes
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{len(nodes)} SuperNodes connected after {self.opts.node_wait_timeout:.0f}s; "
                    f"partition.num_clients={want} need one each"
                )
            time.sleep(0.5)

    def _handshake(self, nodes: list[int]) -> None:
        """Learn each node's partition-id and the version of its mirror."""
        msgs = [
            Message(
                RecordDict({"config": ConfigRecord({"query": "fedlora-node", "run-key": self.run_key})}),
                dst_node_id=n,
                message_type=MessageType.QUERY,
            )
            for n in nodes
        ]
        replies = list(self.grid.send_and_receive(msgs, timeout=self.opts.round_timeout))
        node_of: dict[str, int] = {}
        for r in replies:
            if r.has_error():
                node = reply_node(r, msgs)
                log.warning("node %s did not answer the handshake: %s", node, r.error.reason)
                continue
            info = r.content.config_records["node"]
            cid = str(info["partition-id"])
            if int(info["num-partitions"]) not in (-1, self.cfg.partition.num_clients):  # -1: not set
                raise ValueError(
                    f"node {r.metadata.src_node_id} has num-partitions={info['num-partitions']}, "
                    f"the config has partition.num_clients={self.cfg.partition.num_clients}"
                )
            if cid not in self.client_ids:
                raise ValueError(
                    f"node {r.metadata.src_node_id} has partition-id {cid}, not in 0..{len(self.client_ids) - 1}"
                )
            if cid in node_of:
                raise ValueError(f"nodes {node_of[cid]} and {r.metadata.src_node_id} both have partition-id {cid}")
            node_of[cid] = r.metadata.src_node_id
            if bool(info["fresh"]):
                self.sync.nodes[cid] = NodeVersion(0, 0)
            elif not self.sync.adopt(
                cid, int(info["round"]), str(info["state-digest"]), int(info["ledger-len"]), str(info["ledger-chain"])
            ):
                log.warning("client %s holds a state this server did not produce: it gets a full copy", cid)
        self.node_of = node_of
        self.known_nodes = set(nodes)
        missing = sorted(set(self.client_ids) - set(node_of), key=int)
        if missing:
            log.warning("no SuperNode for clients %s: they fail when sampled", ", ".join(missing))

    def _refresh_nodes(self) -> None:
        nodes = sorted(self.grid.get_node_ids()) if self.node_of else self._wait_for_nodes()
        unknown = any(cid not in self.sync.nodes for cid in self.node_of)
        if not self.node_of or set(nodes) != self.known_nodes or unknown:
            self._handshake(nodes)

    # ---- the state the nodes mirror ------------------------------------------------------------
    def _seeded(self, round_: int) -> dict[str, torch.Tensor]:
        """The tensors of round ``round_``'s state the nodes rebuild from the method's seed."""
        if self._seeded_cache is None or self._seeded_cache[0] != round_:
            state = self.engine.state
            self._seeded_cache = (round_, seeded_state(self.engine.method, round_, state.shapes(), state.spec))
        return self._seeded_cache[1]

    def _observe(self) -> None:
        e = self.engine
        t = e.state.round
        self.sync.observe(t, flatten_state(e.state, e.global_extras), e.ledger, self._seeded(t))

    # ---- one round's local training, remotely ---------------------------------------------------
    def train(self, clients: list[str], progress: Progress) -> TrainedClients:
        sampled, t = clients, self.engine.state.round
        self._observe()
        self._refresh_nodes()
        wire = dict.fromkeys((*WIRE_KEYS, "messages"), 0)
        out = TrainedClients()
        msgs, sent = [], {}
        base = {"server-round": t + 1, "round": t, "fedlora-config": self.config_text, "run-key": self.run_key}
        for cid in sampled:
            node = self.node_of.get(cid)
            if node is None:
                continue
            content = diff_content(self.sync.diff(cid), {**base, "client-id": cid})
            for name in ("state", "ledger"):
                rec = content.array_records[name]
                wire["down"] += rec.count_bytes()
                head = payload_bytes(rec, prefix=EXTRA_PREFIX)
                wire["down_payload"] += payload_bytes(rec) - head
                wire["down_extras"] += head
            msgs.append(Message(content, dst_node_id=node, message_type=MessageType.TRAIN, group_id=str(t + 1)))
            sent[node] = cid
        wire["messages"] = len(msgs)
        replies = {}
        if msgs:
            for r in self.grid.send_and_receive(msgs, timeout=self.opts.round_timeout):
                replies[sent.get(reply_node(r, msgs))] = r
        for cid in sampled:
            reason = self._reply_problem(cid, replies.get(cid))
            if reason is not None:
                log.error("round %d: client %s failed: %s", t + 1, cid, reason)
                out.fail(cid, reason)
                self.sync.forget(cid)  # its version is unknown now: asked again next round
                continue
            content = replies[cid].content
            up, ex = content.array_records["upload"], content.array_records["extras"]
            wire["up"] += up.count_bytes() + ex.count_bytes()
            wire["up_payload"] += payload_bytes(up)
            wire["up_extras"] += payload_bytes(ex)
            metrics = content.metric_records["metrics"]
            step_size = float(metrics["step-size"]) if "step-size" in metrics else 0.0
            upload = ClientUpload(cid, factors_from_record(up), int(metrics["num-examples"]), step_size)
            out.add(upload, train_stats_from_metrics(metrics), from_record(ex), client_rank(self.cfg, cid))
            self.sync.acknowledge(cid)
        for k in self.wire_total:
            self.wire_total[k] += wire[k]
        out.record["wire"] = wire
        return out

    def _reply_problem(self, cid: str, reply: Message | None) -> str | None:
        if cid not in self.node_of:
            return "no SuperNode with this partition-id is connected"
        if reply is None:
            return f"no reply within round-timeout={self.opts.round_timeout:g}s"
        if reply.has_error():
            return reply.error.reason or f"error code {reply.error.code}"
        if "upload" not in reply.content.array_records or "metrics" not in reply.content.metric_records:
            return "reply without upload/metrics"
        return None

    # ---- checkpoint and resume -------------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, Any]:
        self._observe()  # the bookkeeping saved is that of the state saved (the next round's)
        return {
            "name": "flower",
            "run_key": self.run_key,
            "wire_total": dict(self.wire_total),
            "sync": self.sync.bookkeeping(),
        }

    def restore(self, saved: dict[str, Any]) -> None:
        e = self.engine
        if saved.get("name") != "flower":
            raise ValueError(
                f"{e.run_dir}/checkpoint was not written by the Flower runtime (clients' records are in it): "
                f"continue it with fedlora run --resume {e.run_dir}"
            )
        self.run_key = str(saved["run_key"])
        self.wire_total = {k: int(saved["wire_total"].get(k, 0)) for k in WIRE_KEYS}
        flat = flatten_state(e.state, e.global_extras)
        self.sync = StateSync.restore(saved["sync"], flat, e.ledger, self._seeded(e.state.round))
        log.info("resuming run key %s at round %d", self.run_key, e.state.round + 1)

    def summary(self) -> dict[str, Any]:
        return {"runtime": "flower", "run_key": self.run_key, "wire": dict(self.wire_total)}


def flower_run(cfg: Config, grid: Grid, opts: FlowerOptions | None = None) -> RoundEngine:
    """The run ``cfg`` with its clients on the SuperNodes of ``grid`` (call ``.run()`` on it);
    a fresh run key names the nodes' folders (a resume restores the run's own)."""
    return RoundEngine(cfg, FlowerTrainer(grid, opts, new_run_key(cfg.name)), progress=False)


def build_server_app(defaults: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp running fedlora; ``defaults`` fill run-config keys the context lacks (the
    in-process ``flwr.simulation.run_simulation`` passes an empty run config)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_config = {**(defaults or {}), **dict(context.run_config)}
        cfg, opts = resolve(run_config)
        check_run_dir(cfg, opts)
        flower_run(cfg, grid, opts).run(resume=opts.resume)

    return app


app = build_server_app()
