"""What every process of a run builds the same way from the config: the data and its partition,
the model with its LoRA, each client's rank and local data, and the seeded choice of clients.

The engine's server side (:mod:`fedlora.engine.rounds`) and every runtime's client side (the
local trainer, a Flower ClientApp, a Ray worker) call these functions, so each of them holds
the same examples, the same partition and the same initial factors for the same config and seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import torch

from fedlora.engine.client import LocalData
from fedlora.engine.config import Config
from fedlora.methods import Method, build_method
from fedlora.methods.scaffold import Scaffold
from fedlora.model.binding import LoRABinding, LoRASettings


def build_run_method(cfg: Config) -> Method:
    """The run's method: ``method.name`` with its settings, wrapped in SCAFFOLD's control variates
    when ``train.scaffold`` (:mod:`fedlora.methods.scaffold`). Every runtime's server and clients
    build it here."""
    method = build_method(cfg.method.name, cfg.method.settings)
    return Scaffold(method, cfg.partition.num_clients) if cfg.train.scaffold else method


def device_for(name: str) -> torch.device:
    """``auto`` (cuda if available), ``cpu``, ``cuda``, ``cuda:N``; a GPU this machine does not
    have is refused by key (``model.device``) before anything loads."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"model.device={name!r} but this machine has no CUDA GPU; use auto or cpu")
        if device.index is not None and device.index >= count:
            raise ValueError(f"model.device={name!r} but this machine has {count} GPU(s): cuda:0..cuda:{count - 1}")
    return device


@dataclass
class RunData:
    """The task, its train/test split and the partition of the train examples over clients."""

    task: Any
    train: Any
    test: Any
    groups: list[str]
    parts: list[list[int]]
    test_groups: list[str] = field(default_factory=list)

    @property
    def client_ids(self) -> list[str]:
        return [str(i) for i in range(len(self.parts))]

    @property
    def sizes(self) -> dict[str, int]:
        """Each client's number of training examples."""
        return {cid: len(p) for cid, p in zip(self.client_ids, self.parts)}


def prepare_data(cfg: Config) -> RunData:
    """Build the task, load its data and partition the train examples (all seeded by ``cfg.seed``)."""
    from fedlora.tasks import build_task

    task = build_task(cfg.task.name, cfg.task.settings, seed=cfg.seed)
    check_task_fits_model(cfg, task)
    data = task.load()
    groups = [str(ex.get(data.group_key, "")) for ex in data.train]
    test_groups = [str(ex.get(data.group_key, "")) for ex in data.test]
    return RunData(task, data.train, data.test, groups, partition_clients(cfg, groups), test_groups)


def check_task_fits_model(cfg: Config, task: Any) -> None:
    """Fail before any model is loaded or client trained when the task needs another head:
    ``model.kind`` must be the task's kind and ``model.num_labels`` its number of outputs."""
    kind = getattr(task, "kind", None)
    if kind is not None and kind != cfg.model.kind:
        raise ValueError(f"task {cfg.task.name!r} trains a {kind} model but model.kind is {cfg.model.kind!r}")
    needed = getattr(task, "num_labels", None)
    if cfg.model.kind == "seq_cls" and needed is not None and int(needed) != cfg.model.num_labels:
        raise ValueError(
            f"task {cfg.task.name!r} ({cfg.task.settings.get('dataset', cfg.task.name)}) needs a head with {needed} "
            f"output(s) but model.num_labels is {cfg.model.num_labels}: set model.num_labels: {needed}"
        )


def personal_test_sets(cfg: Config, data: RunData) -> dict[str, list[int]]:
    """Each client's test set for personalised evaluation (its own group mix; seeded)."""
    from fedlora.data.partition import matched_test_sets

    size = cfg.rounds.personal_test_size or len(data.test)
    sets = matched_test_sets(data.groups, data.parts, data.test_groups, max(size, 1), cfg.seed)
    return dict(zip(data.client_ids, sets))


