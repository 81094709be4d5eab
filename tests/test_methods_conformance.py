"""The method contract over a few simulated rounds, for every registered method; every method registered and tested."""

from __future__ import annotations

import copy
import importlib
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fedlora
import fedlora.methods
from fedlora.lowrank import FactoredDelta
from fedlora.methods import ClientContext, ClientUpload, ModuleFactors, available_methods, build_method, method_class
from fedlora.methods.base import AB, Method
from fedlora.methods.validation import check_upload
from helpers import F64, gen, make_state, module_shapes, randn

RANK = 2
SHAPES = module_shapes(13, 7)
ROUNDS = 3


def client_ranks(method) -> list[int]:
    if method.heterogeneous_ranks and method.ranks_above_global:
        return [RANK, RANK + 1, 1]
    if method.heterogeneous_ranks:
        return [RANK, 1, RANK]
    return [RANK, RANK, RANK]


class FakeGrad:
    def __init__(self, seed, dtype):
        g = gen(seed)
        self.grads = {m: randn(d_out, d_in, g=g, dtype=dtype) for m, (d_out, d_in) in SHAPES.items()}
        self.calls = 0

    def __call__(self, offsets):
        self.calls += 1
        for m, d in offsets.items():
            assert isinstance(d, FactoredDelta) and (d.d_out, d.d_in) == SHAPES[m]
        return {m: t.clone() for m, t in self.grads.items()}


def snapshot(factors):
    return {m: (None if f.A is None else f.A.clone(), None if f.B is None else f.B.clone()) for m, f in factors.items()}


def same(factors, snap) -> bool:
    for m, (A, B) in snap.items():
        f = factors[m]
        for t, ref in ((f.A, A), (f.B, B)):
            if (t is None) != (ref is None) or (t is not None and not torch.equal(t, ref)):
                return False
    return True


def upload_bytes(uploads) -> int:
    return sum(
        t.numel() * t.element_size() for u in uploads for f in u.factors.values() for t in (f.A, f.B) if t is not None
    )


def train(start, seed):
    """Fake local training: perturb the trainable factors, keep the frozen ones bit-identical."""
    g = gen(seed)
    out = {}
    for m, f in start.factors.items():
        A = f.A + 0.1 * randn(*f.A.shape, g=g, dtype=f.A.dtype) if "A" in start.trainable else f.A.clone()
        B = f.B + 0.1 * randn(*f.B.shape, g=g, dtype=f.B.dtype) if "B" in start.trainable else f.B.clone()
        out[m] = ModuleFactors(A=A, B=B)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", available_methods())
def test_method_contract_over_rounds(name, dtype):
    method = build_method(name)
    state = make_state(SHAPES, RANK, alpha=4.0, seed=1, dtype=dtype, zero_b=True)
    ranks = client_ranks(method)
    memories: dict[str, dict] = {f"c{i}": {} for i in range(len(ranks))}
    grads = {cid: FakeGrad(i, dtype) for i, cid in enumerate(memories)}
    for t in range(ROUNDS):
        assert state.round == t
        state_snap, ms_snap = snapshot(state.factors), {k: v.clone() for k, v in state.method_state.items()}
        uploads = []
        for i, (cid, r) in enumerate(zip(memories, ranks)):
            ctx = ClientContext(
                cid,
                t,
                r,
                num_rounds=ROUNDS,
                memory=memories[cid],
                seed=7,
                grad_fn=grads[cid] if method.needs_gradient else None,
            )
            start = method.client_start(state, ctx)
            # ---- where the client starts
            assert set(start.factors) == set(SHAPES)
            assert start.trainable and start.trainable <= AB
            assert start.upload and start.upload <= AB
            assert start.upload == method.uploaded_factors(state)
            for m, (d_out, d_in) in SHAPES.items():
                f = start.factors[m]
                assert f.B.shape == (d_out, r) and f.A.shape == (r, d_in), (m, f.B.shape, f.A.shape)
                assert bool(torch.isfinite(f.A).all() and torch.isfinite(f.B).all())
            for m, d in start.local_shift.items():
                assert m in SHAPES and (d.d_out, d.d_in) == SHAPES[m]
            if not method.needs_gradient:
                assert start.local_shift == {}
            # ---- training must not write through into the global state: no shared storage
            global_ptrs = {
                t.untyped_storage().data_ptr() for f in state.factors.values() for t in (f.A, f.B) if t is not None
            }
            for m, f in start.factors.items():
                assert f.A.untyped_storage().data_ptr() not in global_ptrs, f"{m}.A aliases the global state"
                assert f.B.untyped_storage().data_ptr() not in global_ptrs, f"{m}.B aliases the global state"
            trained = train(start, seed=100 * t + i)
            upload, memory = method.client_finish(state, ctx, start, trained)
            assert set(upload) == set(SHAPES)
            for m, f in upload.items():
                present = {x for x in ("A", "B") if f.get(x) is not None}
                assert present == set(start.upload), (m, present)
                assert f.rank == r
            assert all(isinstance(v, torch.Tensor) for v in memory.values())
            memories[cid] = memory
            up = ClientUpload(cid, upload, num_examples=5 + 3 * i)
            check_upload(up, state, method, r if method.heterogeneous_ranks else None)
            uploads.append(up)
        assert same(state.factors, state_snap), "client hooks modified the global factors"
        up_snap = [snapshot(u.factors) for u in uploads]
        res = method.aggregate(state, uploads)
        again = method.aggregate(state, uploads)
        # ---- inputs untouched, result deterministic
        assert same(state.factors, state_snap), "aggregate modified the global factors"
        assert all(torch.equal(v, ms_snap[k]) for k, v in state.method_state.items())
        assert all(same(u.factors, s) for u, s in zip(uploads, up_snap)), "aggregate modified the uploads"
        assert same(again.state.factors, snapshot(res.state.factors)), "aggregate is not deterministic"
        # ---- the result
        assert res.state.round == t + 1
        assert res.state.spec == state.spec
        assert set(res.state.factors) == set(SHAPES)
        for m, (d_out, d_in) in SHAPES.items():
            f = res.state.factors[m]
            assert f.A is not None and f.B is not None
            assert f.B.shape == (d_out, RANK) and f.A.shape == (RANK, d_in)
            assert f.A.is_floating_point() and f.B.is_floating_point()
            assert bool(torch.isfinite(f.A).all() and torch.isfinite(f.B).all())
        assert res.bytes_up == upload_bytes(uploads)
        assert res.bytes_down > 0
        if method.changes_backbone:
            assert set(res.backbone_delta) == set(SHAPES)
            for m, d in res.backbone_delta.items():
                assert (d.d_out, d.d_in) == SHAPES[m]
                assert bool(torch.isfinite(d.dense()).all())
        else:
            assert res.backbone_delta == {}
        for k, v in res.state.method_state.items():
            assert isinstance(k, str) and isinstance(v, torch.Tensor)
        state = res.state
    if method.needs_gradient:
        assert all(g.calls == ROUNDS for g in grads.values())
    final, flushed = method.finalize(state)
    assert final.round == state.round
    for m, d in flushed.items():
        assert isinstance(d, FactoredDelta) and (d.d_out, d.d_in) == SHAPES[m]


