"""GLUE-style sentence(-pair) classification and regression for encoder models (``model.kind: seq_cls``).

Protocol
--------
Datasets (``dataset``): the GLUE tasks below, with the columns of ``nyu-mll/glue`` (the hub
config is the dataset name), their label counts and GLUE's metrics:

==========  =========================  ======  =============================  ====================
dataset     text columns               labels  metrics (first = headline)     test split
==========  =========================  ======  =============================  ====================
``cola``    sentence                   2       matthews, accuracy             validation
``sst2``    sentence                   2       accuracy                       validation
``mrpc``    sentence1, sentence2       2       accuracy, f1 (label 1)         validation
``qqp``     question1, question2       2       accuracy, f1 (label 1)         validation
``stsb``    sentence1, sentence2       1       pearson, spearman              validation
``mnli``    premise, hypothesis        3       accuracy                       validation_matched
``qnli``    question, sentence         2       accuracy                       validation
``rte``     sentence1, sentence2       2       accuracy                       validation
==========  =========================  ======  =============================  ====================

STS-B is regression: one output (``model.num_labels: 1``) and float labels, so transformers'
sequence-classification heads use the MSE loss; predictions are the raw outputs (not clipped).
Every other dataset is single-label classification (cross-entropy); ``model.num_labels`` must
equal the label count (checked in :meth:`ClassificationTask.evaluate`).

Data (:meth:`ClassificationTask.load`), split into train and test *before* any client partition.
GLUE's test labels are hidden, so the test set is GLUE's validation split:

* ``source="generated"`` (default, offline, ``dataset: sst2`` only): SST-2-format movie-review
  sentences from templates (:func:`generate_sentiment`): plain opinions with intensifiers,
  ~10% negations whose label is the opposite of the adjective's ("not bad" = positive,
  "hardly gripping" = negative) and ~10% contrasts labelled by the clause after "but";
  labels are exact (no noise) and balanced. Seeded stream ``seed``; train = the first
  ``n_train`` distinct sentences, test = the next ``n_test`` (disjoint by construction).
* a hub dataset id (``nyu-mll/glue`` or ``glue``; config = ``hub_config`` or the dataset
  name) or a folder of split files: the ``split_train`` split as train and ``split_test``
  (default: the validation split above) as test; rows with a hidden label (``-1``) dropped.
* a single local file (``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet``): ``test_source`` as
  the test set if set, else ``n_test`` rows held out (seeded).

Then train rows whose text (pair) also occurs in test are dropped, and train / test are
subsampled (seeded, order kept) to ``n_train`` / ``n_test`` rows (``0`` = all). Columns are read
through ``columns`` (``{sentence1, sentence2, label}`` -> column; default the GLUE layout).
Labels may be integers, digit strings, or names (``label_names``, default GLUE's names such as
``negative``/``positive`` or ``entailment``/``neutral``/``contradiction``; case-insensitive).
Examples are ``{"text", "text_pair"?, "label", "label_bucket"?}``; the partition key is
``label`` (STS-B: ``label_bucket`` = the score's integer part, ``0``..``4``).

Batches (:meth:`ClassificationTask.collate`): the tokenizer's own encoding of the text or
pair (special tokens and ``token_type_ids`` as the model expects), truncated to ``max_length``
tokens (pairs: longest first), padded to the longest in the batch, and ``labels`` (LongTensor;
float32 for STS-B).

Evaluation (:meth:`ClassificationTask.evaluate`): batched forward passes (``eval_batch_size``,
sorted by length) of the test examples encoded as in training; the prediction is the argmax of
the logits (STS-B: the single output). Metrics over the whole test set, in GLUE's definitions:
accuracy; binary F1 of label 1; Matthews correlation (multi-class form, 0 when undefined);
Pearson and Spearman correlation (ties ranked by their average; 0 when a side is constant);
plus ``n``. Each evaluation reports the model as it is (the runtime records every round; the
headline is the final round, never the best).
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
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
    model_device,
)


@dataclass(frozen=True)
class GlueSpec:
    """One GLUE dataset: its text columns, label count, metrics and test (validation) split."""

    name: str
    text: str
    text_pair: str | None
    num_labels: int
    metrics: tuple[str, ...]
    label_names: tuple[str, ...] = ()
    test_split: str = "validation"

    @property
    def regression(self) -> bool:
        return self.num_labels == 1


GLUE: dict[str, GlueSpec] = {
    "cola": GlueSpec("cola", "sentence", None, 2, ("matthews", "accuracy"), ("unacceptable", "acceptable")),
    "sst2": GlueSpec("sst2", "sentence", None, 2, ("accuracy",), ("negative", "positive")),
    "mrpc": GlueSpec("mrpc", "sentence1", "sentence2", 2, ("accuracy", "f1"), ("not_equivalent", "equivalent")),
    "qqp": GlueSpec("qqp", "question1", "question2", 2, ("accuracy", "f1"), ("not_duplicate", "duplicate")),
    "stsb": GlueSpec("stsb", "sentence1", "sentence2", 1, ("pearson", "spearman")),
    "mnli": GlueSpec(
        "mnli",
        "premise",
        "hypothesis",
        3,
        ("accuracy",),
        ("entailment", "neutral", "contradiction"),
        "validation_matched",
    ),
    "qnli": GlueSpec("qnli", "question", "sentence", 2, ("accuracy",), ("entailment", "not_entailment")),
    "rte": GlueSpec("rte", "sentence1", "sentence2", 2, ("accuracy",), ("entailment", "not_entailment")),
}
GLUE_HUB_IDS = ("nyu-mll/glue", "glue")
STSB_BUCKETS = 5


def glue_spec(name: str) -> GlueSpec:
    """The spec of ``name`` (``SST-2``, ``sst2``, ``STS-B`` ... are all accepted)."""
    key = name.lower().replace("-", "").replace("_", "")
    if key not in GLUE:
        raise ValueError(f"unknown GLUE dataset {name!r}; available: {', '.join(GLUE)}")
    return GLUE[key]


# ---- metrics -------------------------------------------------------------------------------------
def accuracy(pred: Sequence[Any], gold: Sequence[Any]) -> float:
    """Fraction of equal predictions."""
    if len(pred) != len(gold) or not gold:
        raise ValueError("accuracy needs equally long, non-empty predictions and labels")
    return sum(int(p == g) for p, g in zip(pred, gold)) / len(gold)


def f1_binary(pred: Sequence[int], gold: Sequence[int], positive: int = 1) -> float:
    """F1 of the ``positive`` class, ``2 tp / (2 tp + fp + fn)`` (0 when there is no positive at all)."""
    tp = sum(1 for p, g in zip(pred, gold) if p == positive and g == positive)
    fp = sum(1 for p, g in zip(pred, gold) if p == positive and g != positive)
    fn = sum(1 for p, g in zip(pred, gold) if p != positive and g == positive)
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def matthews_corrcoef(pred: Sequence[int], gold: Sequence[int]) -> float:
    """Matthews correlation, multi-class form (Gorodkin 2004, as scikit-learn); 0 when undefined.

    ``(c s - sum_k p_k t_k) / sqrt((s^2 - sum_k p_k^2) (s^2 - sum_k t_k^2))`` with ``c`` correct,
    ``s`` total, ``p_k`` / ``t_k`` the predicted / true counts of class ``k``.
    """
    s = len(gold)
    classes = sorted(set(pred) | set(gold))
    pc, tc = Counter(pred), Counter(gold)
    c = sum(1 for p, g in zip(pred, gold) if p == g)
    cov_pt = c * s - sum(pc[k] * tc[k] for k in classes)
    cov_pp = s * s - sum(pc[k] ** 2 for k in classes)
    cov_tt = s * s - sum(tc[k] ** 2 for k in classes)
    if cov_pp == 0 or cov_tt == 0:
        return 0.0
    return float(cov_pt / math.sqrt(float(cov_pp) * float(cov_tt)))


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation (float64); 0 when either side is constant."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    a, b = a - a.mean(), b - b.mean()
    denom = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum() / denom) if denom > 0 else 0.0


def average_ranks(x: Sequence[float]) -> np.ndarray:
    """1-based ranks, ties given the mean of the ranks they span."""
    a = np.asarray(x, dtype=np.float64)
    order = np.argsort(a, kind="mergesort")
    ranks = np.empty(len(a), dtype=np.float64)
    i = 0
    while i < len(a):
        j = i
        while j + 1 < len(a) and a[order[j + 1]] == a[order[i]]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman correlation: Pearson of the average ranks; 0 when either side is constant."""
    return pearson(average_ranks(x), average_ranks(y))


