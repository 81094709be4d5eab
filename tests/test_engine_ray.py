"""engine.backend=ray: clients train in parallel Ray workers and the run equals the local one
(metrics record for record, final adapter bit for bit on the CPU); a killed worker fails its
client for the round, a fresh worker takes over; bad engine settings are refused by key."""

from __future__ import annotations

import importlib.util
import os
import signal

import pytest
import torch

from fedlora.configs import preset_path
from fedlora.engine.config import ConfigError, load_config
from fedlora.engine.local import local_run
from fedlora.model.adapter_io import read_adapter
from helpers import run_records, tiny_llama

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs ray (the flower extra)")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def config(tmp_path, model, name: str, **sets):
    base = {
        "output_dir": str(tmp_path),
        "name": name,
        "model.name": str(model),
        "method.name": "fedsa_lora",  # each client's own B travels with it
        "task.settings": "{n_train: 24, n_test: 2, max_new_tokens: 4, max_length: 64}",
        "partition.num_clients": "4",
        "rounds.num_rounds": "3",
        "rounds.clients_per_round": "3",
        "rounds.eval_baseline": "false",
        "train.max_steps": "2",
        "train.optimizer_state": "carry",  # and its optimizer state
    }
    return load_config(preset_path("ci"), {**base, **sets})


def test_ray_workers_reproduce_the_local_run(tmp_path, tiny):
    """With what travels beside the factors: each client's own B, its carried optimizer state and
    its SCAFFOLD variate (records), the server's variate (method state), FedAdam's moments (the
    engine's) and a TensorBoard tracker."""
    extra = {"train.scaffold": "true", "server.optimizer": "fedadam", "server.lr": "0.01"}
    extra["logging.trackers"] = "[tensorboard]"
    local_run(config(tmp_path, tiny, "local", **extra), progress=False).run()
    engine = local_run(
        config(tmp_path, tiny, "ray", **{"engine.backend": "ray", "engine.workers": "2", **extra}), progress=False
    )
    engine.run()
    assert all(r["report"]["control_norm"] > 0 for r in run_records(tmp_path / "ray"))
    assert any(k.startswith("scaffold/c_i/") for r in engine.clients.values() for k in r.memory)
    assert engine.server_opt and list((tmp_path / "ray" / "tensorboard").glob("events.out.tfevents.*"))
    assert type(engine.trainer).__name__ == "RayTrainer" and not engine.trainer.workers  # closed
    a, b = run_records(tmp_path / "local"), run_records(tmp_path / "ray")
    assert [r["clients"] for r in a] == [r["clients"] for r in b] and len(a) == 3
    assert a == b
    fa, fb = read_adapter(tmp_path / "local" / "final"), read_adapter(tmp_path / "ray" / "final")
    for m in fa.factors:
        assert torch.equal(fa.factors[m].A, fb.factors[m].A) and torch.equal(fa.factors[m].B, fb.factors[m].B)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
def test_on_a_4bit_base_the_workers_rebuild_the_side_path_and_equal_the_local_run(tmp_path, tiny):
    """FLoRA puts a backbone delta on the nf4 base's side path every round; each worker replays the
    ledger onto its own model, so round 3's clients train on the server's backbone exactly. With
    sample-level DP where Opacus is installed: each worker derives the server's noise plan and
    runs DP-SGD with the same seeded noise."""
    sets = {"model.dtype": "bfloat16", "model.quantization": "nf4", "method.name": "flora", "method.settings": "{}"}
    dp = importlib.util.find_spec("opacus") is not None
    if dp:
        sets.update({"privacy.mode": "sample", "privacy.epsilon": "8"})
    local_run(config(tmp_path, tiny, "local4", **sets), progress=False).run()
    engine = local_run(config(tmp_path, tiny, "ray4", **sets, **{"engine.backend": "ray"}), progress=False)
    engine.run()
    assert engine.binding.backbone_mode == "side" and engine.binding.backbone_report()["side_rank_max"] > 0
    assert run_records(tmp_path / "local4") == run_records(tmp_path / "ray4")
    assert not dp or 0 < run_records(tmp_path / "ray4")[-1]["privacy"]["epsilon"] <= 8


