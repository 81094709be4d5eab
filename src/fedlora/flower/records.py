"""Tensors, diffs, uploads and client records as Flower records (numpy arrays, never pickle).

Message layout (server -> client, ``train``):

- ``config`` (ConfigRecord): ``server-round`` (1-based), ``round`` (0-based), ``client-id``,
  ``fedlora-config`` (the resolved YAML every node runs with) and the sync header
  (``state-from``/``state-to``/``state-digest``/``state-removed``/``state-seeded``,
  ``ledger-from``/``ledger-chain``) and ``run-key`` (names the node's folder for this run);
- ``state`` (ArrayRecord): the state tensors that changed since the node's version;
- ``ledger`` (ArrayRecord): the backbone-delta factor pairs the node lacks, ``<j>|<module>/up|down``
  (``ledger-count`` entries from ``ledger-from``; an entry of a round that merged nothing is empty).

Reply (client -> server): ``upload`` (ArrayRecord ``<module>/A|B``: only the factors the method
sends), ``extras`` (ArrayRecord, ``modules_to_save`` tensors, empty for causal LMs) and
``metrics`` (MetricRecord: ``num-examples``, ``train-loss``, ``steps``, ``examples``, ``seconds``
and ``report.<name>`` for each number of the method's client report).
"""

from __future__ import annotations

import json
from typing import Any, Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from torch import Tensor

from fedlora.flower.sync import Diff, wire_tensor
from fedlora.methods.base import Factors, ModuleFactors

LEDGER_SEP = "|"


def to_record(tensors: Mapping[str, Tensor]) -> ArrayRecord:
    """Named tensors as an ArrayRecord (see :func:`~fedlora.flower.sync.wire_tensor` for dtypes)."""
    return ArrayRecord({k: Array(np.ascontiguousarray(wire_tensor(t).numpy())) for k, t in tensors.items()})


def from_record(record: ArrayRecord) -> dict[str, Tensor]:
    """The tensors of an ArrayRecord, in its order (copies: writable, owned by torch)."""
    return {k: torch.from_numpy(np.array(arr.numpy(), copy=True)) for k, arr in record.items()}


def payload_bytes(record: ArrayRecord, prefix: str = "") -> int:
    """Raw tensor bytes of a record's arrays whose key starts with ``prefix`` (``count_bytes()``
    adds each array's .npy header and its key)."""
    total = 0
    for key, arr in record.items():
        if key.startswith(prefix):
            total += int(np.prod(arr.shape, dtype=np.int64)) * np.dtype(arr.dtype).itemsize
    return total


# ---- server -> client -----------------------------------------------------------------------------
def diff_content(diff: Diff, config: dict[str, Any]) -> RecordDict:
    ledger = {}
    for j, entry in enumerate(diff.ledger, start=diff.ledger_from):
        for key, t in entry.items():
            ledger[f"{j}{LEDGER_SEP}{key}"] = t
    header = {
        **config,
        "state-from": diff.state_from,
        "state-to": diff.state_to,
        "state-digest": diff.state_digest,
        "state-removed": json.dumps(diff.removed),
        "state-seeded": json.dumps(diff.seeded),
        "ledger-from": diff.ledger_from,
        "ledger-count": len(diff.ledger),
        "ledger-chain": diff.ledger_chain,
    }
    return RecordDict({"config": ConfigRecord(header), "state": to_record(diff.state), "ledger": to_record(ledger)})


def diff_from_content(content: RecordDict) -> Diff:
    cfg = content.config_records["config"]
    entries: dict[int, dict[str, Tensor]] = {}
    for key, t in from_record(content.array_records["ledger"]).items():
        j, _, name = key.partition(LEDGER_SEP)
        entries.setdefault(int(j), {})[name] = t
    start, count = int(cfg["ledger-from"]), int(cfg["ledger-count"])
    if any(not start <= j < start + count for j in entries):
        raise ValueError(f"ledger entries {sorted(entries)} outside {start}..{start + count - 1}")
    return Diff(
        state_from=int(cfg["state-from"]),
        state_to=int(cfg["state-to"]),
        state=from_record(content.array_records["state"]),
        removed=list(json.loads(str(cfg["state-removed"]))),
        ledger_from=start,
        ledger=[entries.get(j, {}) for j in range(start, start + count)],  # a round may merge nothing
        state_digest=str(cfg["state-digest"]),
        ledger_chain=str(cfg["ledger-chain"]),
        seeded=list(json.loads(str(cfg.get("state-seeded", "[]")))),
    )


# ---- client -> server -----------------------------------------------------------------------------
def factors_record(factors: Factors) -> ArrayRecord:
    tensors = {}
    for m, f in factors.items():
        for which in ("A", "B"):
            t = f.get(which)
            if t is not None:
                tensors[f"{m}/{which}"] = t
    return to_record(tensors)


def factors_from_record(record: ArrayRecord) -> Factors:
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, t in from_record(record).items():
        m, _, which = key.rpartition("/")
        if which not in ("A", "B") or not m:
            raise ValueError(f"upload key {key!r} is not <module>/A or <module>/B")
        pairs.setdefault(m, {})[which] = t
    return {m: ModuleFactors(A=p.get("A"), B=p.get("B")) for m, p in pairs.items()}


REPORT_PREFIX = "report."


def train_metrics(stats: Mapping[str, Any], num_examples: int, step_size: float = 0.0) -> MetricRecord:
    """A client's training stats (``client_round``'s), its sample count and the sum of its steps'
    learning rates (``ClientUpload.step_size``) as the reply's MetricRecord."""
    return MetricRecord(
        {
            "num-examples": int(num_examples),
            "step-size": float(step_size),
            "train-loss": float(stats["loss"]),
            "steps": int(stats["steps"]),
            "examples": int(stats["examples"]),
            "seconds": float(stats["seconds"]),
            **{REPORT_PREFIX + k: float(v) for k, v in stats.get("report", {}).items()},
        }
    )


def train_stats_from_metrics(metrics: MetricRecord) -> dict[str, Any]:
    """The stats :func:`train_metrics` encoded (``num-examples`` is the upload's, not a stat)."""
    stats: dict[str, Any] = {
        "loss": float(metrics["train-loss"]),
        "steps": int(metrics["steps"]),
        "examples": int(metrics["examples"]),
        "seconds": float(metrics["seconds"]),
    }
    report = {k.removeprefix(REPORT_PREFIX): float(v) for k, v in metrics.items() if k.startswith(REPORT_PREFIX)}
    if report:
        stats["report"] = report
    return stats


# ---- what a client keeps between rounds (its record on the node's disk) -----------------------------