def glue_metrics(spec: GlueSpec, pred: Sequence[Any], gold: Sequence[Any]) -> dict[str, float]:
    """The dataset's GLUE metrics, in the order of ``spec.metrics``."""
    fns = {
        "accuracy": accuracy,
        "f1": f1_binary,
        "matthews": matthews_corrcoef,
        "pearson": pearson,
        "spearman": spearman,
    }
    return {m: float(fns[m](pred, gold)) for m in spec.metrics}


# ---- generated sentiment -------------------------------------------------------------------------
_ASPECTS = (
    "movie",
    "film",
    "story",
    "plot",
    "acting",
    "script",
    "soundtrack",
    "ending",
    "dialogue",
    "cast",
    "direction",
    "pacing",
    "cinematography",
    "lead performance",
    "screenplay",
    "humor",
)
_KINDS = ("movie", "film", "comedy", "thriller", "drama", "documentary", "romance", "sequel")
_POSITIVE = (
    "wonderful",
    "brilliant",
    "charming",
    "delightful",
    "moving",
    "gripping",
    "superb",
    "enjoyable",
    "clever",
    "beautiful",
    "funny",
    "heartfelt",
    "stunning",
    "engaging",
    "fresh",
    "touching",
)
_NEGATIVE = (
    "dull",
    "boring",
    "awful",
    "tedious",
    "clumsy",
    "forgettable",
    "bland",
    "predictable",
    "painful",
    "lifeless",
    "messy",
    "weak",
    "shallow",
    "tiresome",
    "confusing",
    "bad",
)
_INTENSIFIERS = ("", "", "", "really ", "truly ", "quite ", "rather ", "incredibly ", "so ")
_PLAIN = (
    "The {a} was {i}{adj}.",
    "I found the {a} {i}{adj}.",
    "Honestly, the {a} felt {i}{adj}.",
    "What a {adj} {k}!",
    "This is a {i}{adj} {k}.",
    "{I}{adj} from start to finish.",
    "The {a} is {i}{adj} and the {a2} is {i2}{adj2}.",
    "A {adj} {k} with a {adj2} {a}.",
    "Overall, a {i}{adj} experience.",
    "My friends and I thought the {a} was {i}{adj}.",
)
_ARTICLE = re.compile(r"\b([Aa]) (?=[aeiou])")
_NEGATED = (  # the label is the opposite of the adjective's polarity
    "The {a} was not {adj}.",
    "The {a} was never {adj}.",
    "I would not call the {a} {adj}.",
    "This {k} is hardly {adj}.",
    "The {a} is not {i}{adj} at all.",
)
_CONTRAST = (  # the label follows the clause after "but"
    "The {a} was {adj2}, but the {a2} was {i}{adj}.",
    "I expected a {adj2} {k}, but it was {i}{adj}.",
    "At first the {a} seemed {adj2}, but in the end it was {i}{adj}.",
)