def test_a_killed_worker_fails_its_client_and_is_replaced(tmp_path, tiny, monkeypatch):
    import ray

    from fedlora.engine.ray_runtime import RayTrainer

    real = RayTrainer.train

    def kill_first_worker_in_round_2(self, clients, progress):
        if self.engine.state.round == 1:
            os.kill(ray.get(self.workers[0].pid.remote()), signal.SIGKILL)
        return real(self, clients, progress)

    monkeypatch.setattr(RayTrainer, "train", kill_first_worker_in_round_2)
    cfg = config(tmp_path, tiny, "killed", **{"engine.backend": "ray", "engine.workers": "2"})
    local_run(cfg, progress=False).run()
    lines = run_records(tmp_path / "killed")
    assert [r["round"] for r in lines] == [1, 2, 3]
    failed = lines[1]["rejected"]
    assert (
        len(failed) == 1
        and failed[0]["client"] == lines[1]["clients"][0]
        and failed[0]["reason"].startswith("ray worker 0: ActorDiedError")
    )
    assert not lines[1]["skipped"] and len(lines[1]["train"]) == 2  # the round went on
    assert not lines[2]["rejected"] and len(lines[2]["train"]) == 3  # a fresh worker trained in round 3


def test_out_of_memory_in_a_worker_fails_its_client_and_the_worker_is_replaced(tmp_path, tiny, monkeypatch):
    """A CUDA out-of-memory error raised inside a worker's training (simulated: no GPU here) fails
    that client for the round, named in ``rejected``; the round goes on and the worker, whose
    model state is unknown after the error, is replaced before it trains again."""
    import sys

    import ray

    from fedlora import trees
    from fedlora.engine import ray_runtime
    from fedlora.engine.setup import sample_clients

    victim = sample_clients(0, 1, ["0", "1", "2", "3"], 3)[0]  # the config's seed, round 2's sample

    class OutOfMemoryInRound2(ray_runtime.ClientWorker):
        def train(self, state_blob, ledger_blob, first, cid, record_blob):  # type: ignore[no-untyped-def]
            if cid == victim and trees.from_bytes(state_blob)["state"]["round"] == 1:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
            return super().train(state_blob, ledger_blob, first, cid, record_blob)

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import tests/
    monkeypatch.setattr(ray_runtime, "ClientWorker", OutOfMemoryInRound2)
    replaced = []
    real_replace = ray_runtime.RayTrainer._replace
    monkeypatch.setattr(ray_runtime.RayTrainer, "_replace", lambda self, w: replaced.append(w) or real_replace(self, w))
    cfg = config(tmp_path, tiny, "oom", **{"engine.backend": "ray", "engine.workers": "2"})
    local_run(cfg, progress=False).run()
    lines = run_records(tmp_path / "oom")
    assert [r["round"] for r in lines] == [1, 2, 3] and victim in lines[1]["clients"]
    (failed,) = lines[1]["rejected"]
    assert failed["client"] == victim and "OutOfMemoryError: CUDA out of memory" in failed["reason"], failed
    assert failed["reason"].startswith("ray worker ")
    assert len(lines[1]["train"]) == 2 and not lines[1]["skipped"]  # the round went on
    assert len(replaced) == 1 and not lines[2]["rejected"] and len(lines[2]["train"]) == 3


@pytest.mark.parametrize(
    "sets,needle",
    [
        ({"engine.workers": "4"}, "engine.workers=4 exceeds the 3 clients"),
        ({"engine.gpus_per_worker": "0.5"}, "engine.gpus_per_worker=0.5 but this machine has no GPU"),
        ({"engine.cpus_per_worker": "nan"}, "engine.cpus_per_worker=nan is not a finite number"),
        ({"engine.backend": "dask"}, "engine.backend='dask' is not allowed"),
    ],
)
def test_bad_engine_settings_are_refused_by_key(tmp_path, sets, needle):
    if "gpus" in needle and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.").replace("(", r"\(")):
        config(tmp_path, "unused", "bad", **{"engine.backend": "ray", **sets})
