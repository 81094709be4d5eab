"""Shared helpers for the lowrank / methods tests: random factors, states, uploads and dense
float64 references computed independently of the code under test. Test files import them as
``from helpers import ...`` (``tests/`` is on ``sys.path``: pytest's ``pythonpath`` in pyproject)."""

from __future__ import annotations

import math
import typing
from collections.abc import Mapping, Sequence
from typing import ClassVar

import pytest
import torch
from torch import Tensor

from fedlora.methods import method_class
from fedlora.methods.base import ClientUpload, GlobalState, LoRASpec, Method, ModuleFactors

F64 = torch.float64


# Three modules: two of one shape (so batched SVD paths group them) and one transposed shape.
# Every shape is non-square.
SHAPES = [(13, 7), (6, 11), (32, 20)]
RANKS = [1, 2, 4]
CLIENTS = [1, 2, 5]


def module_shapes(d_out: int, d_in: int) -> dict[str, tuple[int, int]]:
    return {"layer0.q": (d_out, d_in), "layer0.v": (d_in, d_out), "layer1.q": (d_out, d_in)}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, g: torch.Generator, dtype: torch.dtype = F64) -> Tensor:
    return torch.randn(*shape, generator=g, dtype=dtype)


def rand_factors(d_out: int, d_in: int, rank: int, g: torch.Generator, dtype: torch.dtype = F64) -> ModuleFactors:
    """Random, non-symmetric LoRA factors (B d_out x rank, A rank x d_in)."""
    return ModuleFactors(A=randn(rank, d_in, g=g, dtype=dtype), B=randn(d_out, rank, g=g, dtype=dtype))


def make_state(
    shapes: Mapping[str, tuple[int, int]],
    rank: int,
    *,
    alpha: float = 3.0,
    use_rslora: bool = False,
    round_: int = 0,
    seed: int = 0,
    dtype: torch.dtype = F64,
    zero_b: bool = False,
) -> GlobalState:
    g = gen(seed)
    factors = {}
    for m, (d_out, d_in) in shapes.items():
        f = rand_factors(d_out, d_in, rank, g, dtype)
        if zero_b:
            f = ModuleFactors(A=f.A, B=torch.zeros_like(f.B))
        factors[m] = f
    return GlobalState(round=round_, factors=factors, spec=LoRASpec(rank, alpha, use_rslora))


def make_uploads(
    shapes: Mapping[str, tuple[int, int]],
    ranks: Sequence[int],
    *,
    seed: int = 1,
    dtype: torch.dtype = F64,
    only: frozenset[str] | None = None,
) -> list[ClientUpload]:
    """One upload per entry of ``ranks`` (client i has rank ``ranks[i]``), unequal sample counts."""
    g = gen(seed)
    uploads = []
    for i, r in enumerate(ranks):
        factors = {m: rand_factors(d_out, d_in, r, g, dtype) for m, (d_out, d_in) in shapes.items()}
        if only is not None:
            factors = {m: f.only(only) for m, f in factors.items()}
        n = int(torch.randint(1, 100, (1,), generator=g))
        uploads.append(ClientUpload(f"client{i}", factors, num_examples=n))
    return uploads


def weights_for(uploads: Sequence[ClientUpload], mode: str, seed: int = 7) -> tuple[list[float] | None, list[float]]:
    """``(weights argument, normalised p)`` for weight mode ``samples`` or ``explicit``."""
    if mode == "samples":
        raw = [float(u.num_examples) for u in uploads]
        arg = None
    else:
        g = gen(seed)
        raw = [float(x) for x in (torch.rand(len(uploads), generator=g, dtype=F64) * 5 + 0.1)]
        arg = raw
    total = math.fsum(raw)
    return arg, [w / total for w in raw]


def scale(alpha: float, rank: int, rslora: bool = False) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def dense_sum(uploads: Sequence[ClientUpload], module: str, coef: Sequence[float]) -> Tensor:
    """``sum_i coef_i B_i A_i`` formed densely in float64."""
    out = None
    for u, c in zip(uploads, coef):
        f = u.factors[module]
        term = c * (f.B.to(F64) @ f.A.to(F64))
        out = term if out is None else out + term
    assert out is not None
    return out


