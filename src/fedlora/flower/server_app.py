"""The Flower ServerApp: fedlora's rounds over ``grid.send_and_receive``, not Flower's FedAvg.

The server is the simulation runtime with local training replaced by messages:
:class:`FlowerServer` subclasses :class:`~fedlora.sim.runner.Simulation` and overrides only
``_train_clients``. Sampling (``sample_clients``), upload screening, ``method.aggregate``, the
backbone ledger, evaluation of the global model (the server holds the model too), the
``metrics.jsonl`` lines, ``summary.json`` and ``final/`` are the simulation's own code, so a
Flower run of a config reproduces ``fedlora run`` of it (same sampled clients, losses and
evaluation, up to float rounding in the clients' processes).

One round:

1. sample client ids with the simulation's seeded rule; client ``i`` is the SuperNode whose
   ``node_config["partition-id"]`` is ``i`` (learned by a ``query`` handshake);
2. send each sampled node a ``train`` message with what it lacks to hold this round's state
   (:mod:`fedlora.flower.sync`: changed state tensors, missing backbone-delta factor pairs);
3. turn replies into :class:`~fedlora.methods.ClientUpload` s in sampled order; an error reply
   or a missing one (``round-timeout``) is a failed client, as a crash is in the simulation;
4. the rest is ``Simulation._round``.

Each metrics line gains ``wire``: the bytes put in ArrayRecords this round
(``count_bytes()``: ``down``, ``up``), their raw tensor bytes of factors, method state and
backbone deltas (``down_payload``, ``up_payload``) and of ``modules_to_save`` extras such as a
classifier head (``down_extras``, ``up_extras``; not in the methods' accounting).
``up_payload`` equals the method's ``bytes_up`` (when no upload is rejected);
``down_payload`` of round t+1 equals the method's ``bytes_down`` of round t (the broadcast of
round t's result to the k clients of the next round) when each sampled node held the previous
version; see README "Flower deployment" for the exact differences.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Mapping

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp
from tqdm.auto import tqdm

from fedlora.flower.config import FlowerOptions, resolve
from fedlora.flower.records import diff_content, factors_from_record, from_record, payload_bytes
from fedlora.flower.sync import EXTRA_PREFIX, NodeVersion, StateSync, flatten_state
from fedlora.methods import ClientUpload
from fedlora.sim.config import Config
from fedlora.sim.runner import Simulation, TrainedClients, client_rank

log = logging.getLogger("fedlora")
WIRE_KEYS = ("down", "up", "down_payload", "up_payload", "down_extras", "up_extras")


def config_yaml(cfg: Config) -> str:
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


class FlowerServer(Simulation):
    """A fedlora run whose clients are Flower SuperNodes."""

    def __init__(self, cfg: Config, grid: Grid, opts: FlowerOptions | None = None) -> None:
        super().__init__(cfg, progress=False)
        self.grid = grid
        self.opts = opts or FlowerOptions()
        self.sync = StateSync()
        self.node_of: dict[str, int] = {}
        self.known_nodes: set[int] = set()
        self.config_text = config_yaml(cfg)
        self.wire_total = dict.fromkeys(WIRE_KEYS, 0)
        self._wire: dict[str, int] = {}

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
                RecordDict({"config": ConfigRecord({"query": "fedlora-node"})}),
                dst_node_id=n,
                message_type=MessageType.QUERY,
            )
            for n in nodes
        ]
        replies = list(self.grid.send_and_receive(msgs, timeout=self.opts.round_timeout))
        node_of: dict[str, int] = {}
        for r in replies:
            if r.has_error():
                log.warning("node %s did not answer the handshake: %s", r.metadata.src_node_id, r.error.reason)
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

    # ---- one round's local training, remotely ---------------------------------------------------
    def _train_clients(self, sampled: list[str], bar: tqdm) -> TrainedClients:
        t = self.state.round
        self.sync.observe(t, flatten_state(self.state, self.global_extras), self.ledger)
        self._refresh_nodes()
        wire = dict.fromkeys((*WIRE_KEYS, "messages"), 0)
        uploads: list[ClientUpload] = []
        train_stats: dict[str, dict[str, Any]] = {}
        failures: list[dict[str, str]] = []
        extras: list[dict[str, Any]] = []
        ranks: dict[str, int] = {}
        msgs, sent = [], {}
        base = {"server-round": t + 1, "round": t, "fedlora-config": self.config_text}
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
                replies[sent.get(r.metadata.src_node_id)] = r
        for cid in sampled:
            reason = self._reply_problem(cid, replies.get(cid))
            if reason is not None:
                log.error("round %d: client %s failed: %s", t + 1, cid, reason)
                failures.append({"client": cid, "reason": reason})
                self.sync.forget(cid)  # its version is unknown now: asked again next round
                continue
            content = replies[cid].content
            up, ex = content.array_records["upload"], content.array_records["extras"]
            wire["up"] += up.count_bytes() + ex.count_bytes()
            wire["up_payload"] += payload_bytes(up)
            wire["up_extras"] += payload_bytes(ex)
            metrics = content.metric_records["metrics"]
            uploads.append(ClientUpload(cid, factors_from_record(up), num_examples=int(metrics["num-examples"])))
            train_stats[cid] = {
                "loss": float(metrics["train-loss"]),
                "steps": int(metrics["steps"]),
                "examples": int(metrics["examples"]),
                "seconds": float(metrics["seconds"]),
            }
            extras.append(from_record(ex))
            ranks[cid] = client_rank(self.cfg, cid)
            self.sync.acknowledge(cid)
        self._wire = wire
        for k in self.wire_total:
            self.wire_total[k] += wire[k]
        return uploads, train_stats, failures, extras, ranks

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

    def _round(self, k: int, bar: tqdm) -> dict[str, Any]:
        record = super()._round(k, bar)
        record["wire"] = dict(self._wire)
        return record

    # ---- no server-side resume: the clients' memories and cursors live on the nodes -----------
    def _checkpoint(self, metrics_lines: int) -> None:
        return None

    def _finish(self, metrics_path):  # type: ignore[override]
        import json

        summary = super()._finish(metrics_path)
        summary["runtime"] = "flower"
        summary["wire"] = dict(self.wire_total)
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary


def build_server_app(defaults: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp running fedlora; ``defaults`` fill run-config keys the context lacks (the
    in-process ``flwr.simulation.run_simulation`` passes an empty run config)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_config = {**(defaults or {}), **dict(context.run_config)}
        cfg, opts = resolve(run_config)
        FlowerServer(cfg, grid, opts).run()

    return app


app = build_server_app()
