"""The local optimizer: fused AdamW only on CUDA, and a carried state loads on any device."""

from __future__ import annotations

import copy

import torch

from fedlora.engine.config import TrainConfig
from fedlora.engine.train import fused_adamw, make_optimizer


def params(seed=0):
    torch.manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]


def step(optimizer, ps):
    optimizer.zero_grad()
    sum((p**2).sum() for p in ps).backward()
    optimizer.step()


def test_fused_adamw_is_chosen_for_cuda_only():
    assert fused_adamw(torch.device("cuda")) and fused_adamw(torch.device("cuda", 3))
    assert not fused_adamw(torch.device("cpu"))
    opt = make_optimizer(TrainConfig(), params())
    assert opt.param_groups[0]["fused"] is None  # CPU: torch's default kernel, results as before


def test_a_state_saved_by_the_fused_kernel_continues_on_the_cpu_like_an_unfused_one():
    cfg = TrainConfig(lr=0.1)
    a = params()
    fused = torch.optim.AdamW(a, lr=0.1, weight_decay=cfg.weight_decay, fused=True)  # as a GPU run saves it
    step(fused, a)
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    cont = make_optimizer(cfg, b, copy.deepcopy(fused.state_dict()))  # (loading shares tensors)
    assert cont.param_groups[0]["fused"] is None
    ref = torch.optim.AdamW(a, lr=0.1, weight_decay=cfg.weight_decay)
    ref.load_state_dict(copy.deepcopy(fused.state_dict()))
    ref.param_groups[0]["fused"] = None
    step(cont, b)
    step(ref, a)
    for p, q in zip(a, b):
        assert torch.equal(p, q)
    assert int(cont.state[b[0]]["step"]) == 2
