"""Instruction tuning (Alpaca / Dolly style SFT) for causal LMs: held-out completion loss and perplexity.

Protocol
--------
Examples are ``{"instruction", "input", "output", "category"}``. Rows are read through
``columns`` (``{instruction, input, output, category}`` -> column); unmapped fields take the
first column present among: instruction <- ``instruction`` / ``prompt`` / ``question``; input <-
``input`` / ``context`` (may be absent: empty); output <- ``output`` / ``response`` / ``answer`` /
``completion``; category <- ``category``. So Alpaca (``tatsu-lab/alpaca``: instruction, input,
output) and Dolly (``databricks/databricks-dolly-15k``: instruction, context, response,
category) load without a mapping. Rows with an empty instruction or output are dropped. Dolly's
``category`` (open_qa, brainstorming, ...) is the natural non-IID key; rows without one get
``category_fallback``: ``"first_word"`` (the instruction's first word, lower-cased: "write",
"generate", "what", ...) or ``"const:NAME"``. ``categories`` keeps only those categories.

Data (:meth:`InstructionTask.load`), split into train and test *before* any client partition:

* ``source="generated"`` (default, offline): :func:`generate_instructions`, five Dolly-like
  categories from templates (open_qa: capitals; closed_qa: a fact in the context;
  information_extraction: a field of a short biography; classification: fruit/vegetable/animal
  labels; brainstorming: a few items of a kind), in turn; train = the first ``n_train``
  distinct items of the seeded stream, test = the next ``n_test`` distinct ones.
* a local file, a folder or a hub id: the ``split_train`` split; the test set is the
  ``split_test`` split when set (or ``test_source``), else ``n_test`` rows held out of train
  (seeded; Alpaca and Dolly ship only a train split). Train rows with the instruction and
  input of a test row are dropped; seeded subsamples of ``n_train`` / ``n_test`` (``0`` = all).

Prompt: the instruction (plus ``"\\n\\n" + input`` when there is one) as the user message of the
tokenizer's chat template with the generation prompt (``use_chat_template``;
``system_prompt`` adds a system message), or plain Alpaca format ``"### Instruction:\\n{i}\\n\\n
[### Input:\\n{input}\\n\\n]### Response:\\n"``. Completion: the output + EOS. Prompt and
completion are tokenized separately (no special tokens) and concatenated.

Training batches (:meth:`InstructionTask.collate`): ``labels = -100`` on prompt and padding,
right-padded, cut to ``max_length`` (the completion's end, or the prompt's start when the prompt
leaves less than a quarter of ``max_length``).

Evaluation (:meth:`InstructionTask.evaluate`): the test examples batched exactly as in training
(same truncation), ``eval_batch_size`` at a time; the negative log-likelihood of every
completion token (EOS included) given everything before it, log-softmax in float32, summed in
float64. ``loss`` = total NLL / number of completion tokens over the whole test set (a
per-token mean, as transformers' loss over one batch of all test examples), ``perplexity`` =
``exp(loss)``, and ``n``. Lower is better.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fedlora.data.sources import SourceError, drop_overlap, holdout, is_single_file, read_rows, subsample
from fedlora.tasks.base import Example, TaskData, register
from fedlora.tasks.common import (
    chat_prompt,
    completion_batch,
    completion_logprobs,
    eos_id,
    fit_completion,
    pad_id,
    text_ids,
)

FIELDS: dict[str, tuple[str, ...]] = {
    "instruction": ("instruction", "prompt", "question"),
    "input": ("input", "context"),
    "output": ("output", "response", "answer", "completion"),
    "category": ("category",),
}
PLAIN_PROMPT = "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
GENERATED_CATEGORIES = ("open_qa", "closed_qa", "information_extraction", "classification", "brainstorming")


# ---- rows ----------------------------------------------------------------------------------------
def normalize_rows(
    rows: Sequence[Mapping[str, Any]],
    columns: Mapping[str, str] | None = None,
    *,
    category_fallback: str = "first_word",
    origin: str = "",
) -> tuple[list[Example], int]:
    """``(examples, dropped)``: rows read through ``columns`` or the default field names."""
    columns = dict(columns or {})
    unknown = set(columns) - set(FIELDS)
    if unknown:
        raise SourceError(f"unknown column mapping keys {sorted(unknown)}; allowed: {', '.join(FIELDS)}")
    if not rows:
        return [], 0
    present = set(rows[0])
    cols: dict[str, str | None] = {}
    for f, candidates in FIELDS.items():
        if f in columns:
            if columns[f] not in present:
                raise SourceError(f"{origin}: column {columns[f]!r} ({f}) not found; the rows have {sorted(present)}")
            cols[f] = columns[f]
        else:
            cols[f] = next((c for c in candidates if c in present), None)
    for f in ("instruction", "output"):
        if cols[f] is None:
            raise SourceError(
                f"{origin}: no {f} column (tried {', '.join(FIELDS[f])}); the rows have {sorted(present)}. "
                f"Set the column mapping, e.g. columns: {{{f}: my_column}}"
            )
    out, dropped = [], 0
    for row in rows:

        def get(f: str, row: Mapping[str, Any] = row) -> str:
            c = cols[f]
            v = row.get(c) if c is not None else None
            return "" if v is None else str(v).strip()

        instruction, output = get("instruction"), get("output")
        if not instruction or not output:
            dropped += 1
            continue
        category = get("category") or fallback_category(instruction, category_fallback)
        out.append({"instruction": instruction, "input": get("input"), "output": output, "category": category})
    return out, dropped


def fallback_category(instruction: str, fallback: str) -> str:
    """The category of a row without one: its first word (lower-cased, letters only) or a constant."""
    if fallback == "first_word":
        word = "".join(ch for ch in instruction.split()[0].lower() if ch.isalnum()) if instruction.split() else ""
        return word or "other"
    if fallback.startswith("const:") and len(fallback) > len("const:"):
        return fallback[len("const:") :]
    raise SourceError(f"unknown category_fallback {fallback!r}; allowed: first_word, const:NAME")


# ---- generated -----------------------------------------------------------------------------------
_CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Japan": "Tokyo",
    "Canada": "Ottawa",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Peru": "Lima",
    "Norway": "Oslo",
    "Greece": "Athens",
    "Portugal": "Lisbon",
    "Austria": "Vienna",
    "Poland": "Warsaw",
    "Ireland": "Dublin",
    "Chile": "Santiago",
    "Cuba": "Havana",
    "Sweden": "Stockholm",
    "Finland": "Helsinki",
    "Thailand": "Bangkok",
}
_NAMES = ("Ada", "Bruno", "Chen", "Dana", "Elif", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Kemal", "Lena")
_CITIES = ("Lyon", "Porto", "Graz", "Turin", "Ghent", "Bergen", "Krakow", "Seville", "Utrecht", "Basel")
_JOBS = ("teacher", "engineer", "painter", "chemist", "pilot", "architect", "nurse", "baker", "librarian")
_ITEMS = ("lamp", "backpack", "kettle", "bicycle", "umbrella", "notebook", "blender", "chair", "jacket")
_KINDS = {
    "fruit": ("apple", "banana", "cherry", "mango", "pear", "grape", "peach", "plum", "kiwi", "lemon"),
    "vegetable": ("carrot", "potato", "onion", "spinach", "broccoli", "cabbage", "leek", "pepper", "pea", "kale"),
    "animal": ("dog", "horse", "tiger", "rabbit", "eagle", "whale", "lion", "mouse", "sheep", "fox"),
}
_LISTS = {
    "colors": ("red", "blue", "green", "yellow", "purple", "orange", "black", "white", "pink", "brown"),
    "musical instruments": ("piano", "guitar", "violin", "drum", "flute", "trumpet", "cello", "harp"),
    "sports": ("football", "tennis", "swimming", "rowing", "cycling", "hockey", "golf", "boxing", "judo"),
    "kitchen tools": ("whisk", "ladle", "spatula", "grater", "peeler", "colander", "rolling pin", "sieve"),
    "fruits": _KINDS["fruit"],
    "vegetables": _KINDS["vegetable"],
    "animals": _KINDS["animal"],
    "countries": tuple(_CAPITALS),
    "European cities": _CITIES,
    "professions": _JOBS,
}


def _instruction_item(category: str, rng: random.Random) -> Example:
    inp = ""
    if category == "open_qa":
        country = rng.choice(sorted(_CAPITALS))
        form = rng.randrange(3)
        if form == 0:
            instruction = rng.choice(("What is the capital of {c}?", "Name the capital city of {c}.")).format(c=country)
            output = f"The capital of {country} is {_CAPITALS[country]}."
        elif form == 1:
            instruction = f"Which country has {_CAPITALS[country]} as its capital?"
            output = f"{_CAPITALS[country]} is the capital of {country}."
        else:
            other = rng.choice(sorted(_CAPITALS))
            instruction = f"Is {_CAPITALS[other]} the capital of {country}?"
            output = (
                f"Yes, {_CAPITALS[other]} is the capital of {country}."
                if other == country
                else f"No, the capital of {country} is {_CAPITALS[country]}, not {_CAPITALS[other]}."
            )
    elif category == "closed_qa":
        item, price, shop = rng.choice(_ITEMS), rng.randint(5, 400), rng.choice(_NAMES)
        inp = f"{shop}'s shop sells a {item} for {price} dollars and delivers it within {rng.randint(1, 9)} days."
        instruction = f"How much does the {item} cost, according to the text?"
        output = f"The {item} costs {price} dollars."
    elif category == "information_extraction":
        name, city, job, year = rng.choice(_NAMES), rng.choice(_CITIES), rng.choice(_JOBS), rng.randint(1900, 2005)
        article = "an" if job[0] in "aeiou" else "a"
        inp = f"{name} was born in {city} in {year} and worked as {article} {job} for many years."
        field_, answer = rng.choice((("year of birth", str(year)), ("home city", city), ("job", job)))
        instruction = f"Extract {name}'s {field_} from the text."
        output = f"{name}'s {field_} is {answer}."
    elif category == "classification":
        words = [rng.choice(_KINDS[k]) for k in rng.choices(sorted(_KINDS), k=3)]
        kinds = {w: k for k, ws in _KINDS.items() for w in ws}
        instruction = "Classify each of the following as a fruit, a vegetable or an animal: " + ", ".join(words)
        output = "\n".join(f"{w.capitalize()}: {kinds[w]}" for w in words)
    elif category == "brainstorming":
        kind = rng.choice(sorted(_LISTS))
        count = rng.choice((2, 3, 4))
        words = {2: "two", 3: "three", 4: "four"}[count]
        given, *picks = rng.sample(_LISTS[kind], count + 1)
        if rng.random() < 0.5:
            instruction = f"Give me {words} {kind} other than {given}."
        else:
            instruction = f"Name {words} {kind}, starting with {given}."
            picks = [given, *picks[: count - 1]]
        output = f"Here are {words} {kind}: " + ", ".join(picks) + "."
    else:
        raise ValueError(f"unknown generated category {category!r}")
    return {"instruction": instruction, "input": inp, "output": output, "category": category}


def _key(ex: Example) -> tuple[str, str]:
    return ex["instruction"], ex.get("input", "")


def generate_instructions(n: int, seed: int, *, skip: int = 0) -> list[Example]:
    """``n`` distinct generated instruction examples after the first ``skip`` ones of the seeded
    stream; item ``i`` has category ``GENERATED_CATEGORIES[i % 5]`` (balanced categories)."""
    rng = random.Random(f"instruction:{seed}")
    seen: set[tuple[str, str]] = set()
    out: list[Example] = []
    for i in range(skip + n):
        category = GENERATED_CATEGORIES[i % len(GENERATED_CATEGORIES)]
        for _ in range(1000):
            ex = _instruction_item(category, rng)
            if _key(ex) not in seen:
                break
        else:
            raise ValueError(f"could not draw {skip + n} distinct generated instructions ({category} exhausted)")
        seen.add(_key(ex))
        if i >= skip:
            out.append(ex)
    return out


# ---- settings and task ---------------------------------------------------------------------------
@dataclass
class InstructionSettings:
    """Settings of the instruction task (``task.settings`` of a run's config)."""

    source: str = "generated"  # "generated", a local file/folder, or a hub id (databricks/databricks-dolly-15k)
    n_train: int = 400  # training examples (seeded subsample; 0 = all)
    n_test: int = 50  # test examples (seeded; 0 = all of split_test)
    seed: int | None = None  # data seed; None = the run's seed
    hub_config: str | None = None
    split_train: str = "train"
    split_test: str | None = None  # None: hold out n_test rows of the train split
    test_source: str | None = None  # a separate test file/folder/hub id (its split_test, or "train")
    columns: dict[str, str] = field(default_factory=dict)  # {instruction, input, output, category} -> column
    category_fallback: str = "first_word"  # rows without a category: "first_word" or "const:NAME"
    categories: list[str] | None = None  # keep only these categories
    max_length: int = 256
    eval_batch_size: int = 8
    use_chat_template: bool = True
    system_prompt: str | None = None

    def __post_init__(self) -> None:
        if self.source == "generated" and (self.n_train < 1 or self.n_test < 1):
            raise ValueError("generated instructions need n_train >= 1 and n_test >= 1")
        if self.n_train < 0 or self.n_test < 0:
            raise ValueError("n_train and n_test must be >= 0")
        if self.max_length < 8 or self.eval_batch_size < 1:
            raise ValueError("max_length must be >= 8 and eval_batch_size >= 1")
        fallback_category("x", self.category_fallback)  # validates it
        if self.categories is not None and not self.categories:
            raise ValueError("categories must name at least one category (or be null)")


@register
class InstructionTask:
    """Alpaca/Dolly-style SFT (see the module docstring for the full protocol)."""

    name = "instruction"
    kind = "causal_lm"
    Settings = InstructionSettings

    def __init__(self, settings: InstructionSettings | None = None, seed: int = 0) -> None:
        self.settings = settings or InstructionSettings()
        self.seed = self.settings.seed if self.settings.seed is not None else seed

    # ---- data ---------------------------------------------------------------------------------
    def _read(self, source: str, split: str, info: dict[str, Any]) -> list[Example]:
        s = self.settings
        rows, origin = read_rows(source, split=split, config=s.hub_config)
        examples, dropped = normalize_rows(rows, s.columns, category_fallback=s.category_fallback, origin=origin)
        info["origin"].append(origin)
        info["dropped"] += dropped
        if s.categories is not None:
            examples = [ex for ex in examples if ex["category"] in s.categories]
        return examples

    def load(self) -> TaskData:
        """Train and test examples, disjoint and deterministic for the settings and seed."""
        s = self.settings
        info: dict[str, Any] = {"source": s.source, "seed": self.seed, "origin": [], "dropped": 0}
        if s.source == "generated":
            train = generate_instructions(s.n_train, self.seed)
            test = generate_instructions(s.n_test, self.seed, skip=s.n_train)
            if s.categories is not None:
                train = [ex for ex in train if ex["category"] in s.categories]
                test = [ex for ex in test if ex["category"] in s.categories]
        else:
            if s.test_source is not None:
                train = self._read(s.source, s.split_train, info)
                split = s.split_test or ("train" if is_single_file(s.test_source) else "test")
                test = subsample(self._read(s.test_source, split, info), s.n_test, f"{self.seed}:test")
            elif s.split_test is not None and not is_single_file(s.source):
                train = self._read(s.source, s.split_train, info)
                test = subsample(self._read(s.source, s.split_test, info), s.n_test, f"{self.seed}:test")
            else:
                rows = self._read(s.source, s.split_train, info)
                if not 0 < s.n_test < len(rows):
                    raise ValueError(f"{s.source}: hold-out of n_test={s.n_test} needs 0 < n_test < {len(rows)} rows")
                train, test = holdout(rows, s.n_test, f"{self.seed}:holdout", _key)
            train, info["train_overlap_removed"] = drop_overlap(train, test, _key)
            train = subsample(train, s.n_train, f"{self.seed}:train")
        if not train or not test:
            raise ValueError(f"instruction source {s.source!r} gave {len(train)} train and {len(test)} test examples")
        info["n_train"], info["n_test"] = len(train), len(test)
        info["train_categories"] = dict(sorted(Counter(ex["category"] for ex in train).items()))
        info["test_categories"] = dict(sorted(Counter(ex["category"] for ex in test).items()))
        return TaskData(train=train, test=test, group_key="category", info=info)

    # ---- text ---------------------------------------------------------------------------------
    def prompt_text(self, ex: Example, tokenizer: Any) -> str:
        s = self.settings
        inp = ex.get("input", "")
        user = ex["instruction"] + (f"\n\n{inp}" if inp else "")
        block = f"### Input:\n{inp}\n\n" if inp else ""
        plain = PLAIN_PROMPT.format(instruction=ex["instruction"], input_block=block)
        return chat_prompt(
            tokenizer, user, use_chat_template=s.use_chat_template, system_prompt=s.system_prompt, plain=plain
        )[0]

    def sequence(self, ex: Example, tokenizer: Any) -> tuple[list[int], list[int]]:
        """``(prompt ids, completion ids)`` cut to ``max_length`` (completion = output + EOS)."""
        p = text_ids(self.prompt_text(ex, tokenizer), tokenizer)
        c = [*text_ids(ex["output"], tokenizer), eos_id(tokenizer, "instruction")]
        return fit_completion(p, c, self.settings.max_length)

    # ---- batches ------------------------------------------------------------------------------
    def collate(self, examples: list[Example], tokenizer: Any) -> dict[str, torch.Tensor]:
        """``input_ids``, ``attention_mask``, ``labels`` (prompt and padding = -100), right-padded."""
        return completion_batch([self.sequence(ex, tokenizer) for ex in examples], pad_id(tokenizer))

    # ---- evaluation ---------------------------------------------------------------------------
    def evaluate(self, model: Any, tokenizer: Any, examples: list[Example]) -> dict[str, float]:
        """``loss`` (per completion token over the whole set), ``perplexity`` = exp(loss), ``n``."""
        if not examples:
            return {"loss": float("nan"), "perplexity": float("nan"), "n": 0}
        seqs = [self.sequence(ex, tokenizer) for ex in examples]
        scores = completion_logprobs(model, seqs, pad_id(tokenizer), self.settings.eval_batch_size)
        nll = -math.fsum(s for s, _ in scores)
        tokens = sum(n for _, n in scores)
        loss = nll / tokens
        return {"loss": loss, "perplexity": math.exp(loss), "n": len(examples)}

    def protocol(self) -> dict[str, Any]:
        """How data, prompts and evaluation are defined, for the run's records."""
        s = self.settings
        return {
            "task": self.name,
            "kind": self.kind,
            "settings": dataclasses.asdict(s),
            "seed": self.seed,
            "data": (
                f"generated Dolly-like instructions (stream seed={self.seed}): train = first n_train distinct, "
                "test = next n_test distinct"
                if s.source == "generated"
                else "train = the source's train split; test = its split_test / test_source, or a seeded hold-out "
                "of n_test train rows; train rows sharing a test instruction+input removed; seeded subsamples"
            ),
            "prompt": (
                "chat template, user message = instruction [+ '\\n\\n' + input], add_generation_prompt=True"
                if s.use_chat_template
                else f"plain Alpaca format: {PLAIN_PROMPT!r}"
            ),
            "completion": "output + EOS; loss on completion tokens only (prompt and padding labels = -100)",
            "truncation": f"as in training, max_length={s.max_length}",
            "metric": "loss = total NLL of completion tokens (EOS included) / their count over the whole test set; "
            "perplexity = exp(loss); lower is better",
            "split_evaluated": "test",
        }


__all__ = [
    "FIELDS",
    "GENERATED_CATEGORIES",
    "InstructionSettings",
    "InstructionTask",
    "fallback_category",
    "generate_instructions",
    "normalize_rows",
]