def _sentiment_sentence(rng: random.Random, label: int) -> tuple[str, str]:
    """One sentence with sentiment ``label`` (1 positive) and its pattern (plain/negation/contrast)."""
    pos, neg = (_POSITIVE, _NEGATIVE) if label == 1 else (_NEGATIVE, _POSITIVE)
    u = rng.random()
    aspects = rng.sample(_ASPECTS, 2)
    fill = {
        "a": aspects[0],
        "a2": aspects[1],
        "k": rng.choice(_KINDS),
        "i": rng.choice(_INTENSIFIERS),
        "i2": rng.choice(_INTENSIFIERS),
    }
    if u < 0.1:
        pattern, template, fill["adj"] = "negation", rng.choice(_NEGATED), rng.choice(neg)
    elif u < 0.2:
        pattern, template = "contrast", rng.choice(_CONTRAST)
        fill["adj"], fill["adj2"] = rng.choice(pos), rng.choice(neg)
    else:
        pattern, template = "plain", rng.choice(_PLAIN)
        fill["adj"], fill["adj2"] = rng.sample(pos, 2)
    fill["I"] = fill["i"].capitalize()
    text = _ARTICLE.sub(r"\1n ", template.format(**fill))
    return text[0].upper() + text[1:], pattern


def generate_sentiment(n: int, seed: int, *, skip: int = 0) -> list[Example]:
    """``n`` distinct SST-2-format examples ``{"text", "label", "pattern"}`` after the first ``skip``
    distinct ones of the seeded stream (labels alternate by a seeded coin, exact by construction)."""
    rng = random.Random(f"sentiment:{seed}")
    seen: set[str] = set()
    out: list[Example] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 200 * (n + skip) + 1000:
            raise ValueError(f"could not draw {n + skip} distinct generated sentences")
        label = int(rng.random() < 0.5)
        text, pattern = _sentiment_sentence(rng, label)
        if text in seen:
            continue
        seen.add(text)
        if len(seen) > skip:
            out.append({"text": text, "label": label, "pattern": pattern})
    return out


