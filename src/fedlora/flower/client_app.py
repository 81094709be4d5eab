"""The Flower ClientApp: one fedlora client per SuperNode, ``fedlora.sim.client.client_round`` inside.

A node is client ``node_config["partition-id"]`` of ``num-partitions``. Per process it loads the
base model once (module-level cache keyed by model name; rebuilt if the seed or LoRA settings
differ) and the task data and partition once. Per ``train`` message it

1. brings its mirror of the server state and its backbone ledger up to date from the message
   (:class:`~fedlora.flower.sync.NodeStore`, files under a node cache folder, so a restarted
   SuperNode rebuilds the same base model), checking the server's digests;
2. replays onto the cached base model the ledger entries it has not applied yet (factor pairs,
   applied in order: the same float operations as the server's, bit-identical weights);
3. runs ``client_round`` with its own memory, optimizer state and data cursor, kept in
   ``context.state`` (the method's client memory, e.g. FedSA-LoRA's local B, stays on the node);
4. replies with the uploaded factors, the extras and the metrics.

Node cache folder: ``node_config["cache-dir"]`` (``flower-supernode --node-config
'cache-dir="/var/cache/fedlora"'``), else ``$FEDLORA_NODE_CACHE``, else
``~/.cache/fedlora/flower``; the node's files go to ``<root>/run-<run_id>/client-<partition-id>``.

The torch RNG is seeded per (seed, round, client) before local training, so a client's result
does not depend on which process ran it (dropout and other random draws differ from the
simulation's single stream; with the shipped configs nothing in training is random).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlora.flower.records import (
    diff_from_content,
    factors_record,
    from_record,
    pack_tree,
    to_record,
    unpack_tree,
)
from fedlora.flower.sync import NodeStore, entry_deltas, flatten_state, unflatten_state
from fedlora.methods import GlobalState, build_method
from fedlora.sim.client import ClientRecord, client_round
from fedlora.sim.config import Config, config_from_dict
from fedlora.sim.runner import RunData, build_binding, client_rank, device_for, local_data, prepare_data

CACHE_ENV = "FEDLORA_NODE_CACHE"
ERROR_CODE = 2  # flwr's ErrorCode.CLIENT_APP_RAISED_EXCEPTION


# ---- per-process caches -----------------------------------------------------------------------------
@dataclass
class LoadedModel:
    fingerprint: str
    device: torch.device
    tokenizer: Any
    binding: Any
    initial: dict[str, torch.Tensor]
    applied: list[str]


_MODELS: dict[str, LoadedModel] = {}
_DATA: dict[str, RunData] = {}


def _fingerprint(cfg: Config, *sections: str) -> str:
    d = cfg.to_dict()
    return json.dumps({"seed": cfg.seed, **{s: d[s] for s in sections}}, sort_keys=True)


def model_for(cfg: Config) -> LoadedModel:
    """The process's base model for ``cfg.model.name`` (built once; rebuilt if seed/LoRA differ)."""
    fp = _fingerprint(cfg, "model", "lora")
    entry = _MODELS.get(cfg.model.name)
    if entry is None or entry.fingerprint != fp:
        _MODELS.pop(cfg.model.name, None)
        device = device_for(cfg.model.device)
        tokenizer, binding = build_binding(cfg, device)
        initial = flatten_state(GlobalState(0, binding.get_factors(), binding.spec), binding.extras())
        entry = LoadedModel(fp, device, tokenizer, binding, initial, [""])
        _MODELS[cfg.model.name] = entry
    return entry


def data_for(cfg: Config) -> RunData:
    fp = _fingerprint(cfg, "task", "partition")
    if fp not in _DATA:
        _DATA.clear()
        _DATA[fp] = prepare_data(cfg)
    return _DATA[fp]


def sync_backbone(cfg: Config, loaded: LoadedModel, store: NodeStore, chains: list[str]) -> LoadedModel:
    """Make the cached model's backbone the base weights plus the node's ledger, in order."""
    n = len(loaded.applied)
    if n > len(chains) or chains[:n] != loaded.applied:
        _MODELS.pop(cfg.model.name, None)  # another run's ledger: start from the base weights
        loaded = model_for(cfg)
        n = 1
    for j in range(n - 1, len(chains) - 1):
        loaded.binding.apply_delta(entry_deltas(store.entry(j)))
        loaded.applied.append(chains[j + 1])
    return loaded


