"""The shakespeare task: one client per (play, speaking role), causal-LM fine-tuning on the role's lines.

Protocol
--------
**Plays.** The plays and their speeches come from :mod:`fedlora.tasks.shakespeare.plays` (the files
read and the parsing rules).

**Clients.** A role is ``"<play id>::<NAME>"`` (the ``role`` field, the task's ``group_key``; use
``partition.scheme: natural`` for one client per role, clients ordered by role key). Roles with at
least ``min_speeches`` speeches are eligible; ``roles`` names the clients explicitly, else
``num_roles`` of the eligible roles are drawn with the seed (``0`` = all).

**Split (LEAF's, by order within the role).** A role's ``n`` speeches in play order: the last
``n_test = max(1, round(test_fraction * n))`` are its test speeches, the others its training
speeches; ``max_test_per_role`` keeps only the first that many test speeches (``0`` = all).
Every test example carries its role, so the runtime's personalised evaluation gives each client
exactly its own role's test speeches.

**Examples.** One speech is one example: prompt = the play's title, a blank line, then up to
``context_turns`` preceding speeches of the same scene as ``NAME:\\n<speech>\\n\\n``, then
``NAME:\\n`` of the speaker; completion = the speech + EOS. The context of a *training* example
never contains a test speech of any client: walking back from the speech, it stops at the scene
start, at ``context_turns`` speeches or before the first held-out speech. Prompt and completion
are tokenized separately (no special tokens) and cut to ``max_length`` as in the instruction task
(the completion's end, or the prompt's start when the prompt leaves less than a quarter).
Training batches put ``-100`` on prompt and padding: the loss is on the role's lines only.

**Metrics** (:meth:`ShakespeareTask.evaluate`): over all completion tokens (EOS included) of the
evaluated examples, batched as in training: ``loss`` = total negative log-likelihood / number of
tokens (log-softmax in float32, sums in float64; transformers' mean loss over one batch of all
examples), ``perplexity = exp(loss)`` (per token of the model's tokenizer, not per character as
in LEAF), ``next_token_accuracy`` = the fraction of those tokens that are the logits' argmax
given everything before them, ``n_tokens`` and ``n``. Lower perplexity is better; it is the
first (primary) metric.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fedlora.data.sources import SourceError
from fedlora.tasks.base import Example, TaskData, register
from fedlora.tasks.common import (
    completion_batch,
    completion_token_stats,
    eos_id,
    fit_completion,
    pad_id,
    text_ids,
)
from fedlora.tasks.shakespeare.plays import ROLE_SEP, Play, Speech, corpus_report, read_plays, role_key

log = logging.getLogger("fedlora")


# ---- settings and task ---------------------------------------------------------------------------
@dataclass
class ShakespeareSettings:
    """Settings of the shakespeare task (``task.settings`` of a run's config)."""

    source: str = "package"  # "package" (shksprdata) or a folder / file of Gutenberg-format plays
    files: str | None = None  # glob inside a folder source (None: *_gut.txt for the package, *.txt)
    plays: list[str] | None = None  # keep only these play ids (file stems; package: without _gut)
    roles: list[str] | None = None  # the clients, as "PLAY::NAME" (each needs >= 2 speeches)
    min_speeches: int = 20  # a role needs this many speeches to be eligible as a client
    num_roles: int = 0  # eligible roles drawn with the seed (0 = all of them)
    test_fraction: float = 0.2  # last fraction of each role's speeches held out (LEAF: 0.2)
    max_test_per_role: int = 0  # keep the first k test speeches of each role (0 = all)
    context_turns: int = 1  # preceding speeches of the scene in the prompt (0 = title and name only)
    join_lines: bool = False  # join a speech's verse lines with spaces instead of newlines
    max_length: int = 256
    eval_batch_size: int = 8
    seed: int | None = None  # role-sampling seed; None = the run's seed

    def __post_init__(self) -> None:
        if self.min_speeches < 2:
            raise ValueError("shakespeare task setting 'min_speeches' must be >= 2 (one train and one test speech)")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"shakespeare task setting 'test_fraction' must be in (0, 1), got {self.test_fraction}")
        for key in ("num_roles", "max_test_per_role", "context_turns"):
            if getattr(self, key) < 0:
                raise ValueError(f"shakespeare task setting {key!r} must be >= 0, got {getattr(self, key)}")
        if self.max_length < 16 or self.eval_batch_size < 1:
            raise ValueError("shakespeare task settings: max_length must be >= 16 and eval_batch_size >= 1")
        if self.roles is not None and (not self.roles or any(ROLE_SEP not in r for r in self.roles)):
            raise ValueError(f"shakespeare task setting 'roles' must list 'PLAY{ROLE_SEP}NAME' keys, got {self.roles}")