def dense_mean(tensors: Sequence[Tensor], p: Sequence[float]) -> Tensor:
    out = torch.zeros_like(tensors[0], dtype=F64)
    for t, w in zip(tensors, p):
        out = out + w * t.to(F64)
    return out


def svd_truncate(M: Tensor, k: int) -> Tensor:
    """The best rank-k approximation of a dense matrix, by ``torch.linalg.svd``."""
    U, S, Vh = torch.linalg.svd(M.to(F64), full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k]


def rel_err(x: Tensor, ref: Tensor) -> float:
    x, ref = x.to(F64), ref.to(F64)
    return float(torch.linalg.norm(x - ref)) / max(float(torch.linalg.norm(ref)), 1e-300)


def assert_close(x: Tensor, ref: Tensor, rtol: float = 1e-10, what: str = "", *, scale: float = 0.0) -> None:
    """Frobenius-norm agreement relative to ``max(||ref||, scale)`` (absolute when both are 0).

    ``scale`` is the size of the quantities ``ref`` was computed from, for references that are
    (nearly) zero by cancellation, e.g. a residual ``M - SVD_r(M)`` of a rank-r ``M``."""
    x64, ref64 = x.to(F64), ref.to(F64)
    assert x64.shape == ref64.shape, f"{what}: shape {tuple(x64.shape)} != {tuple(ref64.shape)}"
    err = float(torch.linalg.norm(x64 - ref64))
    norm = max(float(torch.linalg.norm(ref64)), scale)
    assert err <= rtol * (norm if norm > 0 else 1.0), f"{what}: error {err:.3e} vs norm {norm:.3e}"


def random_rotation(r: int, g: torch.Generator, special: bool = True) -> Tensor:
    """A Haar-random orthogonal matrix (in SO(r) if ``special``)."""
    q, rr = torch.linalg.qr(randn(r, r, g=g))
    q = q * torch.sign(torch.diagonal(rr)).unsqueeze(0)
    if special and torch.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def function_of(result, state_scale: float, module: str) -> Tensor:
    """The global update of ``module`` after a round: backbone delta + ``s B A`` (dense, f64)."""
    f = result.state.factors[module]
    out = state_scale * (f.B.to(F64) @ f.A.to(F64))
    d = result.backbone_delta.get(module)
    if d is not None:
        out = out + d.dense(F64)
    return out


# ---- the cases of the per-method reference tests (test_method_<name>.py) ----------------------
# Factors are random, non-square and non-symmetric; shapes, ranks, client counts and (unequal)
# weights vary. "Function" means the global update of a module after the round: the backbone
# delta plus ``s B A`` with the new global factors (``function_of``).
CASES = [
    pytest.param(shape, r, n, w, id=f"{shape[0]}x{shape[1]}-r{r}-n{n}-{w}")
    for shape in SHAPES
    for r in RANKS
    for n in CLIENTS
    for w in ("samples", "explicit")
]
ALPHA = 3.0  # != r for every rank used: s != 1


def build(shape, r, n, wmode, *, round_=1, ranks=None, only=None, rslora=False, alpha=ALPHA):
    """``(state, uploads, weights argument, normalised p)`` for one case, seeded by the case."""
    seed = shape[0] * 1000 + r * 100 + n * 10 + (wmode == "explicit") + 7 * round_
    shapes = module_shapes(*shape)
    state = make_state(shapes, r, alpha=alpha, use_rslora=rslora, round_=round_, seed=seed)
    uploads = make_uploads(shapes, ranks if ranks is not None else [r] * n, seed=seed + 1, only=only)
    wargs, p = weights_for(uploads, wmode, seed=seed + 2)
    return state, uploads, wargs, p


def declared_flags(name: str) -> set[str]:
    """The boolean capabilities of :class:`Method` (``changes_backbone``, ``needs_gradient``, ...)
    that method ``name`` sets: what the conformance suite expects of it."""
    flags = [k for k, hint in typing.get_type_hints(Method).items() if hint == ClassVar[bool]]
    return {k for k in flags if getattr(method_class(name), k)}


