"""Math word problems (GSM8K format) for causal LMs: completion-only training, greedy exact match.

Protocol
--------
Data (:meth:`MathTask.load`), split into train and test *before* any client partition:

* ``source="generated"`` (default, offline): ``n_train`` problems from
  :func:`fedlora.tasks.math.generator.generate_math` (stream ``seed``, indices ``0..n_train-1``)
  and ``n_test`` test problems from a disjoint index range of the same stream (indices from
  ``TEST_START`` on), skipping any test question that also occurs in train (or earlier in test).
* a hub dataset id or a folder with ``train*`` / ``test*`` files: the source's own ``train`` and
  ``test`` splits (``split_train`` / ``split_test``), each subsampled (seeded) to ``n_train`` /
  ``n_test`` (``0`` = all rows); train rows whose question is in test are dropped.
* a single local file (``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet``): ``test_source`` if set,
  else ``n_test`` rows held out by :func:`fedlora.tasks.math.gsm8k.split_before_partition`.

Rows are read through ``columns`` (default GSM8K's ``question`` / ``answer``); see
:mod:`fedlora.tasks.math.gsm8k` for the ``final`` number and the ``category`` fallback.

Prompt and completion: the prompt is the question as the user message of the tokenizer's chat
template with ``add_generation_prompt=True`` (``use_chat_template``; ``system_prompt`` adds a
system message, otherwise the template's default applies), or ``"Question: {q}\\nAnswer:\\n"``
without a template. The completion is the worked answer followed by the EOS token. Prompt and
completion are tokenized separately (no special tokens added) and concatenated, exactly as in
generation, so the prompt/completion boundary is the same in training and evaluation.

Training batches (:meth:`MathTask.collate`): right-padded with the pad token, ``labels = -100``
on every prompt and padding position (loss on completion tokens only, the final EOS
included), sequences cut to ``max_length`` tokens by shortening the completion; if the prompt
alone leaves less than a quarter of ``max_length`` for the completion, the prompt is cut from
the left instead.

Evaluation (:meth:`MathTask.evaluate`): greedy decoding (``do_sample=False``, at most
``max_new_tokens`` new tokens, stopping at the EOS token or ``<|im_end|>`` / ``<|endoftext|>``
when the vocabulary has them) in batches of ``eval_batch_size`` prompts sorted by length and
LEFT-padded; only the new tokens are decoded (special tokens skipped). The prediction is
:func:`fedlora.tasks.math.numbers.extract_final_number` of that text (first number after ``####``,
else after the last "answer is", else the last number) and is correct when it equals the
reference ``final`` numerically (``12 == 12.0``, commas ignored). Metrics: ``exact_match`` (the
fraction correct), ``format_rate`` (fraction of outputs containing ``####``) and ``n``.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fedlora.data.sources import is_single_file, subsample
from fedlora.tasks.base import Example, TaskData, register
from fedlora.tasks.common import (
    IGNORE_INDEX,
    chat_prompt,
    completion_batch,
    eos_id,
    fit_completion,
    greedy_generate,
    pad_id,
    text_ids,
)
from fedlora.tasks.math.generator import CATEGORIES, generate_math
from fedlora.tasks.math.gsm8k import load_source, split_before_partition
from fedlora.tasks.math.numbers import extract_final_number, normalize_number, numbers_equal

TEST_START = 1_000_000_000  # generated test problems come from indices >= this (train uses 0..n-1)
PLAIN_PROMPT = "Question: {question}\nAnswer:\n"


@dataclass
class MathSettings:
    """Settings of the math task (the ``task.settings`` mapping of a run's config)."""

    source: str = "generated"  # "generated", a local file/folder, or a hub dataset id (openai/gsm8k)
    n_train: int = 800  # training examples (file/hub sources: a seeded subsample; 0 = all)
    n_test: int = 50  # test examples (file/hub sources: a seeded subsample; 0 = all)
    seed: int | None = None  # data seed; None = the run's seed
    categories: list[str] | None = None  # generated: which categories (default all)
    annotate: bool = False  # generated: GSM8K calculator annotations <<a*b=c>> in answers
    test_source: str | None = None  # a separate test file for a single-file source
    split_train: str = "train"
    split_test: str = "test"
    hub_config: str | None = None  # e.g. "main" for gsm8k (filled in for openai/gsm8k)
    columns: dict[str, str] = field(default_factory=dict)  # {question, answer, final?, category?} -> column
    category_fallback: str = "steps"  # rows without a category: "steps", "magnitude" or "const:NAME"
    max_length: int = 256  # training sequence length (prompt + completion), tokens
    max_new_tokens: int = 128  # evaluation: generated tokens at most
    eval_batch_size: int = 8
    use_chat_template: bool = True
    system_prompt: str | None = None  # None: the chat template's default system message (if any)

    def __post_init__(self) -> None:
        if self.source == "generated":
            if self.n_train < 1 or self.n_test < 1:
                raise ValueError("generated math needs n_train >= 1 and n_test >= 1")
            if self.categories is not None:
                unknown = [c for c in self.categories if c not in CATEGORIES]
                if unknown or not self.categories:
                    raise ValueError(f"unknown math categories {unknown}; available: {', '.join(CATEGORIES)}")
        if self.n_train < 0 or self.n_test < 0:
            raise ValueError("n_train and n_test must be >= 0")
        if self.max_length < 8:
            raise ValueError(f"max_length must be >= 8, got {self.max_length}")
        if self.max_new_tokens < 1 or self.eval_batch_size < 1:
            raise ValueError("max_new_tokens and eval_batch_size must be >= 1")


@register
class MathTask:
    """Math word problems for causal LMs (see the module docstring for the full protocol)."""

    name = "math"
    kind = "causal_lm"
    Settings = MathSettings

    def __init__(self, settings: MathSettings | None = None, seed: int = 0) -> None:
        self.settings = settings or MathSettings()
        self.seed = self.settings.seed if self.settings.seed is not None else seed
        self.last_predictions: list[dict[str, Any]] = []

    # ---- data ---------------------------------------------------------------------------------
    def load(self) -> TaskData:
        """Train and test examples, disjoint and deterministic for the settings and seed."""
        s = self.settings
        info: dict[str, Any] = {"source": s.source, "seed": self.seed}
        if s.source == "generated":
            train = generate_math(s.n_train, self.seed, s.categories, annotate=s.annotate)
            seen = {ex["question"] for ex in train}
            test: list[Example] = []
            start, skipped = TEST_START, 0
            while len(test) < s.n_test:
                if start - TEST_START > 1000 * s.n_test:
                    raise ValueError(f"could not draw {s.n_test} test problems unlike the train problems")
                batch = generate_math(s.n_test, self.seed, s.categories, start=start, annotate=s.annotate)
                start += s.n_test
                for ex in batch:
                    if ex["question"] in seen:
                        skipped += 1
                    elif len(test) < s.n_test:
                        seen.add(ex["question"])
                        test.append(ex)
            info["test_duplicates_skipped"] = skipped
        else:
            common = {"config": s.hub_config, "columns": s.columns, "category_fallback": s.category_fallback}
            if is_single_file(s.source) and s.test_source is None:
                res = load_source(s.source, **common)
                if not 0 < s.n_test < len(res.examples):
                    raise ValueError(
                        f"{s.source}: hold-out of n_test={s.n_test} needs 0 < n_test < {len(res.examples)} rows; "
                        f"or set test_source to a separate test file"
                    )
                train, test = split_before_partition(res.examples, s.n_test, f"{self.seed}:holdout")
                info["origin"], info["dropped"] = res.origin, res.dropped
            else:
                tr = load_source(s.source, split=s.split_train, **common)
                te = load_source(s.test_source or s.source, split=s.split_test, **common)
                train, test = tr.examples, subsample(te.examples, s.n_test, f"{self.seed}:test")
                info["origin"], info["dropped"] = [tr.origin, te.origin], tr.dropped + te.dropped
            test_questions = {ex["question"] for ex in test}
            before = len(train)
            train = [ex for ex in train if ex["question"] not in test_questions]
            info["train_overlap_removed"] = before - len(train)
            train = subsample(train, s.n_train, f"{self.seed}:train")
        if not train or not test:
            raise ValueError(f"math task source {s.source!r} gave {len(train)} train and {len(test)} test examples")
        info["n_train"], info["n_test"] = len(train), len(test)
        info["train_categories"] = dict(sorted(Counter(ex["category"] for ex in train).items()))
        info["test_categories"] = dict(sorted(Counter(ex["category"] for ex in test).items()))
        return TaskData(train=train, test=test, group_key="category", info=info)

    # ---- text ---------------------------------------------------------------------------------
    def prompt_text(self, question: str, tokenizer: Any) -> str:
        """The prompt string for ``question`` (chat template with generation prompt, or plain)."""
        s = self.settings
        plain = PLAIN_PROMPT.format(question=question)
        return chat_prompt(
            tokenizer, question, use_chat_template=s.use_chat_template, system_prompt=s.system_prompt, plain=plain
        )[0]

    def prompt_ids(self, question: str, tokenizer: Any) -> list[int]:
        return text_ids(self.prompt_text(question, tokenizer), tokenizer)

    def completion_ids(self, answer: str, tokenizer: Any) -> list[int]:
        return [*text_ids(answer, tokenizer), eos_id(tokenizer, "math")]

    # ---- training batches ---------------------------------------------------------------------
    def collate(self, examples: list[Example], tokenizer: Any) -> dict[str, torch.Tensor]:
        """``input_ids``, ``attention_mask``, ``labels`` (prompt and padding = -100), right-padded;
        over-long sequences cut by :func:`~fedlora.tasks.common.fit_completion`."""
        L = self.settings.max_length
        seqs = [
            fit_completion(self.prompt_ids(ex["question"], tokenizer), self.completion_ids(ex["answer"], tokenizer), L)
            for ex in examples
        ]
        return completion_batch(seqs, pad_id(tokenizer))

    # ---- evaluation ---------------------------------------------------------------------------
    def generate(self, model: Any, tokenizer: Any, questions: Sequence[str]) -> list[str]:
        """Greedy completions (new text only) of ``questions``, in their order."""
        s = self.settings
        prompts = [self.prompt_ids(q, tokenizer)[-s.max_length :] for q in questions]
        return greedy_generate(model, tokenizer, prompts, max_new_tokens=s.max_new_tokens, batch_size=s.eval_batch_size)

    def evaluate(self, model: Any, tokenizer: Any, examples: list[Example]) -> dict[str, float]:
        """``{"exact_match", "format_rate", "n"}`` of greedy answers (see the module docstring).

        Per-example records (question, reference, output, extracted, correct) are kept in
        :attr:`last_predictions`.
        """
        if not examples:
            return {"exact_match": 0.0, "format_rate": 0.0, "n": 0}
        outputs = self.generate(model, tokenizer, [ex["question"] for ex in examples])
        records = []
        for ex, text in zip(examples, outputs):
            reference = normalize_number(ex.get("final")) or extract_final_number(ex.get("answer", ""))
            predicted = extract_final_number(text)
            records.append(
                {
                    "question": ex["question"],
                    "reference": reference,
                    "output": text,
                    "extracted": predicted,
                    "correct": numbers_equal(predicted, reference),
                }
            )
        self.last_predictions = records
        n = len(records)
        return {
            "exact_match": sum(r["correct"] for r in records) / n,
            "format_rate": sum("####" in r["output"] for r in records) / n,
            "n": n,
        }

    def protocol(self) -> dict[str, Any]:
        """How data, prompts and evaluation are defined, for the run's records."""
        s = self.settings
        return {
            "task": self.name,
            "kind": self.kind,
            "settings": dataclasses.asdict(s),
            "seed": self.seed,
            "data": (
                f"generated GSM8K-style problems: train = indices 0..n_train-1 of stream seed={self.seed}, "
                f"test = indices from {TEST_START} of the same stream minus questions seen in train"
                if s.source == "generated"
                else "the source's train/test splits (or a seeded hold-out of a single file), train rows "
                "with a test question removed"
            ),
            "prompt": (
                "tokenizer chat template, question as user message, add_generation_prompt=True"
                + (" with system prompt" if s.system_prompt is not None else " (template's default system message)")
                if s.use_chat_template
                else f"plain: {PLAIN_PROMPT!r}"
            ),
            "completion": "worked answer + EOS; loss on completion tokens only (prompt and padding labels = -100)",
            "decoding": {
                "strategy": "greedy",
                "do_sample": False,
                "num_beams": 1,
                "max_new_tokens": s.max_new_tokens,
                "batch_size": s.eval_batch_size,
                "padding": "left",
                "stop": "EOS, and <|im_end|> / <|endoftext|> / <|eot_id|> when in the vocabulary",
                "decoded": "new tokens only, special tokens skipped",
            },
            "extraction": (
                "first number after the first '####'; else first number after the last 'answer is' / "
                "'answer:'; else the last number; commas, '$', units and trailing punctuation ignored"
            ),
            "comparison": "numeric equality after normalisation (12 == 12.0, 1,200 == 1200); no answer = wrong",
            "metric": "exact_match = fraction of test problems answered correctly; format_rate = outputs with '####'",
        }


__all__ = [
    "IGNORE_INDEX",
    "TEST_START",
    "MathSettings",
    "MathTask",
    "extract_final_number",
    "numbers_equal",
]