# ---- settings and task ---------------------------------------------------------------------------
@dataclass
class ClassificationSettings:
    """Settings of the classification task (``task.settings`` of a run's config)."""

    dataset: str = "sst2"  # cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte
    source: str = "generated"  # "generated" (sst2), a local file/folder, or a hub id (nyu-mll/glue)
    n_train: int = 400  # training examples (seeded subsample; 0 = all)
    n_test: int = 200  # test examples (seeded subsample; 0 = all)
    seed: int | None = None  # data seed; None = the run's seed
    hub_config: str | None = None  # default: the dataset name (nyu-mll/glue's configs)
    split_train: str = "train"
    split_test: str | None = None  # default: GLUE's validation split (MNLI: validation_matched)
    test_source: str | None = None  # a separate test file for a single-file source
    columns: dict[str, str] = field(default_factory=dict)  # {sentence1, sentence2, label} -> column
    label_names: list[str] | None = None  # string labels, in label order (default: GLUE's names)
    max_length: int = 128  # tokens per example (pairs truncated longest-first)
    eval_batch_size: int = 64

    def __post_init__(self) -> None:
        self.dataset = glue_spec(self.dataset).name
        if self.source == "generated" and self.spec.name != "sst2":
            raise ValueError(f"source 'generated' is an SST-2-format set; dataset must be sst2, not {self.dataset!r}")
        if self.source == "generated" and (self.n_train < 1 or self.n_test < 1):
            raise ValueError("generated sentiment needs n_train >= 1 and n_test >= 1")
        if self.n_train < 0 or self.n_test < 0:
            raise ValueError("n_train and n_test must be >= 0")
        if self.max_length < 4 or self.eval_batch_size < 1:
            raise ValueError("max_length must be >= 4 and eval_batch_size >= 1")
        unknown = set(self.columns) - {"sentence1", "sentence2", "label"}
        if unknown:
            raise ValueError(f"unknown column mapping keys {sorted(unknown)}; allowed: sentence1, sentence2, label")
        if self.spec.text_pair is None and "sentence2" in self.columns:
            raise ValueError(f"{self.dataset} is a single-sentence task: no sentence2 column")

    @property
    def spec(self) -> GlueSpec:
        return glue_spec(self.dataset)


def _key(ex: Example) -> tuple[str, str | None]:
    return ex["text"], ex.get("text_pair")