# ---- a tiny causal LM on disk (model-level tests without the hub) -----------------------------
TINY_TEXT = (
    "Question: Tom has 3 apples and buys 4 more. How many apples does he have?\n"
    "Answer: 3 + 4 = 7. The answer is 7.\n0123456789 +-*/=() abcdefghijklmnopqrstuvwxyz\n"
)


def tiny_lm(
    texts: Sequence[str] = (TINY_TEXT,),
    *,
    vocab_size: int = 320,
    hidden: int = 64,
    intermediate: int = 128,
    layers: int = 2,
    kv_heads: int = 4,
    seed: int = 0,
):
    """``(model, tokenizer)``: a random tiny LLaMA and a byte-level BPE tokenizer trained on
    ``texts`` (any text encodes; ``<eos>`` ends and pads)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(list(texts), trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", pad_token="<eos>")
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
    )
    return LlamaForCausalLM(cfg).eval(), tok


def tiny_llama(folder, **kwargs):
    """Save :func:`tiny_lm` (same arguments) to ``folder`` and return it: a ``model.name`` any
    fedlora config accepts."""
    model, tok = tiny_lm(**kwargs)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


# ---- a tiny LoRA binding and completion rows (client-round tests) -----------------------------------
class CompletionTask:
    """Random completion rows as a task: the prompt's tokens masked."""

    def collate(self, rows, tokenizer):
        from fedlora.tasks.common import completion_batch

        return completion_batch([(r["prompt"], r["completion"]) for r in rows], pad=0)


def completion_rows(n: int = 12, seed: int = 0) -> list[dict]:
    """``n`` rows of random token ids (5-11 tokens; the first two the prompt)."""
    g = gen(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 300, (int(torch.randint(5, 12, (1,), generator=g)),), generator=g).tolist()
        out.append({"prompt": ids[:2], "completion": ids[2:]})
    return out


def tiny_lora_binding():
    """A LoRA (rank 4 on q/v) binding of :func:`tiny_lm` with non-zero B, so both factors move
    from the first step."""
    from fedlora.model.binding import LoRABinding, LoRASettings

    model, _ = tiny_lm()
    torch.manual_seed(0)
    b = LoRABinding(model, LoRASettings(rank=4, alpha=8.0, targets=("q_proj", "v_proj")), task_type="CAUSAL_LM")
    for layer in b.layers.values():
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.05)
    return b


def completion_data(n: int = 12, batch_size: int = 3):
    """Client "0"'s :class:`~fedlora.engine.client.LocalData` over :func:`completion_rows` (CPU, seed 0)."""
    from fedlora.engine.client import LocalData

    rows = completion_rows(n)
    return LocalData("0", rows, list(range(n)), CompletionTask(), None, torch.device("cpu"), 0, batch_size)


def run_records(run_dir) -> list[dict]:
    """A run's ``metrics.jsonl`` records without their timings (what two equal runs share)."""
    import json
    from pathlib import Path

    out = []
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        r.pop("seconds", None)
        for s in r.get("train", {}).values():
            s.pop("seconds", None)
        out.append(r)
    return out


def tiny_run_config(tmp_path, model, name: str, sets):
    """The ci preset on ``model`` (a :func:`tiny_llama` folder), small: FedIT, 4 clients, 2 sampled
    per round, 3 rounds of 2 steps, no evaluation until the end; ``sets`` on top."""
    from fedlora.configs import preset_path
    from fedlora.engine.config import load_config

    base = {
        "output_dir": str(tmp_path),
        "name": name,
        "model.name": str(model),
        "method.name": "fedit",
        "task.settings": "{n_train: 24, n_test: 2, max_new_tokens: 4, max_length: 64}",
        "partition.num_clients": "4",
        "rounds.num_rounds": "3",
        "rounds.clients_per_round": "2",
        "rounds.eval_baseline": "false",
        "rounds.eval_every": "0",
        "train.max_steps": "2",
        "train.lr": "0.01",
    }
    return load_config(preset_path("ci"), {**base, **sets})
