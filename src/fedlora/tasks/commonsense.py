"""Multiple-choice commonsense reasoning for causal LMs: option log-likelihood (or generation) accuracy.

Protocol
--------
Examples are normalised to ``{"context", "question", "options": [str, ...], "answer": index,
"subtask"}`` (``context`` may be empty). Adapters read each dataset's own layout, as its hub
dataset (``datasets.load_dataset(id, config)``) or a local export of it has it:

=================  ==========================================  =========================================
dataset            hub id (config), default test split         columns read
=================  ==========================================  =========================================
``boolq``          ``google/boolq``, validation                ``question``, ``passage``, ``answer``
                                                               (bool; or ``label`` 0/1) -> options
                                                               ``no`` / ``yes``
``piqa``           ``ybisk/piqa``, validation                  ``goal``, ``sol1``, ``sol2``, ``label``
``siqa``           ``allenai/social_i_qa``, validation         ``context``, ``question``, ``answerA`` ..
                                                               ``answerC``, ``label`` ("1".."3")
``hellaswag``      ``Rowan/hellaswag``, validation             ``activity_label``, ``ctx_a``, ``ctx_b``
                                                               (or ``ctx``), ``endings`` (4), ``label``;
                                                               lm-eval's clean-up of ``[title]`` etc.
``winogrande``     ``allenai/winogrande`` (winogrande_xl),     ``sentence`` (with ``_``), ``option1``,
                   validation                                  ``option2``, ``answer`` ("1"/"2")
``arc_easy``       ``allenai/ai2_arc`` (ARC-Easy), test        ``question``, ``choices`` ({text, label}),
``arc_challenge``  ``allenai/ai2_arc`` (ARC-Challenge), test   ``answerKey`` (a letter or digit label)
``openbookqa``     ``allenai/openbookqa`` (main), test         ``question_stem``, ``choices``,
                                                               ``answerKey``; ``fact1`` as context if any
``mc`` (generic)   (a local file)                              ``question``, ``options`` (list or JSON
                                                               list), ``answer`` (index, letter or the
                                                               option's text), ``context``, ``subtask``
=================  ==========================================  =========================================

``columns`` renames a file's columns into these per dataset (``{piqa: {goal: prompt}}``); nested
``choices``/``endings`` may also be JSON strings (CSV exports). ``sources`` maps a dataset to a
local file/folder or another hub id. WinoGrande is posed as a 2-way choice of the word that
fills the blank (not lm-eval's partial scoring). ``generated`` (the default, offline) is four
small subtasks (:func:`generate_mc`): ``arith`` (a + b / a - b / a x b, 4 options), ``compare``
(larger/smaller of two numbers, 2 options), ``facts`` (which item is a fruit / animal / ..., 3
options) and ``yesno`` (even/odd, greater-than questions, options no/yes).

Data (:meth:`CommonsenseTask.load`), split into train and test *before* any client partition,
per dataset: the source's ``train`` split and its test split (``test_splits`` or the default
above; the hidden-label test splits of BoolQ/PIQA/SIQA/HellaSwag/WinoGrande are never used),
or ``n_test`` rows held out of a single local file (seeded); train rows whose question and
options occur in test are dropped; then seeded subsamples of ``n_train`` / ``n_test`` rows PER
DATASET (``0`` = all). Generated: per subtask the first ``n_train`` distinct items of the
seeded stream as train and the next ``n_test`` distinct ones as test. The partition key is
``subtask``.

Prompt: ``[context + "\\n\\n"] + "Question: {question}\\nOptions:\\nA. {o1}\\nB. {o2}...\\n"
"Answer with the text of the correct option."``, as the user message of the tokenizer's chat
template with the generation prompt (``use_chat_template``; ``system_prompt`` adds a system
message), or plain with ``"\\nAnswer:"`` appended. The completion is the correct option's text
(plain: preceded by a space). Prompt and completion are tokenized separately (no special
tokens) and concatenated.

Training batches (:meth:`CommonsenseTask.collate`): completion + EOS as labels, prompt and
padding ``-100``, right-padded, cut to ``max_length`` as in the math task.

Evaluation (:meth:`CommonsenseTask.evaluate`) on the test examples:

* ``scoring="loglik"`` (default): for every option, the sum of ``log p(token | prompt, earlier
  option tokens)`` over the option's tokens (no EOS), log-softmax in float32; with
  ``length_normalize`` the per-token mean instead. With ``share_prompt`` (default) each prompt
  runs once and its options run in one batch on its repeated KV cache; otherwise (or for a
  model without a repeatable cache) every prompt + option is one sequence, in right-padded
  batches of ``eval_batch_size``. Both give the same scores up to float rounding. The prediction is the option with the
  highest score (the first on ties). A prompt + option longer than ``max_length`` loses the
  start of the prompt.
* ``scoring="generate"``: greedy decoding (``max_new_tokens``, left-padded batches) of the
  prompt; the answer is parsed from the new text (:func:`parse_choice`): the option whose text
  equals it (case, spaces and end punctuation ignored), else the longest option it starts
  with, else a leading capital option letter followed by ``.``, ``)``, ``:`` or the end (``B``,
  ``B.``, ``(B)``, ``Answer: B``), else the only option it contains; an unparsed answer is wrong.

Metrics: ``accuracy`` = the mean of the per-dataset accuracies (the papers' "Avg."),
``accuracy_<subtask>`` for every subtask, ``parse_rate`` (generate only) and ``n``.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from fedlora import progress
from fedlora.data.sources import (
    SourceError,
    drop_overlap,
    holdout,
    is_single_file,
    read_rows,
    rename_columns,
    subsample,
)
from fedlora.tasks.base import Example, TaskData, register
from fedlora.tasks.common import (
    chat_prompt,
    completion_batch,
    completion_logprobs,
    eos_id,
    fit_completion,
    greedy_generate,
    pad_id,
    shared_prompt_logprobs,
    text_ids,
)

LETTERS = "ABCDEFGHIJ"
INSTRUCTION = "Answer with the text of the correct option."
GENERATED_SUBTASKS = ("arith", "compare", "facts", "yesno")
# dataset: (hub id, hub config, default test split)
HUB: dict[str, tuple[str, str | None, str]] = {
    "boolq": ("google/boolq", None, "validation"),
    "piqa": ("ybisk/piqa", None, "validation"),
    "siqa": ("allenai/social_i_qa", None, "validation"),
    "hellaswag": ("Rowan/hellaswag", None, "validation"),
    "winogrande": ("allenai/winogrande", "winogrande_xl", "validation"),
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy", "test"),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge", "test"),
    "openbookqa": ("allenai/openbookqa", "main", "test"),
}
DATASETS = ("generated", *HUB, "mc")


# ---- adapters ------------------------------------------------------------------------------------
def _listish(value: Any) -> list[Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return [value]
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _choices(value: Any) -> tuple[list[str], list[str]]:
    """``(texts, labels)`` of an ARC/OpenBookQA ``choices`` field (dict, list of dicts or JSON)."""
    if isinstance(value, str):
        value = json.loads(value)
    if isinstance(value, Mapping):
        texts, labels = list(value["text"]), list(value["label"])
    else:
        texts = [c["text"] for c in value]
        labels = [c["label"] for c in value]
    return [str(t) for t in texts], [str(lab) for lab in labels]


def _index(value: Any, n: int, *, one_based: bool = False, labels: Sequence[str] = ()) -> int:
    """An answer index from an int, a digit string (0- or 1-based) or a label/letter."""
    s = str(value).strip()
    if labels and s in labels:
        return list(labels).index(s)
    if s.lstrip("-").isdigit():
        i = int(s) - (1 if one_based else 0)
    elif len(s) == 1 and s.upper() in LETTERS:
        i = LETTERS.index(s.upper())
    else:
        raise ValueError(f"answer {value!r} is not an index or option label")
    if not 0 <= i < n:
        raise ValueError(f"answer {value!r} out of range for {n} options")
    return i


def _hellaswag_clean(text: str) -> str:
    """lm-eval-harness's HellaSwag clean-up of WikiHow artifacts."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _boolq(row: Mapping[str, Any]) -> Example:
    ans = row["answer"] if "answer" in row else row["label"]
    yes = ans if isinstance(ans, bool) else str(ans).strip().lower() in ("1", "true", "yes")
    q = str(row["question"]).strip()
    q = q[0].upper() + q[1:] + ("" if q.endswith("?") else "?") if q else q
    return {"context": str(row["passage"]), "question": q, "options": ["no", "yes"], "answer": int(yes)}