@register
class ClassificationTask:
    """GLUE-style classification (see the module docstring for the full protocol)."""

    name = "classification"
    kind = "seq_cls"
    Settings = ClassificationSettings

    def __init__(self, settings: ClassificationSettings | None = None, seed: int = 0) -> None:
        self.settings = settings or ClassificationSettings()
        self.spec = self.settings.spec
        self.seed = self.settings.seed if self.settings.seed is not None else seed
        self.last_predictions: list[Any] = []

    @property
    def num_labels(self) -> int:
        """The model head size this dataset needs (``model.num_labels``)."""
        return self.spec.num_labels

    # ---- data ---------------------------------------------------------------------------------
    def _label(self, value: Any, origin: str) -> int | float | None:
        """A row's label: float for STS-B, else a class index; None for hidden labels (-1)."""
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        if self.spec.regression:
            return float(value)
        if isinstance(value, bool):
            return int(value)
        if isinstance(value, (int, float)) or (isinstance(value, str) and value.strip().lstrip("-").isdigit()):
            label = int(float(value))
        else:
            names = [n.lower() for n in (self.settings.label_names or self.spec.label_names)]
            if str(value).strip().lower() not in names:
                raise SourceError(f"{origin}: label {value!r} is not an index or one of {names} (set label_names)")
            label = names.index(str(value).strip().lower())
        if label == -1:
            return None
        if not 0 <= label < self.spec.num_labels:
            raise SourceError(f"{origin}: label {label} out of range for {self.spec.name} ({self.spec.num_labels})")
        return label

    def _examples(self, rows: list[dict[str, Any]], origin: str) -> tuple[list[Example], int]:
        spec = self.spec
        cols = {"sentence1": spec.text, "label": "label"}
        if spec.text_pair:
            cols["sentence2"] = spec.text_pair
        cols.update(self.settings.columns)
        if rows:
            missing = [f"{k} -> {v!r}" for k, v in cols.items() if v not in rows[0]]
            if missing:
                raise SourceError(
                    f"{origin}: columns not found: {', '.join(missing)}; the rows have {sorted(rows[0])}. "
                    f"Set the column mapping, e.g. columns: {{sentence1: text, label: sentiment}}"
                )
        rows = rename_columns(rows, cols, origin)
        out, hidden = [], 0
        for row in rows:
            label = self._label(row["label"], origin)
            if label is None:
                hidden += 1
                continue
            ex: Example = {"text": str(row["sentence1"]), "label": label}
            if spec.text_pair:
                ex["text_pair"] = str(row["sentence2"])
            if spec.regression:
                ex["label_bucket"] = f"stsb_{min(int(label), STSB_BUCKETS - 1)}"
            out.append(ex)
        return out, hidden

    def _read(self, source: str, split: str, info: dict[str, Any]) -> list[Example]:
        config = self.settings.hub_config or (self.spec.name if source in GLUE_HUB_IDS else None)
        rows, origin = read_rows(source, split=split, config=config)
        examples, hidden = self._examples(rows, origin)
        info.setdefault("origin", []).append(origin)
        info["hidden_labels_dropped"] = info.get("hidden_labels_dropped", 0) + hidden
        return examples

    def load(self) -> TaskData:
        """Train and test examples, disjoint and deterministic for the settings and seed."""
        s = self.settings
        info: dict[str, Any] = {"dataset": self.spec.name, "source": s.source, "seed": self.seed}
        if s.source == "generated":
            train = generate_sentiment(s.n_train, self.seed)
            test = generate_sentiment(s.n_test, self.seed, skip=s.n_train)
            info["patterns"] = dict(sorted(Counter(ex["pattern"] for ex in test).items()))
        elif is_single_file(s.source) and s.test_source is None:
            rows = self._read(s.source, s.split_train, info)
            if not 0 < s.n_test < len(rows):
                raise ValueError(
                    f"{s.source}: hold-out of n_test={s.n_test} needs 0 < n_test < {len(rows)} rows; "
                    "or set test_source to a separate test file"
                )
            train, test = holdout(rows, s.n_test, f"{self.seed}:holdout", _key)
        else:
            train = self._read(s.source, s.split_train, info)
            test = self._read(s.test_source or s.source, s.split_test or self.spec.test_split, info)
            test = subsample(test, s.n_test, f"{self.seed}:test")
        if s.source != "generated":
            train, info["train_overlap_removed"] = drop_overlap(train, test, _key)
            train = subsample(train, s.n_train, f"{self.seed}:train")
        if not train or not test:
            raise ValueError(f"classification source {s.source!r} gave {len(train)} train and {len(test)} test rows")
        key = "label_bucket" if self.spec.regression else "label"
        info["n_train"], info["n_test"] = len(train), len(test)
        info["train_groups"] = dict(sorted(Counter(str(ex[key]) for ex in train).items()))
        info["test_groups"] = dict(sorted(Counter(str(ex[key]) for ex in test).items()))
        return TaskData(train=train, test=test, group_key=key, info=info)

    # ---- batches ------------------------------------------------------------------------------
    def encode(self, examples: Sequence[Example], tokenizer: Any) -> dict[str, torch.Tensor]:
        """The tokenizer's padded encoding of the texts (pairs when the dataset has them)."""
        texts = [ex["text"] for ex in examples]
        pairs = [ex.get("text_pair", "") for ex in examples] if self.spec.text_pair else None
        enc = tokenizer(
            texts,
            pairs,
            padding=True,
            truncation=True,
            max_length=self.settings.max_length,
            return_tensors="pt",
        )
        return {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}

    def collate(self, examples: list[Example], tokenizer: Any) -> dict[str, torch.Tensor]:
        """``input_ids``, ``attention_mask`` (``token_type_ids``) and ``labels`` (float for STS-B)."""
        if not examples:
            raise ValueError("collate needs at least one example")
        batch = self.encode(examples, tokenizer)
        dtype = torch.float32 if self.spec.regression else torch.long
        batch["labels"] = torch.tensor([ex["label"] for ex in examples], dtype=dtype)
        return batch

    # ---- evaluation ---------------------------------------------------------------------------
    def predict(self, model: Any, tokenizer: Any, examples: Sequence[Example]) -> list[Any]:
        """Argmax class (STS-B: the raw output) of every example, in order."""
        config = getattr(model, "config", None)
        n = getattr(config, "num_labels", None)
        if n is not None and int(n) != self.spec.num_labels:
            raise ValueError(
                f"{self.spec.name} needs a head with {self.spec.num_labels} output(s) but the model has {n}: "
                f"set model.num_labels: {self.spec.num_labels}"
            )
        device = model_device(model)
        lengths = [len(ex["text"]) + len(ex.get("text_pair", "")) for ex in examples]
        order = sorted(range(len(examples)), key=lambda i: (-lengths[i], i))
        preds: list[Any] = [None] * len(examples)
        bs = self.settings.eval_batch_size
        was_training = bool(getattr(model, "training", False))
        model.eval()
        try:
            progress.expect(len(order))
            with torch.no_grad():
                for b in range(0, len(order), bs):
                    rows = order[b : b + bs]
                    enc = self.encode([examples[i] for i in rows], tokenizer)
                    logits = model(**{k: v.to(device) for k, v in enc.items()}).logits.float().cpu()
                    values = logits[:, 0].tolist() if self.spec.regression else logits.argmax(dim=-1).tolist()
                    for i, v in zip(rows, values):
                        preds[i] = v
                    progress.advance(len(rows))
        finally:
            if was_training:
                model.train()
        return preds

    def evaluate(self, model: Any, tokenizer: Any, examples: list[Example]) -> dict[str, float]:
        """The dataset's GLUE metrics over all of ``examples`` and ``n`` (see the module docstring)."""
        if not examples:
            return {**{m: 0.0 for m in self.spec.metrics}, "n": 0}
        preds = self.predict(model, tokenizer, examples)
        gold = [ex["label"] for ex in examples]
        self.last_predictions = preds
        return {**glue_metrics(self.spec, preds, gold), "n": len(examples)}

    def protocol(self) -> dict[str, Any]:
        """How data, batches and evaluation are defined, for the run's records."""
        s = self.settings
        return {
            "task": self.name,
            "kind": self.kind,
            "dataset": self.spec.name,
            "num_labels": self.spec.num_labels,
            "settings": dataclasses.asdict(s),
            "seed": self.seed,
            "data": (
                f"generated SST-2-format sentences (stream seed={self.seed}): train = the first n_train distinct, "
                "test = the next n_test distinct; ~10% negations, ~10% contrasts, exact balanced labels"
                if s.source == "generated"
                else f"train = the source's {s.split_train!r} split, test = its "
                f"{(s.split_test or self.spec.test_split)!r} split (GLUE test labels are hidden), or a seeded "
                "hold-out of a single file; train rows whose text occurs in test removed; seeded subsamples"
            ),
            "input": f"tokenizer encoding of {'the sentence pair' if self.spec.text_pair else 'the sentence'}, "
            f"truncated to max_length={s.max_length} tokens",
            "loss": "MSE on one output (float labels)" if self.spec.regression else "cross-entropy over the labels",
            "prediction": "the single output, unclipped" if self.spec.regression else "argmax of the logits",
            "metrics": {m: _METRIC_DOC[m] for m in self.spec.metrics},
            "split_evaluated": "test (GLUE validation split, or the hold-out)",
            "reported": "metrics of the model as it is at each evaluation; the run's headline is the final round",
        }


_METRIC_DOC = {
    "accuracy": "fraction of correct predictions over the whole test set",
    "f1": "binary F1 of label 1 over the whole test set",
    "matthews": "Matthews correlation (multi-class form; 0 when undefined)",
    "pearson": "Pearson correlation of outputs and gold scores (0 when either is constant)",
    "spearman": "Spearman correlation (average ranks for ties; 0 when either is constant)",
}


__all__ = [
    "GLUE",
    "ClassificationSettings",
    "ClassificationTask",
    "GlueSpec",
    "accuracy",
    "average_ranks",
    "f1_binary",
    "generate_sentiment",
    "glue_metrics",
    "glue_spec",
    "matthews_corrcoef",
    "pearson",
    "spearman",
]