def split_role(n: int, test_fraction: float) -> int:
    """How many of a role's ``n`` speeches (the last ones) are held out: ``max(1, round(f n))``,
    at most ``n - 1``."""
    return min(n - 1, max(1, round(test_fraction * n)))


@register
class ShakespeareTask:
    """LEAF-style Shakespeare (the protocol: this module's docstring and :mod:`~fedlora.tasks.shakespeare.plays`)."""

    name = "shakespeare"
    kind = "causal_lm"
    Settings = ShakespeareSettings

    def __init__(self, settings: ShakespeareSettings | None = None, seed: int = 0) -> None:
        self.settings = settings or ShakespeareSettings()
        self.seed = self.settings.seed if self.settings.seed is not None else seed
        self.report: dict[str, Any] = {}

    # ---- data ---------------------------------------------------------------------------------
    def _select(self, by_role: Mapping[str, list[Speech]]) -> list[str]:
        s = self.settings
        if s.roles is not None:
            unknown = [r for r in s.roles if r not in by_role]
            if unknown:
                raise SourceError(
                    f"shakespeare roles not found: {unknown}; roles are 'PLAY{ROLE_SEP}NAME' as in the report "
                    f"(e.g. {', '.join(sorted(by_role, key=lambda r: -len(by_role[r]))[:3])})"
                )
            short = [r for r in s.roles if len(by_role[r]) < 2]
            if short:
                raise SourceError(f"shakespeare roles {short} have fewer than 2 speeches (one train, one test)")
            return sorted(set(s.roles))
        eligible = sorted(r for r, sp in by_role.items() if len(sp) >= s.min_speeches)
        if not eligible:
            raise SourceError(f"no role has min_speeches={s.min_speeches} speeches; lower it")
        if s.num_roles > len(eligible):
            raise SourceError(
                f"num_roles={s.num_roles} but only {len(eligible)} roles have >= {s.min_speeches} speeches"
            )
        if s.num_roles == 0:
            return eligible
        return sorted(random.Random(f"shakespeare:{self.seed}").sample(eligible, s.num_roles))

    def load(self) -> TaskData:
        """One example per speech of the selected roles, split per role by order (LEAF)."""
        s = self.settings
        plays, skipped = read_plays(s.source, s.files, join_lines=s.join_lines)
        if s.plays is not None:
            unknown = sorted(set(s.plays) - {p.id for p in plays})
            if unknown:
                raise SourceError(
                    f"shakespeare plays not found: {unknown}; available: {', '.join(p.id for p in plays)}"
                )
            plays = [p for p in plays if p.id in s.plays]
        by_play = {p.id: p for p in plays}
        by_role: dict[str, list[Speech]] = {}
        for p in plays:
            for sp in p.speeches:
                by_role.setdefault(role_key(p.id, sp.speaker), []).append(sp)
        selected = self._select(by_role)
        splits: dict[str, tuple[list[Speech], list[Speech]]] = {}
        held_out: set[tuple[str, int]] = set()
        for role in selected:
            speeches = by_role[role]
            n_train = len(speeches) - split_role(len(speeches), s.test_fraction)
            splits[role] = (speeches[:n_train], speeches[n_train:])
            held_out.update((role.split(ROLE_SEP, 1)[0], sp.index) for sp in speeches[n_train:])
        train: list[Example] = []
        test: list[Example] = []
        clients: dict[str, dict[str, int]] = {}
        for role in selected:
            play = by_play[role.split(ROLE_SEP, 1)[0]]
            tr, te = splits[role]
            if s.max_test_per_role:
                te = te[: s.max_test_per_role]
            train.extend(self._example(play, role, sp, k, held_out) for k, sp in enumerate(tr))
            test.extend(self._example(play, role, sp, len(tr) + k, None) for k, sp in enumerate(te))
            clients[role] = {
                "speeches": len(by_role[role]),
                "train": len(tr),
                "test": len(te),
                "characters": sum(len(sp.text) for sp in by_role[role]),
            }
        self.report = {**corpus_report(plays, skipped, s.min_speeches), "clients": clients}
        log.info(
            "shakespeare: %d plays, %d roles, %d speeches; %d roles with >= %d speeches; "
            "%d clients, %d train / %d test",
            self.report["plays"],
            self.report["roles"],
            self.report["speeches"],
            self.report["eligible_roles"],
            s.min_speeches,
            len(selected),
            len(train),
            len(test),
        )
        info = {"seed": self.seed, "n_train": len(train), "n_test": len(test), **self.report}
        return TaskData(train=train, test=test, group_key="role", info=info)

    def _example(
        self, play: Play, role: str, speech: Speech, turn: int, held_out: set[tuple[str, int]] | None
    ) -> Example:
        """The example of one speech; ``held_out`` (training examples) bounds its context."""
        context: list[list[str]] = []
        j = speech.index - 1
        while len(context) < self.settings.context_turns and j >= 0 and play.speeches[j].scene == speech.scene:
            if held_out is not None and (play.id, j) in held_out:
                break
            context.insert(0, [play.speeches[j].speaker, play.speeches[j].text])
            j -= 1
        return {
            "role": role,
            "play": play.id,
            "title": play.title,
            "speaker": speech.speaker,
            "text": speech.text,
            "context": context,
            "index": speech.index,
            "turn": turn,
        }

    # ---- text ---------------------------------------------------------------------------------
    @staticmethod
    def prompt_text(ex: Example) -> str:
        """Title, blank line, the context turns as ``NAME:\\n<speech>\\n\\n``, then ``NAME:\\n``."""
        turns = "".join(f"{speaker}:\n{text}\n\n" for speaker, text in ex["context"])
        return f"{ex['title']}\n\n{turns}{ex['speaker']}:\n"

    def sequence(self, ex: Example, tokenizer: Any) -> tuple[list[int], list[int]]:
        """``(prompt ids, completion ids)`` cut to ``max_length`` (completion = the speech + EOS)."""
        p = text_ids(self.prompt_text(ex), tokenizer)
        c = [*text_ids(ex["text"], tokenizer), eos_id(tokenizer, "shakespeare")]
        return fit_completion(p, c, self.settings.max_length)

    # ---- batches ------------------------------------------------------------------------------
    def collate(self, examples: list[Example], tokenizer: Any) -> dict[str, torch.Tensor]:
        """``input_ids``, ``attention_mask``, ``labels`` (prompt and padding = -100), right-padded."""
        return completion_batch([self.sequence(ex, tokenizer) for ex in examples], pad_id(tokenizer))

    # ---- evaluation ---------------------------------------------------------------------------
    def evaluate(self, model: Any, tokenizer: Any, examples: list[Example]) -> dict[str, float]:
        """``perplexity`` = exp(``loss``), ``loss`` (mean NLL per completion token over the whole
        set), ``next_token_accuracy``, ``n_tokens``, ``n``."""
        if not examples:
            nan = float("nan")
            return {"perplexity": nan, "loss": nan, "next_token_accuracy": nan, "n_tokens": 0, "n": 0}
        seqs = [self.sequence(ex, tokenizer) for ex in examples]
        stats = completion_token_stats(model, seqs, pad_id(tokenizer), self.settings.eval_batch_size)
        tokens = sum(n for _, n, _ in stats)
        loss = -math.fsum(lp for lp, _, _ in stats) / tokens
        return {
            "perplexity": math.exp(loss),
            "loss": loss,
            "next_token_accuracy": sum(h for _, _, h in stats) / tokens,
            "n_tokens": tokens,
            "n": len(examples),
        }

    def protocol(self) -> dict[str, Any]:
        """How data, prompts and evaluation are defined (and what the parser found), for the run's records."""
        s = self.settings
        return {
            "task": self.name,
            "kind": self.kind,
            "settings": dataclasses.asdict(s),
            "seed": self.seed,
            "data": (
                "Gutenberg plays parsed into speeches (rules in fedlora.tasks.shakespeare.plays); one client per "
                f"(play, role) with >= {s.min_speeches} speeches"
                + (f", {s.num_roles} drawn with the seed" if s.num_roles and s.roles is None else "")
                + (", roles given" if s.roles is not None else "")
            ),
            "split": f"per role by order: last max(1, round({s.test_fraction} n)) speeches = test"
            + (f" (first {s.max_test_per_role} kept)" if s.max_test_per_role else "")
            + "; training contexts never include a test speech",
            "prompt": f"title + up to {s.context_turns} preceding speeches of the scene ('NAME:\\n<speech>\\n\\n') "
            "+ 'NAME:\\n'",
            "completion": "the speech + EOS; loss on completion tokens only (prompt and padding labels = -100)",
            "truncation": f"as in training, max_length={s.max_length}",
            "metric": "perplexity = exp(loss), loss = total NLL of completion tokens (EOS included) / their count; "
            "next_token_accuracy = share of those tokens that are the argmax; lower perplexity is better",
            "split_evaluated": "test",
            "corpus": {k: v for k, v in self.report.items() if k not in ("per_play", "clients")},
            "clients": self.report.get("clients", {}),
        }


__all__ = [
    "ShakespeareSettings",
    "ShakespeareTask",
    "split_role",
]