def _piqa(row: Mapping[str, Any]) -> Example:
    return {
        "context": "",
        "question": str(row["goal"]),
        "options": [str(row["sol1"]), str(row["sol2"])],
        "answer": _index(row["label"], 2),
    }


def _siqa(row: Mapping[str, Any]) -> Example:
    return {
        "context": str(row["context"]),
        "question": str(row["question"]),
        "options": [str(row["answerA"]), str(row["answerB"]), str(row["answerC"])],
        "answer": _index(row["label"], 3, one_based=True),
    }


def _hellaswag(row: Mapping[str, Any]) -> Example:
    ctx = str(row["ctx_a"]) + " " + str(row.get("ctx_b") or "").capitalize() if "ctx_a" in row else str(row["ctx"])
    if row.get("activity_label"):
        ctx = f"{row['activity_label']}: {ctx}"
    endings = [_hellaswag_clean(str(e)) for e in _listish(row["endings"])]
    return {
        "context": _hellaswag_clean(ctx),
        "question": "Which ending continues the text best?",
        "options": endings,
        "answer": _index(row["label"], len(endings)),
    }


def _winogrande(row: Mapping[str, Any]) -> Example:
    return {
        "context": str(row["sentence"]),
        "question": "Which option correctly fills the blank (_)?",
        "options": [str(row["option1"]), str(row["option2"])],
        "answer": _index(row["answer"], 2, one_based=True),
    }


