"""The Flower ClientApp: one fedlora client per SuperNode, ``fedlora.engine.client.client_round`` inside.

A node is client ``node_config["partition-id"]`` of ``num-partitions``. Per process it loads the
base model once (module-level cache keyed by model name; rebuilt if the seed or LoRA settings
differ) and the task data and partition once. Per ``train`` message it

1. brings its mirror of the server state and its backbone ledger up to date from the message
   (:class:`~fedlora.flower.sync.NodeStore`, files under the node's folder, so a restarted
   SuperNode rebuilds the same base model), checking the server's digests; state tensors the
   method draws from its seed (FLoRA's fresh LoRA) are rebuilt here, not received;
2. replays onto the cached base model the ledger entries it has not applied yet (factor pairs,
   applied in order: the same float operations as the server's, bit-identical weights);
3. runs ``client_round`` with its own :class:`~fedlora.engine.client.ClientRecord` (data cursor,
   the method's client memory such as FedSA-LoRA's local B, a carried optimizer state), read
   from and written back to the node's disk (:class:`RecordStore`), so a restarted SuperNode
   goes on where it stopped;
4. replies with the uploaded factors, the extras and the metrics.

Node folder: ``<root>/<run-key>/client-<partition-id>`` with ``<root>`` =
``node_config["cache-dir"]`` (``flower-supernode --node-config 'cache-dir="/var/cache/fedlora"'``),
else ``$FEDLORA_NODE_CACHE``, else ``~/.cache/fedlora/flower``. The run key comes from the server
(``<name>-<12 hex digits>``, kept in the server's checkpoint), so a resumed run (a new Flower run
id) finds the same folders. It holds ``node.json``/``state-*.safetensors``/``ledger/`` (the
mirror), ``records/`` (the client record after each round it trained, the last two kept),
``status.json`` (what the node is doing: round, phase, pid) and ``last-used``. When a node first
sees a run it removes its folders of older runs beyond ``node_config["keep-runs"]`` (default 3,
the current run included; by last use).

The torch RNG is seeded per (seed, round, client) inside ``client_round``, as in the simulation.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import yaml
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from safetensors.torch import load_file

from fedlora import trees
from fedlora.atomic import write_tensors, write_text
from fedlora.engine.client import ClientRecord, client_round
from fedlora.engine.config import Config, config_from_dict
from fedlora.engine.privacy import plan_noise
from fedlora.engine.setup import (
    RunData,
    build_binding,
    build_run_method,
    client_rank,
    device_for,
    local_data,
    packed_batches,
    prepare_data,
)
from fedlora.flower.records import (
    diff_from_content,
    factors_record,
    to_record,
    train_metrics,
)
from fedlora.flower.sync import (
    NodeStore,
    entry_deltas,
    flatten_state,
    seeded_state,
    unflatten_state,
)
from fedlora.methods import GlobalState, Method

CACHE_ENV = "FEDLORA_NODE_CACHE"
ERROR_CODE = 2  # flwr's ErrorCode.CLIENT_APP_RAISED_EXCEPTION
DEFAULT_KEEP_RUNS = 3
RUN_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
LAST_USED = "last-used"


# ---- per-process caches -----------------------------------------------------------------------------
@dataclass
class LoadedModel:
    fingerprint: str
    device: torch.device
    tokenizer: Any
    binding: Any
    initial: dict[str, torch.Tensor]
    applied: list[str]
    shapes: dict[str, tuple[int, int]]


_MODELS: dict[str, LoadedModel] = {}
_DATA: dict[str, RunData] = {}


def _fingerprint(cfg: Config, *sections: str) -> str:
    d = cfg.to_dict()
    return json.dumps({"seed": cfg.seed, **{s: d[s] for s in sections}}, sort_keys=True)


def model_for(cfg: Config) -> LoadedModel:
    """The process's base model for ``cfg.model.name`` (built once; rebuilt if the seed, the model
    section (dtype, quantization, backbone-delta mode), the LoRA or checkpointing differ)."""
    fp = _fingerprint(cfg, "model", "lora") + f"|checkpointing={cfg.train.gradient_checkpointing}"
    entry = _MODELS.get(cfg.model.name)
    if entry is None or entry.fingerprint != fp:
        _MODELS.pop(cfg.model.name, None)
        device = device_for(cfg.model.device)
        tokenizer, binding = build_binding(cfg, device)
        state = GlobalState(0, binding.get_factors(), binding.spec)
        initial = flatten_state(state, binding.extras())
        entry = LoadedModel(fp, device, tokenizer, binding, initial, [""], state.shapes())
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


# ---- the node's folder --------------------------------------------------------------------------------
def partition_id(context: Context) -> str:
    if "partition-id" not in context.node_config:
        raise KeyError(
            "this SuperNode has no partition-id: start it with --node-config 'partition-id=<i> num-partitions=<n>'"
        )
    return str(context.node_config["partition-id"])


def cache_root(context: Context) -> Path:
    root = context.node_config.get("cache-dir") or os.environ.get(CACHE_ENV) or "~/.cache/fedlora/flower"
    return Path(str(root)).expanduser()


def run_key_of(config: Mapping[str, Any], context: Context) -> str:
    """The run key a message names (``run-<flower run id>`` if it names none), checked to be a
    plain folder name."""
    key = str(config.get("run-key", "") or f"run-{context.run_id}")
    if not RUN_KEY.fullmatch(key):
        raise ValueError(f"run-key {key!r} is not a folder name (letters, digits, '.', '_', '-')")
    return key


def node_dir(context: Context, run_key: str | None = None) -> Path:
    """This node's folder for run ``run_key`` (default ``run-<flower run id>``)."""
    return cache_root(context) / (run_key or f"run-{context.run_id}") / f"client-{partition_id(context)}"