# ---- the node -----------------------------------------------------------------------------------------
def partition_id(context: Context) -> str:
    if "partition-id" not in context.node_config:
        raise KeyError(
            "this SuperNode has no partition-id: start it with --node-config 'partition-id=<i> num-partitions=<n>'"
        )
    return str(context.node_config["partition-id"])


def node_dir(context: Context) -> Path:
    root = context.node_config.get("cache-dir") or os.environ.get(CACHE_ENV) or "~/.cache/fedlora/flower"
    return Path(str(root)).expanduser() / f"run-{context.run_id}" / f"client-{partition_id(context)}"


def load_record(context: Context) -> ClientRecord:
    if "fedlora-client-tree" not in context.state.config_records:
        return ClientRecord()
    tree = json.loads(str(context.state.config_records["fedlora-client-tree"]["tree"]))
    tensors = from_record(context.state.array_records["fedlora-client-tensors"])
    obj = unpack_tree(tree, tensors)
    return ClientRecord(cursor=obj["cursor"], memory=obj["memory"], optimizer=obj["optimizer"])


def save_record(context: Context, record: ClientRecord) -> None:
    tensors: dict[str, torch.Tensor] = {}
    tree = pack_tree({"cursor": record.cursor, "memory": record.memory, "optimizer": record.optimizer}, tensors)
    context.state["fedlora-client-tree"] = ConfigRecord({"tree": json.dumps(tree)})
    context.state["fedlora-client-tensors"] = to_record(tensors)


def train(msg: Message, context: Context) -> Message:
    header = msg.content.config_records["config"]
    cfg = config_from_dict(yaml.safe_load(str(header["fedlora-config"])))
    cid = partition_id(context)
    if str(header["client-id"]) != cid:
        raise ValueError(f"message for client {header['client-id']} reached the node of partition-id {cid}")
    if int(context.node_config.get("num-partitions", cfg.partition.num_clients)) != cfg.partition.num_clients:
        raise ValueError(
            f"num-partitions={context.node_config['num-partitions']} but partition.num_clients="
            f"{cfg.partition.num_clients}"
        )
    loaded = model_for(cfg)
    store = NodeStore(node_dir(context))
    flat, chains = store.apply(diff_from_content(msg.content), loaded.initial)
    loaded = sync_backbone(cfg, loaded, store, chains)
    binding = loaded.binding
    state, extras = unflatten_state(flat, int(header["round"]), binding.spec, binding.layers)
    data = data_for(cfg)
    method = build_method(cfg.method.name, cfg.method.settings)
    record = load_record(context)
    out = client_round(
        binding,
        method,
        state,
        record,
        local_data(cfg, cid, data.train, data.parts, data.task, loaded.tokenizer, loaded.device),
        cfg.train,
        rank=client_rank(cfg, cid),
        num_rounds=cfg.rounds.num_rounds,
        global_extras=extras,
    )
    save_record(context, record)
    metrics = MetricRecord(
        {
            "num-examples": int(out.upload.num_examples),
            "train-loss": float(out.stats["loss"]),
            "steps": int(out.stats["steps"]),
            "examples": int(out.stats["examples"]),
            "seconds": float(out.stats["seconds"]),
        }
    )
    content = RecordDict(
        {"upload": factors_record(out.upload.factors), "extras": to_record(out.extras), "metrics": metrics}
    )
    return Message(content, reply_to=msg)


def hello(msg: Message, context: Context) -> Message:
    """Handshake: which client this node is and which version of the state it holds."""
    version = NodeStore(node_dir(context)).version()
    info = ConfigRecord(
        {
            "partition-id": int(partition_id(context)),
            "num-partitions": int(context.node_config.get("num-partitions", -1)),
            "fresh": bool(version["fresh"]),
            "round": int(version["round"]),
            "state-digest": str(version["state_digest"]),
            "ledger-len": int(version["ledger_len"]),
            "ledger-chain": str(version["ledger_chain"]),
        }
    )
    return Message(RecordDict({"node": info}), reply_to=msg)


def _guarded(handler):
    def run(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Exception as exc:  # the server records the client as failed, with this reason
            return Message(Error(code=ERROR_CODE, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)

    return run


app = ClientApp()
app.train()(_guarded(train))
app.query()(_guarded(hello))

__all__ = ["app", "hello", "train"]