def _arc(row: Mapping[str, Any]) -> Example:
    texts, labels = _choices(row["choices"])
    return {
        "context": "",
        "question": str(row["question"]),
        "options": texts,
        "answer": _index(row["answerKey"], len(texts), labels=labels),
    }


def _openbookqa(row: Mapping[str, Any]) -> Example:
    texts, labels = _choices(row["choices"])
    return {
        "context": str(row.get("fact1") or ""),
        "question": str(row["question_stem"]),
        "options": texts,
        "answer": _index(row["answerKey"], len(texts), labels=labels),
    }


def _generic(row: Mapping[str, Any]) -> Example:
    options = [str(o) for o in _listish(row["options"])]
    ans = row["answer"]
    if isinstance(ans, str) and ans.strip() in options and not (len(ans.strip()) == 1 and ans.strip() in LETTERS):
        idx = options.index(ans.strip())
    else:
        idx = _index(ans, len(options))
    ex: Example = {
        "context": str(row.get("context") or ""),
        "question": str(row["question"]),
        "options": options,
        "answer": idx,
    }
    if row.get("subtask"):
        ex["subtask"] = str(row["subtask"])
    return ex


ADAPTERS = {
    "boolq": _boolq,
    "piqa": _piqa,
    "siqa": _siqa,
    "hellaswag": _hellaswag,
    "winogrande": _winogrande,
    "arc_easy": _arc,
    "arc_challenge": _arc,
    "openbookqa": _openbookqa,
    "mc": _generic,
}