def keep_runs(context: Context) -> int:
    value = context.node_config.get("keep-runs", DEFAULT_KEEP_RUNS)
    try:
        keep = int(value)
    except (TypeError, ValueError):
        keep = 0
    if keep < 1 or str(keep) != str(value).strip():
        raise ValueError(f"node config keep-runs={value!r}: an integer >= 1 (run folders kept, this one included)")
    return keep


def _last_used(folder: Path) -> float:
    marker = folder / LAST_USED
    return marker.stat().st_mtime if marker.exists() else folder.stat().st_mtime


def prune_runs(current: Path, keep: int) -> list[Path]:
    """Remove this client's folders of other runs (``<root>/*/<client-i>`` holding a fedlora
    marker), all but the ``keep - 1`` most recently used; empty run folders go too."""
    root, name = current.parent.parent, current.name
    others = [
        d
        for d in root.glob(f"*/{name}")
        if d != current and d.is_dir() and ((d / LAST_USED).exists() or (d / "node.json").exists())
    ]
    others.sort(key=_last_used, reverse=True)
    removed = others[keep - 1 :]
    for d in removed:
        shutil.rmtree(d, ignore_errors=True)
        with contextlib.suppress(OSError):
            d.parent.rmdir()  # only if no other node's folder is left in it
    return removed


def enter_run(context: Context, config: Mapping[str, Any]) -> Path:
    """This node's folder for the message's run: created (and older runs pruned) on first use,
    its ``last-used`` marker touched."""
    folder = node_dir(context, run_key_of(config, context))
    keep = keep_runs(context)
    if not folder.exists():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / LAST_USED).touch()
        prune_runs(folder, keep)
    (folder / LAST_USED).touch()
    return folder


def write_status(folder: Path, server_round: int, phase: str) -> None:
    """``status.json``: what this node is doing (``loading``, ``training``, ``done``) in which
    1-based round, and its process id."""
    status = {"round": server_round, "phase": phase, "pid": os.getpid(), "time": time.time()}
    write_text(folder / "status.json", json.dumps(status))