def partition_clients(cfg: Config, groups: list[str]) -> list[list[int]]:
    from fedlora.data import partition as P

    p = cfg.partition
    if p.scheme == "iid":
        return P.iid(len(groups), p.num_clients, cfg.seed)
    if p.scheme == "dirichlet":
        return P.dirichlet(groups, p.num_clients, p.alpha, cfg.seed, min_size=p.min_size)
    if p.scheme == "k_classes":
        return P.k_classes(groups, p.num_clients, p.k, cfg.seed)
    return P.natural(groups)


def build_binding(cfg: Config, device: torch.device) -> tuple[Any, LoRABinding]:
    """The tokenizer and the PEFT-wrapped base model with its LoRA initialised from ``cfg.seed``:
    every runtime that builds them this way starts from the same global factors."""
    from fedlora.model.loading import load_model, load_tokenizer
    from fedlora.model.quantization import check_quantization

    dtype = getattr(torch, cfg.model.dtype)
    tokenizer = load_tokenizer(cfg.model.name)
    torch.manual_seed(cfg.seed)
    check_quantization(cfg.model.quantization, device, dtype)
    model = load_model(
        cfg.model.name,
        cfg.model.kind,
        dtype=dtype,
        num_labels=cfg.model.num_labels,
        device=str(device),
        quantization=cfg.model.quantization,
        attention=cfg.model.attention,
    )
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoRASettings(
        rank=cfg.lora.rank,
        alpha=cfg.lora.alpha,
        targets=tuple(cfg.lora.targets),
        dropout=cfg.lora.dropout,
        rslora=cfg.lora.rslora,
        modules_to_save=("classifier", "score") if cfg.model.kind == "seq_cls" else (),
        init=cfg.lora.init,
        backbone_delta=cfg.model.backbone_delta,
        side_rtol=cfg.model.side_rtol,
        side_max_rank=cfg.model.side_max_rank,
    )
    task_type = "SEQ_CLS" if cfg.model.kind == "seq_cls" else "CAUSAL_LM"
    binding = LoRABinding(model, lora, task_type=task_type, base_name=cfg.model.name)
    return tokenizer, binding


def client_rank(cfg: Config, cid: str) -> int:
    return int(cfg.lora.client_ranks.get(cid, cfg.lora.rank))


def packed_batches(cfg: Config, binding: LoRABinding) -> bool:
    """Whether clients train on padding-free rows (``train.packing``; :mod:`fedlora.model.packing`):
    ``pad`` never, ``auto`` where the model keeps packed sequences apart, ``flatten`` always,
    refused by key where the model cannot. Never under sample-level DP (per-example gradients need
    one example per row; ``flatten`` is refused with it)."""
    if cfg.train.packing == "pad" or cfg.model.kind != "causal_lm" or cfg.privacy.mode == "sample":
        return False
    if binding.accepts_packed_sequences:
        return True
    if cfg.train.packing == "flatten":
        raise ValueError(
            f"train.packing='flatten' but the model {cfg.model.name!r} does not keep sequences packed into one row "
            "apart (its logits differ from the unpacked ones); use train.packing=auto or pad"
        )
    return False


def local_data(
    cfg: Config,
    cid: str,
    examples: Any,
    parts: list[list[int]],
    task: Any,
    tokenizer: Any,
    device: torch.device,
    *,
    packed: bool = False,
) -> LocalData:
    """Client ``cid``'s training data (its partition of ``examples``) and batching (``packed``: see
    :func:`packed_batches`)."""
    return LocalData(
        client_id=cid,
        examples=examples,
        indices=parts[int(cid)],
        task=task,
        tokenizer=tokenizer,
        device=device,
        seed=cfg.seed,
        batch_size=cfg.train.batch_size,
        packed=packed,
    )


def sample_clients(seed: int, round_: int, client_ids: list[str], k: int) -> list[str]:
    """The ``k`` clients of round ``round_`` (0-based), sorted by id: a pure function of the seed."""
    return sorted(random.Random(f"{seed}:sample:{round_}").sample(client_ids, k), key=int)