def normalize_rows(dataset: str, rows: Sequence[Mapping[str, Any]], origin: str = "") -> list[Example]:
    """Rows of ``dataset``'s layout as normalised examples (``subtask`` = the dataset name)."""
    adapter = ADAPTERS[dataset]
    out = []
    for i, row in enumerate(rows):
        try:
            ex = adapter(row)
        except (KeyError, ValueError, TypeError, json.JSONDecodeError) as exc:
            raise SourceError(
                f"{origin or dataset}: row {i} does not have the {dataset} layout ({type(exc).__name__}: {exc}); "
                f"the row has {sorted(row)}. Rename columns with columns: {{{dataset}: {{field: column}}}}"
            ) from exc
        if len(ex["options"]) < 2:
            raise SourceError(f"{origin or dataset}: row {i} has fewer than 2 options")
        ex.setdefault("subtask", dataset)
        out.append(ex)
    return out


# ---- generated -----------------------------------------------------------------------------------
_FACTS: dict[str, tuple[str, ...]] = {
    "fruit": ("apple", "banana", "cherry", "mango", "pear", "grape", "peach", "lemon", "plum", "orange"),
    "animal": ("dog", "horse", "tiger", "rabbit", "eagle", "whale", "lion", "mouse", "sheep", "fox"),
    "color": ("red", "blue", "green", "yellow", "purple", "black", "white", "brown", "pink", "gray"),
    "tool": ("hammer", "saw", "wrench", "drill", "shovel", "screwdriver", "chisel", "pliers", "axe", "rake"),
    "vehicle": ("car", "bus", "truck", "bicycle", "train", "airplane", "boat", "tractor", "scooter", "van"),
    "musical instrument": ("piano", "guitar", "violin", "drum", "flute", "trumpet", "cello", "harp", "banjo", "oboe"),
    "body part": ("hand", "knee", "elbow", "ankle", "shoulder", "finger", "nose", "ear", "toe", "wrist"),
    "planet": ("Mars", "Venus", "Jupiter", "Saturn", "Mercury", "Neptune", "Uranus", "Earth"),
}


def _article(noun: str) -> str:
    return ("an " if noun[0].lower() in "aeiou" else "a ") + noun


def _mc_item(subtask: str, rng: random.Random) -> Example:
    if subtask == "arith":
        op = rng.choice("+-*")
        a, b = (rng.randint(2, 12), rng.randint(2, 12)) if op == "*" else (rng.randint(2, 60), rng.randint(2, 60))
        if op == "-" and b > a:
            a, b = b, a
        value = a + b if op == "+" else a - b if op == "-" else a * b
        word = {"+": "plus", "-": "minus", "*": "times"}[op]
        wrong: set[int] = set()
        for d in rng.sample([-10, -2, -1, 1, 2, 10, a, b], 8):
            if len(wrong) < 3 and value + d >= 0 and value + d != value:
                wrong.add(value + d)
        options = [str(v) for v in [value, *sorted(wrong)]]
        question = f"What is {a} {word} {b}?"
    elif subtask == "compare":
        x, y = rng.sample(range(1, 1000), 2)
        which = rng.choice(("larger", "smaller"))
        value = max(x, y) if which == "larger" else min(x, y)
        options = [str(value), str(x + y - value)]
        question = f"Which number is {which}: {x} or {y}?"
    elif subtask == "facts":
        cats = rng.sample(sorted(_FACTS), 3)
        options = [rng.choice(_FACTS[c]) for c in cats]
        question = f"Which of these is {_article(cats[0])}?"
    elif subtask == "yesno":
        if rng.random() < 0.5:
            n, parity = rng.randint(1, 500), rng.choice(("even", "odd"))
            yes = (n % 2 == 0) == (parity == "even")
            question = f"Is {n} {_article(parity)} number?"
        else:
            x, y = rng.sample(range(1, 1000), 2)
            yes = x > y
            question = f"Is {x} greater than {y}?"
        return {"context": "", "question": question, "options": ["no", "yes"], "answer": int(yes), "subtask": subtask}
    else:
        raise ValueError(f"unknown generated subtask {subtask!r}; available: {', '.join(GENERATED_SUBTASKS)}")
    correct = options[0]
    rng.shuffle(options)
    return {
        "context": "",
        "question": question,
        "options": options,
        "answer": options.index(correct),
        "subtask": subtask,
    }