@pytest.mark.parametrize("name", available_methods())
def test_untrained_round_trip(name):
    """A client that trains nothing sends back what it started from (FedSmoothLoRA: its
    change relative to the start, zero)."""
    method = build_method(name)
    state = make_state(SHAPES, RANK, seed=2, round_=1)
    grad = FakeGrad(0, F64)
    ctx = ClientContext("c", 1, RANK, num_rounds=4, grad_fn=grad if method.needs_gradient else None)
    start = method.client_start(state, ctx)
    untouched = {m: ModuleFactors(A=f.A.clone(), B=f.B.clone()) for m, f in start.factors.items()}
    upload, _ = method.client_finish(state, ctx, start, untouched)
    for m, f in upload.items():
        if method.needs_gradient:
            assert float((f.B @ f.A).abs().max()) <= 1e-12 * float(grad.grads[m].norm()) + 1e-12
            continue
        for x in start.upload:
            assert torch.equal(f.get(x), start.factors[m].get(x))


@pytest.mark.parametrize("name", available_methods())
def test_registered_method_declares_itself(name):
    cls = method_class(name)
    assert cls.name == name and cls.summary
    assert copy.copy(build_method(name).settings) == cls.Settings()


def test_every_method_module_is_registered():
    """Every method class defined in a module of ``fedlora/methods/`` is registered by ``import
    fedlora.methods`` alone (asked in a fresh interpreter: imports done by the tests could
    register it here)."""
    defined = {}
    for info in pkgutil.iter_modules(fedlora.methods.__path__):
        module = importlib.import_module(f"{fedlora.methods.__name__}.{info.name}")
        for obj in vars(module).values():
            ours = isinstance(obj, type) and issubclass(obj, Method) and obj.__module__ == module.__name__
            if ours and "name" in vars(obj):  # a method, not an abstract helper base
                defined[obj.name] = info.name
    assert defined, "no method modules found"
    src = str(Path(fedlora.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    code = "import fedlora.methods as m; print(m.__file__); print(' '.join(m.available_methods()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    package_file, names = out.stdout.splitlines()
    assert Path(package_file) == Path(fedlora.methods.__file__), "the fresh interpreter imported another fedlora"
    missing = {name: module for name, module in defined.items() if name not in names.split()}
    assert not missing, f"method modules not registered by `import fedlora.methods`: {missing}"


@pytest.mark.parametrize("name", available_methods())
def test_every_method_has_its_reference_test(name):
    """Adding a method means adding ``tests/test_method_<name>.py`` with its reference tests."""
    path = Path(__file__).with_name(f"test_method_{name}.py")
    assert path.is_file(), f"method {name!r} has no reference test file {path.name}"
    assert f'"{name}"' in path.read_text(), f"{path.name} never builds {name!r}"
