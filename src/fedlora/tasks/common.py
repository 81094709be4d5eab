"""Model-side helpers shared by the task plug-ins (math, classification, commonsense, instruction, code,
shakespeare); reading rows of a data source is :mod:`fedlora.data.sources`.

* :func:`fit_completion`, :func:`completion_batch`: completion-only training batches (prompt and
  padding labels ``-100``), the math task's truncation rule.
* :func:`completion_logprobs`: the summed log-probability of each completion's tokens given its
  prompt (one forward pass per batch of prompt+completion sequences); :func:`completion_token_stats`
  adds how many of those tokens are the logits' argmax (next-token accuracy).
* :func:`shared_prompt_logprobs`: the same for several completions of one prompt, the prompt
  run once (its KV cache repeated per completion).
* :func:`greedy_generate`: batched, left-padded greedy decoding of new tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fedlora import progress

IGNORE_INDEX = -100
_EXTRA_STOP_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>")


# ---- tokens --------------------------------------------------------------------------------------
def pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token")
    return int(pad)


def eos_id(tokenizer: Any, task: str) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer has no EOS token; the {task} task needs one to end completions")
    return int(tokenizer.eos_token_id)


def stop_ids(tokenizer: Any) -> list[int]:
    ids = [int(tokenizer.eos_token_id)] if tokenizer.eos_token_id is not None else []
    vocab = tokenizer.get_vocab()
    for tok in _EXTRA_STOP_TOKENS:
        i = vocab.get(tok)
        if i is not None and int(i) not in ids:
            ids.append(int(i))
    return ids


def model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def text_ids(text: str, tokenizer: Any) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def chat_prompt(
    tokenizer: Any, user: str, *, use_chat_template: bool, system_prompt: str | None, plain: str
) -> tuple[str, bool]:
    """``(prompt, chat)``: the tokenizer's chat template with ``user`` as the user message and the
    generation prompt (``use_chat_template`` and the tokenizer has one), else ``plain``."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": user}]
        if system_prompt is not None:
            messages.insert(0, {"role": "system", "content": system_prompt})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), True
    return plain, False