def _item_key(ex: Example) -> tuple[str, str, tuple[str, ...]]:
    return ex.get("context", ""), ex["question"], tuple(ex["options"])


def generate_mc(subtask: str, n: int, seed: int, *, skip: int = 0) -> list[Example]:
    """``n`` distinct generated items of ``subtask`` after the first ``skip`` distinct ones of the
    seeded stream ``(seed, subtask)``."""
    rng = random.Random(f"mc:{seed}:{subtask}")
    seen: set[tuple[str, str, tuple[str, ...]]] = set()
    out: list[Example] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 200 * (n + skip) + 1000:
            raise ValueError(f"could not draw {n + skip} distinct {subtask} items")
        ex = _mc_item(subtask, rng)
        if _item_key(ex) in seen:
            continue
        seen.add(_item_key(ex))
        if len(seen) > skip:
            out.append(ex)
    return out


# ---- answer parsing ------------------------------------------------------------------------------
def _norm(text: str) -> str:
    text = " ".join(str(text).lower().split())
    return text.strip(" .,;:!?\"'`")


_LETTER = re.compile(r"^(?i:(?:the\s+)?(?:correct\s+)?(?:answer|option)(?:\s+is)?\s*[:\-]?\s*)?\(?([A-J])(?:[\).:]|$)")


def parse_choice(text: str, options: Sequence[str]) -> int | None:
    """The option an output names (see the module docstring for the order of rules), or None."""
    out = _norm(text)
    if not out:
        return None
    normed = [_norm(o) for o in options]
    for i, o in enumerate(normed):
        if o and out == o:
            return i
    starts = [(len(o), i) for i, o in enumerate(normed) if o and out.startswith(o)]
    if starts:
        return max(starts)[1]
    m = _LETTER.match(text.strip())
    if m and LETTERS.index(m.group(1)) < len(options):
        return LETTERS.index(m.group(1))
    contained = [i for i, o in enumerate(normed) if o and o in out]
    return contained[0] if len(contained) == 1 else None


# ---- settings and task ---------------------------------------------------------------------------
@dataclass
class CommonsenseSettings:
    """Settings of the commonsense task (``task.settings`` of a run's config)."""

    datasets: list[str] = field(default_factory=lambda: ["generated"])  # see DATASETS
    sources: dict[str, str] = field(default_factory=dict)  # dataset -> local file/folder or hub id
    hub_configs: dict[str, str] = field(default_factory=dict)  # dataset -> hub config (overrides)
    test_splits: dict[str, str] = field(default_factory=dict)  # dataset -> test split (overrides)
    columns: dict[str, dict] = field(default_factory=dict)  # dataset -> {field: column}
    generated_subtasks: list[str] | None = None  # generated: which subtasks (default all)
    n_train: int = 200  # per dataset / generated subtask (seeded subsample; 0 = all)
    n_test: int = 50  # per dataset / generated subtask (seeded subsample; 0 = all)
    seed: int | None = None  # data seed; None = the run's seed
    scoring: Literal["loglik", "generate"] = "loglik"
    length_normalize: bool = False  # loglik: per-token mean instead of the sum
    share_prompt: bool = True  # loglik: run each prompt once and its options on its KV cache
    max_length: int = 256
    max_new_tokens: int = 24  # generate
    eval_batch_size: int = 8
    use_chat_template: bool = True
    system_prompt: str | None = None

    def __post_init__(self) -> None:
        unknown = [d for d in self.datasets if d not in DATASETS]
        if unknown or not self.datasets:
            raise ValueError(f"unknown commonsense datasets {unknown}; available: {', '.join(DATASETS)}")
        if len(set(self.datasets)) != len(self.datasets):
            raise ValueError(f"datasets listed twice: {self.datasets}")
        for name, mapping in (
            ("sources", self.sources),
            ("hub_configs", self.hub_configs),
            ("test_splits", self.test_splits),
            ("columns", self.columns),
        ):
            extra = sorted(set(mapping) - set(self.datasets))
            if extra:
                raise ValueError(f"{name} names datasets not in datasets: {extra}")
        if "mc" in self.datasets and "mc" not in self.sources:
            raise ValueError("the generic 'mc' dataset needs a file: sources: {mc: /path/to/file.jsonl}")
        for d, cols in self.columns.items():
            if not isinstance(cols, dict) or not all(isinstance(v, str) for v in cols.values()):
                raise ValueError(f"columns.{d} must map field names to column names")
        subs = self.generated_subtasks
        if subs is not None and (not subs or set(subs) - set(GENERATED_SUBTASKS)):
            raise ValueError(f"unknown generated subtasks {subs}; available: {', '.join(GENERATED_SUBTASKS)}")
        if "generated" in self.datasets and (self.n_train < 1 or self.n_test < 1):
            raise ValueError("generated items need n_train >= 1 and n_test >= 1")
        if self.n_train < 0 or self.n_test < 0:
            raise ValueError("n_train and n_test must be >= 0")
        if self.max_length < 8 or self.max_new_tokens < 1 or self.eval_batch_size < 1:
            raise ValueError("max_length must be >= 8, max_new_tokens and eval_batch_size >= 1")


