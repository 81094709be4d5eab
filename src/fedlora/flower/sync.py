"""Keeping each client's copy of the server state and backbone ledger in step, by diffs.

A client needs, to run ``method.client_start``/``client_finish``, the round's
:class:`~fedlora.methods.GlobalState` (global factors and method state), the global extras
(``modules_to_save``) and a backbone equal to the server's (base weights plus every backbone
delta merged so far, in order). The Flower runtime keeps a *mirror* of these on every node and
sends each sampled node only what changed since the version it holds:

- the state is flattened into named tensors (``factor/<module>/A``, ``method/<key>``,
  ``extra/<name>``); the server records the round at which each tensor last changed and sends
  a node at version ``s`` the tensors that changed after ``s`` (a node that has never been
  sampled holds version 0, the initial LoRA every node builds from the seed, so round 1 sends
  nothing);
- backbone deltas form a ledger, one entry per aggregated round, sent as factor pairs
  (``<module>/up`` d_out x q, ``<module>/down`` q x d_in; never dense); a node holding ``l``
  entries receives entries ``l..`` and replays them in order onto its base model, the same
  float operations as the server's, so client and server weights are bit-identical.

State tensors a method draws from its own seed (``Method.seeded_factors``: FLoRA's fresh LoRA)
are not sent when they equal the state's: the diff names them (``seeded``) and the node rebuilds
them with the method's own function before checking the digest.

Versions are checked by digests (SHA-256 over names, dtypes, shapes and bytes): a node whose
copy does not match is answered with a full copy (``state-from = -1``, ledger from 0). The
server's bookkeeping (which round last changed each tensor, the digests of past versions, what
each node holds) goes into the server's checkpoint (:meth:`StateSync.bookkeeping`,
:meth:`StateSync.restore`), so a resumed server keeps sending diffs.

The mirror lives on the node's disk (:class:`NodeStore`), so a restarted SuperNode rebuilds the
same base model. Everything here is plain torch; Flower records are built in ``records.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from safetensors.torch import load_file
from torch import Tensor

from fedlora.atomic import write_tensors, write_text
from fedlora.lowrank import FactoredDelta
from fedlora.methods.base import GlobalState, LoRASpec, Method, ModuleFactors

FULL = -1
"""``state-from`` of a full copy (the node's version is unknown)."""
EXTRA_PREFIX = "extra/"


# ---- state <-> named tensors ---------------------------------------------------------------------
def wire_tensor(t: Tensor) -> Tensor:
    """The tensor as it travels: CPU, contiguous; float64 and integer types kept, other floats
    (bf16, fp16) as float32 (lossless)."""
    t = t.detach().cpu()
    if t.is_floating_point() and t.dtype not in (torch.float32, torch.float64):
        t = t.float()
    return t.contiguous()


def flatten_state(state: GlobalState, extras: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """``factor/<module>/A|B``, ``method/<key>`` and ``extra/<name>`` tensors of a state."""
    out: dict[str, Tensor] = {}
    for m, f in state.factors.items():
        for which in ("A", "B"):
            t = f.get(which)
            if t is not None:
                out[f"factor/{m}/{which}"] = wire_tensor(t)
    for k, v in state.method_state.items():
        out[f"method/{k}"] = wire_tensor(v)
    for k, v in (extras or {}).items():
        out[f"{EXTRA_PREFIX}{k}"] = wire_tensor(v)
    return out


def unflatten_state(
    flat: Mapping[str, Tensor], round_: int, spec: LoRASpec, module_order: Iterable[str] = ()
) -> tuple[GlobalState, dict[str, Tensor]]:
    """The :class:`GlobalState` of round ``round_`` and the extras, from :func:`flatten_state`'s
    tensors; modules in ``module_order`` first (the model's order), then any others."""
    pairs: dict[str, dict[str, Tensor]] = {}
    method_state, extras = {}, {}
    for key, t in flat.items():
        kind, _, rest = key.partition("/")
        if kind == "factor":
            module, _, which = rest.rpartition("/")
            pairs.setdefault(module, {})[which] = t
        elif kind == "method":
            method_state[rest] = t
        elif kind == "extra":
            extras[rest] = t
        else:
            raise ValueError(f"unknown state tensor {key!r}")
    order = [m for m in module_order if m in pairs] + [m for m in pairs if m not in set(module_order)]
    factors = {m: ModuleFactors(A=pairs[m].get("A"), B=pairs[m].get("B")) for m in order}
    return GlobalState(round=round_, factors=factors, spec=spec, method_state=method_state), extras


def seeded_state(
    method: Method, round_: int, shapes: Mapping[str, tuple[int, int]], spec: LoRASpec
) -> dict[str, Tensor]:
    """The state tensors of round ``round_`` the method draws from its seed
    (``method.seeded_factors``), named as :func:`flatten_state` names them; empty for most methods."""
    factors = method.seeded_factors(round_, shapes, spec)
    if not factors:
        return {}
    return flatten_state(GlobalState(round_, factors, spec))


def ledger_entry(deltas: Mapping[str, FactoredDelta]) -> dict[str, Tensor]:
    """One round's backbone deltas as factor pairs (float32, the precision they are applied in)."""
    out = {}
    for m, d in deltas.items():
        if d.is_empty:
            continue
        up, down = d.factors(torch.float32)
        out[f"{m}/up"], out[f"{m}/down"] = up.contiguous(), down.contiguous()
    return out


def entry_deltas(tensors: Mapping[str, Tensor]) -> dict[str, FactoredDelta]:
    """The inverse of :func:`ledger_entry`."""
    out = {}
    for key, up in tensors.items():
        if key.endswith("/up"):
            m = key[: -len("/up")]
            out[m] = FactoredDelta.from_factors(up, tensors[f"{m}/down"])
    return out


def digest(tensors: Mapping[str, Tensor]) -> str:
    """SHA-256 over sorted names, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = wire_tensor(tensors[key])
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def chain(previous: str, entry_digest: str) -> str:
    """Digest of a ledger prefix: ``H_l = sha256(H_{l-1} + digest(entry_l))``, ``H_0 = ""``."""
    return hashlib.sha256((previous + entry_digest).encode()).hexdigest()


def nbytes(tensors: Mapping[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


# ---- the server side -----------------------------------------------------------------------------
@dataclass
class Diff:
    """What one node must receive to reach the server's current version."""

    state_from: int
    state_to: int
    state: dict[str, Tensor]
    removed: list[str]
    ledger_from: int
    ledger: list[dict[str, Tensor]]
    state_digest: str
    ledger_chain: str
    seeded: list[str] = field(default_factory=list)
    """State tensors not sent: the node rebuilds them from the method's seed."""


@dataclass
class NodeVersion:
    round: int
    ledger_len: int


@dataclass
class StateSync:
    """The server's record of the state's history and of what each client holds."""

    current: dict[str, Tensor] = field(default_factory=dict)
    changed: dict[str, int] = field(default_factory=dict)
    removed: dict[str, int] = field(default_factory=dict)
    round: int = -1
    state_digests: dict[int, str] = field(default_factory=dict)
    entries: list[dict[str, Tensor]] = field(default_factory=list)
    chains: list[str] = field(default_factory=lambda: [""])
    nodes: dict[str, NodeVersion] = field(default_factory=dict)
    seeded: list[str] = field(default_factory=list)

    def observe(
        self,
        round_: int,
        flat: Mapping[str, Tensor],
        ledger: list[Mapping[str, FactoredDelta]],
        seeded: Mapping[str, Tensor] | None = None,
    ) -> None:
        """Record the state of round ``round_`` (the one about to be sent) and the ledger so far;
        ``seeded``: the tensors nodes can rebuild from the method's seed (kept out of diffs where
        they equal the state's)."""
        if round_ < self.round:
            raise ValueError(f"state of round {round_} observed after round {self.round}")
        for k, v in flat.items():
            old = self.current.get(k)
            if old is None or old.dtype != v.dtype or old.shape != v.shape or not torch.equal(old, v):
                self.changed[k] = round_
                self.removed.pop(k, None)
        for k in self.current:
            if k not in flat:
                self.removed[k] = round_
                self.changed.pop(k, None)
        self.current = dict(flat)
        self.round = round_
        self.state_digests[round_] = digest(flat)
        self.seeded = sorted(k for k, v in (seeded or {}).items() if k in flat and _same(flat[k], v))
        while len(self.entries) < len(ledger):
            entry = ledger_entry(ledger[len(self.entries)])
            self.entries.append(entry)
            self.chains.append(chain(self.chains[-1], digest(entry)))

    def diff(self, cid: str) -> Diff:
        """What client ``cid`` must receive (everything if its version is unknown)."""
        held = self.nodes.get(cid)
        s, l0 = (held.round, held.ledger_len) if held is not None else (FULL, 0)
        skip = set(self.seeded)
        state = {k: v for k, v in self.current.items() if self.changed[k] > s and k not in skip}
        removed = [k for k, r in self.removed.items() if r > s] if s != FULL else []
        return Diff(
            state_from=s,
            state_to=self.round,
            state=state,
            removed=removed,
            ledger_from=l0,
            ledger=self.entries[l0:],
            state_digest=self.state_digests[self.round],
            ledger_chain=self.chains[-1],
            seeded=[k for k in self.seeded if self.changed[k] > s],
        )

    def acknowledge(self, cid: str) -> None:
        """Client ``cid`` now holds the current version."""
        self.nodes[cid] = NodeVersion(self.round, len(self.entries))

    def forget(self, cid: str) -> None:
        self.nodes.pop(cid, None)

    def adopt(self, cid: str, round_: int, state_digest: str, ledger_len: int, ledger_chain: str) -> bool:
        """Accept a version a node reports (handshake) if it is one this server produced."""
        ok = (
            self.state_digests.get(round_) == state_digest
            and 0 <= ledger_len < len(self.chains)
            and self.chains[ledger_len] == ledger_chain
        )
        if ok:
            self.nodes[cid] = NodeVersion(round_, ledger_len)
        else:
            self.forget(cid)
        return ok

    def bookkeeping(self) -> dict[str, Any]:
        """What a checkpoint must keep besides the state and the ledger (JSON values only)."""
        return {
            "round": self.round,
            "changed": dict(self.changed),
            "removed": dict(self.removed),
            "state_digests": {int(r): d for r, d in self.state_digests.items()},
            "nodes": {c: [v.round, v.ledger_len] for c, v in self.nodes.items()},
        }

    @classmethod
    def restore(
        cls,
        saved: Mapping[str, Any],
        flat: Mapping[str, Tensor],
        ledger: list[Mapping[str, FactoredDelta]],
        seeded: Mapping[str, Tensor] | None = None,
    ) -> StateSync:
        """The bookkeeping of :meth:`bookkeeping` back on the state ``flat`` of round
        ``saved["round"]`` and the ledger (entries and chains are rebuilt from it)."""
        sync = cls()
        sync.observe(int(saved["round"]), flat, ledger, seeded)
        if sync.state_digests[sync.round] != saved["state_digests"].get(sync.round):
            raise ValueError(f"restored state of round {sync.round} does not match the checkpoint's digest")
        if set(saved["changed"]) != set(flat):
            raise ValueError("restored state tensors differ from the checkpoint's bookkeeping")
        sync.changed = {k: int(v) for k, v in saved["changed"].items()}
        sync.removed = {k: int(v) for k, v in saved["removed"].items()}
        sync.state_digests = {int(r): str(d) for r, d in saved["state_digests"].items()}
        sync.nodes = {
            c: NodeVersion(int(v[0]), int(v[1])) for c, v in saved["nodes"].items() if int(v[1]) < len(sync.chains)
        }
        return sync


# ---- the client side -----------------------------------------------------------------------------
class OutOfSync(RuntimeError):
    """The node's copy is not the version a message is a diff from, or the result does not match."""


class NodeStore:
    """A node's mirror of the server state and its ledger, on disk (``node.json`` is the commit).

    Layout: ``state-<round>.safetensors`` (the mirror), ``ledger/<j>.safetensors`` (entry j),
    ``node.json`` = ``{round, state_digest, ledger_len, ledger_chain, chains, keys}``.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    @property
    def info(self) -> dict | None:
        path = self.root / "node.json"
        if not path.exists():
            return None
        return json.loads(path.read_text())

    def load(self, initial: Mapping[str, Tensor]) -> tuple[int, dict[str, Tensor], list[str]]:
        """``(round, state tensors, ledger chains)``; a node without a store holds version 0
        (``initial``, the LoRA init every node builds from the seed) and no ledger."""
        info = self.info
        if info is None:
            return 0, dict(initial), [""]
        tensors = load_file(str(self.root / f"state-{info['round']}.safetensors"))
        return int(info["round"]), {k: tensors[k] for k in info["keys"]}, list(info["chains"])

    def entry(self, j: int) -> dict[str, Tensor]:
        path = self.root / "ledger" / f"{j:06d}.safetensors"
        tensors = load_file(str(path))
        order = json.loads((self.root / "ledger" / f"{j:06d}.json").read_text())
        return {k: tensors[k] for k in order}

    def apply(
        self,
        diff: Diff,
        initial: Mapping[str, Tensor],
        regenerate: Callable[[int], Mapping[str, Tensor]] | None = None,
    ) -> tuple[dict[str, Tensor], list[str]]:
        """Apply a diff (checking versions and digests), commit it, return the new mirror and
        chains; ``regenerate(round)`` rebuilds the tensors the diff leaves to the seed."""
        held, flat, chains = self.load(initial)
        if diff.state_from == FULL:
            flat = {}
        elif diff.state_from != held:
            raise OutOfSync(f"node holds state version {held}, the message is a diff from {diff.state_from}")
        if diff.ledger_from > len(chains) - 1:
            raise OutOfSync(f"node holds {len(chains) - 1} ledger entries, the message starts at {diff.ledger_from}")
        for k in diff.removed:
            flat.pop(k, None)
        flat.update(diff.state)
        if diff.seeded:
            rebuilt = regenerate(diff.state_to) if regenerate is not None else {}
            missing = [k for k in diff.seeded if k not in rebuilt]
            if missing:
                raise OutOfSync(f"cannot rebuild {missing[:3]} of state version {diff.state_to} from the seed")
            flat.update({k: rebuilt[k] for k in diff.seeded})
        if digest(flat) != diff.state_digest:
            raise OutOfSync(f"state version {diff.state_to} does not match the server's after the update")
        chains = chains[: diff.ledger_from + 1]
        for entry in diff.ledger:
            chains.append(chain(chains[-1], digest(entry)))
        if chains[-1] != diff.ledger_chain:
            raise OutOfSync(f"backbone ledger of {len(chains) - 1} entries does not match the server's")
        (self.root / "ledger").mkdir(parents=True, exist_ok=True)
        for j, entry in enumerate(diff.ledger, start=diff.ledger_from):
            write_tensors(self.root / "ledger" / f"{j:06d}.safetensors", entry)
            write_text(self.root / "ledger" / f"{j:06d}.json", json.dumps(list(entry)))
        write_tensors(self.root / f"state-{diff.state_to}.safetensors", flat)
        old = self.info
        info = {
            "round": diff.state_to,
            "state_digest": diff.state_digest,
            "ledger_len": len(chains) - 1,
            "ledger_chain": chains[-1],
            "chains": chains,
            "keys": list(flat),
        }
        write_text(self.root / "node.json", json.dumps(info))
        if old is not None and old["round"] != diff.state_to:
            (self.root / f"state-{old['round']}.safetensors").unlink(missing_ok=True)
        return flat, chains

    def version(self, initial_digest: str | None = None) -> dict:
        """What the node reports in a handshake: its state version and ledger (or a fresh node)."""
        info = self.info
        if info is None:
            return {
                "fresh": True,
                "round": 0,
                "state_digest": initial_digest or "",
                "ledger_len": 0,
                "ledger_chain": "",
            }
        return {
            "fresh": False,
            "round": int(info["round"]),
            "state_digest": info["state_digest"],
            "ledger_len": int(info["ledger_len"]),
            "ledger_chain": info["ledger_chain"],
        }


def _same(a: Tensor, b: Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