def fit_completion(p: list[int], c: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Cut ``prompt + completion`` to ``max_length`` tokens: the completion loses its end, unless the
    prompt alone leaves less than a quarter of ``max_length``; then the prompt loses its start."""
    if len(p) + len(c) <= max_length:
        return p, c
    keep_c = min(len(c), max(max_length - len(p), max_length // 4))
    if len(p) > max_length - keep_c:
        p = p[len(p) - (max_length - keep_c) :]
    return p, c[:keep_c]


def completion_batch(seqs: Sequence[tuple[list[int], list[int]]], pad: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` / ``attention_mask`` / ``labels`` (prompt and padding = -100)."""
    if not seqs:
        raise ValueError("collate needs at least one example")
    width = max(len(p) + len(c) for p, c in seqs)
    input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
    for row, (p, c) in enumerate(seqs):
        n = len(p) + len(c)
        input_ids[row, :n] = torch.tensor(p + c, dtype=torch.long)
        attention[row, :n] = 1
        labels[row, len(p) : n] = torch.tensor(c, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


class _EvalMode:
    """``model.eval()`` and ``torch.no_grad()`` for a block; the training flag comes back after."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.was_training = bool(getattr(model, "training", False))
        self.no_grad = torch.no_grad()

    def __enter__(self) -> None:
        self.model.eval()
        self.no_grad.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.no_grad.__exit__(*exc)
        if self.was_training:
            self.model.train()


def completion_logprobs(
    model: Any, seqs: Sequence[tuple[list[int], list[int]]], pad: int, batch_size: int
) -> list[tuple[float, int]]:
    """``(sum of log p(c_t | prompt, c_<t), len(c))`` for every ``(prompt, completion)`` pair.

    Sequences are right-padded in batches of ``batch_size`` (sorted by length); the log-softmax is
    taken in float32 over the logits at positions ``len(p)-1 .. len(p)+len(c)-2`` and summed in
    float64. Every prompt needs at least one token.
    """
    return [(lp, n) for lp, n, _ in completion_token_stats(model, seqs, pad, batch_size)]


def completion_token_stats(
    model: Any, seqs: Sequence[tuple[list[int], list[int]]], pad: int, batch_size: int
) -> list[tuple[float, int, int]]:
    """:func:`completion_logprobs` plus, per pair, how many completion tokens are the argmax of
    the logits before them (greedy next-token hits): ``(sum log p, len(c), hits)``."""
    if any(len(p) == 0 for p, _ in seqs):
        raise ValueError("completion_logprobs needs a non-empty prompt for every sequence")
    out: list[tuple[float, int, int]] = [(0.0, 0, 0)] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: (-(len(seqs[i][0]) + len(seqs[i][1])), i))
    device = model_device(model)
    progress.expect(len(order))
    with _EvalMode(model):
        for b in range(0, len(order), batch_size):
            rows = order[b : b + batch_size]
            width = max(len(seqs[i][0]) + len(seqs[i][1]) for i in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                p, c = seqs[i]
                ids[r, : len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
                mask[r, : len(p) + len(c)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            for r, i in enumerate(rows):
                p, c = seqs[i]
                if not c:
                    continue
                lp = torch.log_softmax(logits[r, len(p) - 1 : len(p) + len(c) - 1].float(), dim=-1)
                tok = torch.tensor(c, dtype=torch.long, device=lp.device)
                hits = int((lp.argmax(dim=-1) == tok).sum())
                out[i] = (float(lp.gather(1, tok[:, None]).double().sum()), len(c), hits)
            progress.advance(len(rows))
    return out


def shared_prompt_logprobs(model: Any, prompt: list[int], completions: Sequence[list[int]]) -> list[tuple[float, int]]:
    """:func:`completion_logprobs` of several completions of ONE prompt, the prompt run once.

    The prompt's forward pass gives the first token of every completion and a KV cache; the
    cache is repeated per completion and the completions' remaining inputs (right-padded) run in
    one batch on top of it. Same numbers as separate full passes up to float rounding.
    """
    if not prompt:
        raise ValueError("shared_prompt_logprobs needs a non-empty prompt")
    device = model_device(model)
    out: list[tuple[float, int]] = []
    with _EvalMode(model):
        res = model(input_ids=torch.tensor([prompt], device=device), use_cache=True)
        first = torch.log_softmax(res.logits[0, -1].float(), dim=-1)
        cache = getattr(res, "past_key_values", None)
        width = max((len(c) for c in completions), default=0) - 1
        rest = None
        if width > 0:
            if cache is None or not hasattr(cache, "batch_repeat_interleave"):
                raise TypeError("the model returned no repeatable KV cache")
            k = len(completions)
            cache.batch_repeat_interleave(k)
            ids = torch.zeros((k, width), dtype=torch.long)
            mask = torch.zeros((k, len(prompt) + width), dtype=torch.long)
            mask[:, : len(prompt)] = 1
            for r, c in enumerate(completions):
                if len(c) > 1:
                    ids[r, : len(c) - 1] = torch.tensor(c[:-1], dtype=torch.long)
                    mask[r, len(prompt) : len(prompt) + len(c) - 1] = 1
            rest = model(
                input_ids=ids.to(device), attention_mask=mask.to(device), past_key_values=cache, use_cache=True
            ).logits
        for r, c in enumerate(completions):
            if not c:
                out.append((0.0, 0))
                continue
            total = float(first[c[0]].double())
            if len(c) > 1:
                assert rest is not None
                lp = torch.log_softmax(rest[r, : len(c) - 1].float(), dim=-1)
                tok = torch.tensor(c[1:], dtype=torch.long, device=lp.device)
                total += float(lp.gather(1, tok[:, None]).double().sum())
            out.append((total, len(c)))
    return out


def left_padded(prompts: Sequence[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` of token-id prompts padded on the left (for generation)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[r, width - len(p) :] = 1
    return ids, mask


def greedy_generate(
    model: Any, tokenizer: Any, prompts: Sequence[list[int]], *, max_new_tokens: int, batch_size: int
) -> list[str]:
    """Greedy completions (new tokens only, special tokens skipped) of token-id prompts, in order;
    left-padded batches sorted by length; stops at EOS / ``<|im_end|>`` / ``<|endoftext|>``."""
    pad = pad_id(tokenizer)
    stop = stop_ids(tokenizer)
    device = model_device(model)
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
    texts = [""] * len(prompts)
    progress.expect(len(order))
    with _EvalMode(model):
        for b in range(0, len(order), batch_size):
            rows = order[b : b + batch_size]
            ids, mask = left_padded([prompts[i] for i in rows], pad)
            width = ids.shape[1]
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=pad,
                eos_token_id=stop,
            )
            new = out[:, width:].cpu()
            for r, i in enumerate(rows):
                texts[i] = tokenizer.decode(new[r], skip_special_tokens=True)
            progress.advance(len(rows))
    return texts


__all__ = [
    "IGNORE_INDEX",
    "chat_prompt",
    "completion_batch",
    "completion_logprobs",
    "completion_token_stats",
    "eos_id",
    "fit_completion",
    "greedy_generate",
    "left_padded",
    "model_device",
    "pad_id",
    "shared_prompt_logprobs",
    "stop_ids",
    "text_ids",
]