@register
class CommonsenseTask:
    """Multiple-choice commonsense QA (see the module docstring for the full protocol)."""

    name = "commonsense"
    kind = "causal_lm"
    Settings = CommonsenseSettings

    def __init__(self, settings: CommonsenseSettings | None = None, seed: int = 0) -> None:
        self.settings = settings or CommonsenseSettings()
        self.seed = self.settings.seed if self.settings.seed is not None else seed
        self.last_predictions: list[dict[str, Any]] = []

    # ---- data ---------------------------------------------------------------------------------
    def _load_dataset(self, name: str, info: dict[str, Any]) -> tuple[list[Example], list[Example]]:
        s = self.settings
        default_id, default_config, default_split = HUB.get(name, ("", None, "test"))
        source = s.sources.get(name, default_id)
        config = s.hub_configs.get(name, default_config if source == default_id else None)
        cols = s.columns.get(name, {})

        def read(split: str) -> list[Example]:
            rows, origin = read_rows(source, split=split, config=config)
            info["origin"].append(origin)
            return normalize_rows(name, rename_columns(rows, cols, origin), origin)

        if is_single_file(source):
            rows = read("train")
            if not 0 < s.n_test < len(rows):
                raise ValueError(f"{source}: hold-out of n_test={s.n_test} needs 0 < n_test < {len(rows)} rows")
            train, test = holdout(rows, s.n_test, f"{self.seed}:{name}:holdout", _item_key)
        else:
            train = read("train")
            test = subsample(read(s.test_splits.get(name, default_split)), s.n_test, f"{self.seed}:{name}:test")
        train, removed = drop_overlap(train, test, _item_key)
        info["train_overlap_removed"][name] = removed
        return subsample(train, s.n_train, f"{self.seed}:{name}:train"), test

    def load(self) -> TaskData:
        """Train and test examples of every dataset, disjoint and deterministic for the settings and seed."""
        s = self.settings
        info: dict[str, Any] = {"datasets": list(s.datasets), "seed": self.seed, "origin": []}
        info["train_overlap_removed"] = {}
        train: list[Example] = []
        test: list[Example] = []
        for name in s.datasets:
            if name == "generated":
                for sub in s.generated_subtasks or GENERATED_SUBTASKS:
                    train += generate_mc(sub, s.n_train, self.seed)
                    test += generate_mc(sub, s.n_test, self.seed, skip=s.n_train)
            else:
                tr, te = self._load_dataset(name, info)
                train, test = train + tr, test + te
        if not train or not test:
            raise ValueError(f"commonsense datasets {s.datasets} gave {len(train)} train and {len(test)} test examples")
        info["n_train"], info["n_test"] = len(train), len(test)
        info["train_subtasks"] = dict(sorted(Counter(ex["subtask"] for ex in train).items()))
        info["test_subtasks"] = dict(sorted(Counter(ex["subtask"] for ex in test).items()))
        return TaskData(train=train, test=test, group_key="subtask", info=info)

    # ---- text ---------------------------------------------------------------------------------
    def question_text(self, ex: Example) -> str:
        """The user message: context, question, lettered options and the instruction."""
        lines = [f"{LETTERS[i]}. {o}" for i, o in enumerate(ex["options"])]
        head = f"{ex['context'].strip()}\n\n" if ex.get("context", "").strip() else ""
        return f"{head}Question: {ex['question'].strip()}\nOptions:\n" + "\n".join(lines) + f"\n{INSTRUCTION}"

    def prompt(self, ex: Example, tokenizer: Any) -> tuple[list[int], bool]:
        """``(prompt ids, chat)`` for an example."""
        s = self.settings
        user = self.question_text(ex)
        text, chat = chat_prompt(
            tokenizer,
            user,
            use_chat_template=s.use_chat_template,
            system_prompt=s.system_prompt,
            plain=user + "\nAnswer:",
        )
        return text_ids(text, tokenizer), chat

    def option_ids(self, option: str, tokenizer: Any, chat: bool) -> list[int]:
        return text_ids(option if chat else " " + option, tokenizer)

    # ---- training batches ---------------------------------------------------------------------
    def collate(self, examples: list[Example], tokenizer: Any) -> dict[str, torch.Tensor]:
        """Completion-only batches: the correct option's text + EOS is the completion."""
        eos = eos_id(tokenizer, "commonsense")
        seqs = []
        for ex in examples:
            p, chat = self.prompt(ex, tokenizer)
            c = [*self.option_ids(ex["options"][ex["answer"]], tokenizer, chat), eos]
            seqs.append(fit_completion(p, c, self.settings.max_length))
        return completion_batch(seqs, pad_id(tokenizer))

    # ---- evaluation ---------------------------------------------------------------------------
    def option_scores(self, model: Any, tokenizer: Any, examples: Sequence[Example]) -> list[list[tuple[float, int]]]:
        """``(sum of the option tokens' log-probs, token count)`` of every option of every example."""
        L = self.settings.max_length
        seqs, owner = [], []
        for e, ex in enumerate(examples):
            p, chat = self.prompt(ex, tokenizer)
            for o in ex["options"]:
                c = self.option_ids(o, tokenizer, chat)[: L - 1]
                seqs.append((p[max(0, len(p) - (L - len(c))) :], c))
                owner.append(e)
        if self.settings.share_prompt:
            shared = self._shared_scores(model, seqs, owner, len(examples))
            if shared is not None:
                return shared
        scores = completion_logprobs(model, seqs, pad_id(tokenizer), self.settings.eval_batch_size)
        out: list[list[tuple[float, int]]] = [[] for _ in examples]
        for e, sc in zip(owner, scores):
            out[e].append(sc)
        return out

    def _shared_scores(
        self, model: Any, seqs: list[tuple[list[int], list[int]]], owner: list[int], n: int
    ) -> list[list[tuple[float, int]]] | None:
        """Per example, the prompt once and its options on its KV cache; None when the model has no
        repeatable cache or the options' prompts differ (cut differently at ``max_length``)."""
        out: list[list[tuple[float, int]]] = [[] for _ in range(n)]
        groups: dict[int, list[tuple[list[int], list[int]]]] = {}
        for e, sc in zip(owner, seqs):
            groups.setdefault(e, []).append(sc)
        if any(len({tuple(p) for p, _ in g}) != 1 for g in groups.values()):
            return None
        progress.expect(len(groups))
        try:
            for e, g in groups.items():
                out[e] = shared_prompt_logprobs(model, g[0][0], [c for _, c in g])
                progress.advance()
        except TypeError:
            return None
        return out

    def choose(self, scores: Sequence[tuple[float, int]]) -> int:
        """The option with the highest (length-normalised, if set) score; the first on ties."""
        norm = self.settings.length_normalize
        values = [(s / max(n, 1)) if norm else s for s, n in scores]
        return max(range(len(values)), key=lambda i: (values[i], -i))

    def evaluate(self, model: Any, tokenizer: Any, examples: list[Example]) -> dict[str, float]:
        """``accuracy`` (mean over subtasks), ``accuracy_<subtask>``, (``parse_rate``), ``n``."""
        s = self.settings
        if not examples:
            return {"accuracy": 0.0, "n": 0}
        records = []
        if s.scoring == "loglik":
            for ex, sc in zip(examples, self.option_scores(model, tokenizer, examples)):
                pred = self.choose(sc)
                records.append({"subtask": ex["subtask"], "scores": sc, "pred": pred, "answer": ex["answer"]})
        else:
            prompts = [self.prompt(ex, tokenizer)[0][-s.max_length :] for ex in examples]
            texts = greedy_generate(
                model, tokenizer, prompts, max_new_tokens=s.max_new_tokens, batch_size=s.eval_batch_size
            )
            for ex, text in zip(examples, texts):
                pred = parse_choice(text, ex["options"])
                records.append({"subtask": ex["subtask"], "output": text, "pred": pred, "answer": ex["answer"]})
        for r in records:
            r["correct"] = r["pred"] == r["answer"]
        self.last_predictions = records
        by: dict[str, list[bool]] = {}
        for r in records:
            by.setdefault(r["subtask"], []).append(r["correct"])
        per = {k: sum(v) / len(v) for k, v in sorted(by.items())}
        metrics: dict[str, float] = {"accuracy": sum(per.values()) / len(per)}
        metrics.update({f"accuracy_{k}": v for k, v in per.items()})
        if s.scoring == "generate":
            metrics["parse_rate"] = sum(r["pred"] is not None for r in records) / len(records)
        metrics["n"] = len(records)
        return metrics

    def protocol(self) -> dict[str, Any]:
        """How data, prompts and evaluation are defined, for the run's records."""
        s = self.settings
        scoring = (
            {
                "method": "option log-likelihood",
                "score": "per-token mean log-prob of the option's tokens"
                if s.length_normalize
                else "sum of the option tokens' log-probs given the prompt",
                "eos_scored": False,
                "evaluation": "prompt run once, options on its KV cache"
                if s.share_prompt
                else "prompt + option as one sequence, right-padded batches",
                "prediction": "highest score, first on ties",
                "batch_size": s.eval_batch_size,
            }
            if s.scoring == "loglik"
            else {
                "method": "greedy generation + answer parsing",
                "max_new_tokens": s.max_new_tokens,
                "parsing": "equal option text > longest option prefix > leading letter > the only contained "
                "option; unparsed = wrong",
            }
        )
        return {
            "task": self.name,
            "kind": self.kind,
            "settings": dataclasses.asdict(s),
            "seed": self.seed,
            "data": "per dataset: train split vs its labelled test split (or a seeded hold-out of a file); "
            "generated: first n_train / next n_test distinct items per subtask; seeded subsamples per dataset",
            "prompt": ("chat template, user message = " if s.use_chat_template else "plain: ")
            + "[context] Question / lettered Options / instruction"
            + ("" if s.use_chat_template else " + '\\nAnswer:'"),
            "completion": "the correct option's text + EOS; loss on completion tokens only",
            "scoring": scoring,
            "metrics": "accuracy = mean of per-subtask accuracies; accuracy_<subtask>; n",
            "split_evaluated": "test",
        }


__all__ = [
    "ADAPTERS",
    "DATASETS",
    "GENERATED_SUBTASKS",
    "HUB",
    "CommonsenseSettings",
    "CommonsenseTask",
    "generate_mc",
    "normalize_rows",
    "parse_choice",
]
