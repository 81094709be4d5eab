"""Padding-free training batches: a right-padded batch's sequences packed into one row.

A causal-LM batch is ``input_ids``/``attention_mask``/``labels`` of shape ``(B, W)``, each row
right-padded to the longest sequence ``W``; the pad tokens cost a forward and a backward pass
and learn nothing. :func:`flatten_padded` concatenates the ``B`` sequences (their real tokens
only) into one row of ``T = sum n_i`` tokens with per-sequence ``position_ids`` (restarting at
0) and no ``attention_mask``: transformers then builds a block-diagonal causal mask from the
position ids (``masking_utils.find_packed_sequence_indices``; flash-attention 2 reads them as
``cu_seqlens``), so no token attends across a sequence boundary, each sequence gets the same
rotary positions as alone, and the loss per label token is today's (a test). The label of each
sequence's first token is set to -100 (it would be predicted from the previous sequence's last
token). This is what transformers' ``DataCollatorWithFlattening`` produces, applied after the
task's own collate so every task's truncation and label rules stay as they are.

Not every model honours ``position_ids`` as sequence boundaries (a model that builds its mask
otherwise, or an attention kernel without packing support). :func:`accepts_packed_sequences`
checks the model itself: two short sequences run packed and alone must give the same logits.
The engine packs only where it holds (``train.packing: auto``) and refuses ``flatten`` by key
where it does not.

Cost: SDPA and eager attention apply the block-diagonal mask to the full ``T x T`` score
matrix (``(sum n_i)^2`` instead of ``B * W^2`` attention work, more for large batches), while the
linear layers (most of the compute at these lengths) see ``T`` tokens instead of ``B * W``.
flash-attention 2 computes only the blocks (``sum n_i^2``).
"""

from __future__ import annotations

from typing import Any

import torch

IGNORE_INDEX = -100
PACKED_KEYS = frozenset({"input_ids", "attention_mask", "labels"})


def is_right_padded(batch: dict[str, torch.Tensor]) -> bool:
    """A causal-LM batch (``input_ids``, ``attention_mask``, ``labels`` of one shape) whose every
    row is its real tokens followed by padding."""
    if set(batch) != PACKED_KEYS:
        return False
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    if ids.dim() != 2 or mask.shape != ids.shape or labels.shape != ids.shape:
        return False
    lengths = mask.sum(dim=1)
    positions = torch.arange(ids.shape[1], device=mask.device)
    return bool(torch.equal(mask.bool(), positions[None, :] < lengths[:, None]))


def flatten_padded(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The packed form of a right-padded causal-LM batch: ``input_ids``, ``labels`` and
    ``position_ids`` of shape ``(1, sum n_i)`` (see the module docstring)."""
    if not is_right_padded(batch):
        raise ValueError("only a right-padded input_ids/attention_mask/labels batch can be packed")
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    keep = batch["attention_mask"].bool()
    ids = batch["input_ids"][keep]
    labels = batch["labels"][keep].clone()
    position_ids = torch.cat([torch.arange(n, device=ids.device) for n in lengths])
    starts = torch.tensor([0, *lengths[:-1]], device=ids.device).cumsum(0)
    labels[starts] = IGNORE_INDEX
    return {"input_ids": ids[None], "labels": labels[None], "position_ids": position_ids[None]}


def sequences_in(batch: dict[str, torch.Tensor]) -> int:
    """How many examples a (padded or packed) batch holds."""
    if "position_ids" in batch and batch["input_ids"].shape[0] == 1:
        return int((batch["position_ids"] == 0).sum())
    return int(batch["input_ids"].shape[0])


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Keyword arguments for the model's forward: a packed batch also turns the KV cache off
    (transformers detects packing only without a cache)."""
    return {**batch, "use_cache": False} if "position_ids" in batch else dict(batch)


def accepts_packed_sequences(model: torch.nn.Module, *, rtol: float | None = None) -> bool:
    """Whether ``model`` (a causal LM) keeps packed sequences apart: two short sequences run
    packed in one row and each alone give the same logits up to ``rtol`` of their size (default:
    1e-4 for float32 compute, 2e-2 for half precision). Runs in eval mode without gradients; the
    training flag comes back after."""
    try:
        param = next(model.parameters())
    except StopIteration:
        return False
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 0)
    if vocab < 2:
        return False
    if rtol is None:
        rtol = 1e-4 if _compute_dtype(model) == torch.float32 else 2e-2
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, vocab, (n,), generator=gen).to(param.device) for n in (5, 7)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            alone = [model(input_ids=s[None], use_cache=False).logits[0].float() for s in seqs]
            packed = (
                model(
                    input_ids=torch.cat(seqs)[None],
                    position_ids=torch.cat([torch.arange(len(s), device=param.device) for s in seqs])[None],
                    use_cache=False,
                )
                .logits[0]
                .float()
            )
    except (TypeError, ValueError, RuntimeError):
        return False
    finally:
        model.train(was_training)
    reference = torch.cat(alone)
    scale = float(reference.abs().max()) + 1.0
    return bool((packed - reference).abs().max() <= rtol * scale)


def _compute_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype the model computes in: its config's (the ``dtype`` it was loaded with; for a
    bitsandbytes base that is the compute dtype, while k-bit preparation keeps norms and
    embeddings in float32), else its floating parameters'."""
    configured = getattr(getattr(model, "config", None), "dtype", None)
    if isinstance(configured, torch.dtype):
        return configured
    floats = [p.dtype for p in model.parameters() if p.is_floating_point()]
    return torch.float32 if not floats or all(d == torch.float32 for d in floats) else torch.bfloat16