class RecordStore:
    """A client's :class:`ClientRecord` after each round it trained, on the node's disk.

    ``records/<round>.json`` (the commit: cursor and the tree of memory and optimizer state, with
    tensor leaves pointing into) ``records/<round>-<hex>.safetensors``. Round ``t`` starts from
    the newest record of a round before ``t``, so a round done again (the server resumed from
    its checkpoint after the node had trained it) starts from the same record; saving round
    ``t`` keeps that base and ``t`` and drops the rest.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.dir = Path(folder) / "records"

    def rounds(self) -> list[int]:
        if not self.dir.is_dir():
            return []
        return sorted(int(p.stem) for p in self.dir.glob("*.json") if p.stem.isdigit())

    def load(self, before: int) -> tuple[int | None, ClientRecord]:
        """``(round, record)`` of the newest record saved after a round ``< before`` (0-based), or
        ``(None, a fresh record)``."""
        older = [r for r in self.rounds() if r < before]
        if not older:
            return None, ClientRecord()
        r = older[-1]
        meta = json.loads((self.dir / f"{r:06d}.json").read_text())
        tensors = load_file(str(self.dir / meta["tensors"]))
        obj = trees.unpack(meta["tree"], tensors)
        return r, ClientRecord(cursor=int(obj["cursor"]), memory=obj["memory"], optimizer=obj["optimizer"])

    def save(self, round_: int, record: ClientRecord, base: int | None) -> None:
        """Write the record after round ``round_`` atomically; keep only it and ``base``."""
        tensors: dict[str, torch.Tensor] = {}
        tree = trees.pack({"cursor": record.cursor, "memory": record.memory, "optimizer": record.optimizer}, tensors)
        name = f"{round_:06d}-{uuid.uuid4().hex[:8]}.safetensors"
        write_tensors(self.dir / name, {k: v.detach().cpu().clone() for k, v in tensors.items()})
        write_text(self.dir / f"{round_:06d}.json", json.dumps({"round": round_, "tensors": name, "tree": tree}))
        for r in self.rounds():
            if r not in (round_, base):
                (self.dir / f"{r:06d}.json").unlink(missing_ok=True)
        used = {json.loads((self.dir / f"{r:06d}.json").read_text())["tensors"] for r in self.rounds()}
        for p in self.dir.glob("*.safetensors"):
            if p.name not in used:
                p.unlink(missing_ok=True)


# ---- the handlers ---------------------------------------------------------------------------------------
def _seeded_fn(method: Method, loaded: LoadedModel):
    def regenerate(round_: int) -> dict[str, torch.Tensor]:
        return seeded_state(method, round_, loaded.shapes, loaded.binding.spec)

    return regenerate


def check_allowed_model(cfg: Config, context: Context) -> None:
    """The node's own allow-list of base models: ``node_config["allow-models"]`` (names separated
    by spaces or commas, as ``model.name`` spells them). Unset, the node loads whatever model the
    server's run config names; set, any other ``model.name`` is refused before it is loaded."""
    allowed = context.node_config.get("allow-models")
    if allowed is None:
        return
    names = [n for n in re.split(r"[,\s]+", str(allowed)) if n]
    if cfg.model.name not in names:
        raise PermissionError(
            f"model.name={cfg.model.name!r} is not in this node's allow-models ({', '.join(names) or 'none'}): refused"
        )


def train(msg: Message, context: Context) -> Message:
    header = msg.content.config_records["config"]
    cfg = config_from_dict(yaml.safe_load(str(header["fedlora-config"])))
    check_allowed_model(cfg, context)
    cid = partition_id(context)
    if str(header["client-id"]) != cid:
        raise ValueError(f"message for client {header['client-id']} reached the node of partition-id {cid}")
    if int(context.node_config.get("num-partitions", cfg.partition.num_clients)) != cfg.partition.num_clients:
        raise ValueError(
            f"num-partitions={context.node_config['num-partitions']} but partition.num_clients="
            f"{cfg.partition.num_clients}"
        )
    folder = enter_run(context, header)
    round_ = int(header["round"])
    write_status(folder, round_ + 1, "loading")
    method = build_run_method(cfg)
    loaded = model_for(cfg)
    store = NodeStore(folder)
    flat, chains = store.apply(diff_from_content(msg.content), loaded.initial, _seeded_fn(method, loaded))
    loaded = sync_backbone(cfg, loaded, store, chains)
    binding = loaded.binding
    state, extras = unflatten_state(flat, round_, binding.spec, binding.layers)
    data = data_for(cfg)
    records = RecordStore(folder)
    base, record = records.load(before=round_)
    write_status(folder, round_ + 1, "training")
    out = client_round(
        binding,
        method,
        state,
        record,
        local_data(
            cfg,
            cid,
            data.train,
            data.parts,
            data.task,
            loaded.tokenizer,
            loaded.device,
            packed=packed_batches(cfg, loaded.binding),
        ),
        cfg.train,
        rank=client_rank(cfg, cid),
        num_rounds=cfg.rounds.num_rounds,
        global_extras=extras,
        noise=plan_noise(cfg, data.sizes),  # the server's plan: same config, same partition
    )
    records.save(round_, record, base)
    write_status(folder, round_ + 1, "done")
    metrics = train_metrics(out.stats, out.upload.num_examples, out.upload.step_size)
    content = RecordDict(
        {"upload": factors_record(out.upload.factors), "extras": to_record(out.extras), "metrics": metrics}
    )
    return Message(content, reply_to=msg)


def hello(msg: Message, context: Context) -> Message:
    """Handshake: which client this node is and which version of the state it holds."""
    folder = enter_run(context, msg.content.config_records["config"])
    version = NodeStore(folder).version()
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

__all__ = ["RecordStore", "app", "hello", "node_dir", "train"]
