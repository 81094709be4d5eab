"""The code task: Python code generation for causal LMs, HumanEval/MBPP pass@k in a sandbox.

* :mod:`~fedlora.tasks.code.task`: the task (data, prompts, batches, evaluation protocol);
* :mod:`~fedlora.tasks.code.templates`: the offline generator of instruction/code pairs;
* :mod:`~fedlora.tasks.code.sandbox`: running untrusted code (separate process, limits, namespaces);
* :mod:`~fedlora.tasks.code.forward`: the trusted runner and the plain-value pipe protocol it calls the code through.
"""

from __future__ import annotations

from fedlora.tasks.code.task import (
    CATEGORY_FALLBACKS,
    IGNORE_INDEX,
    STOP_PREFIXES,
    CodeSettings,
    CodeTask,
    build_program,
    extract_completion,
    humaneval_path,
    is_python,
    keyword_category,
    load_eval_problems,
    normalize_code_rows,
    pass_at_k,
    strip_code_fences,
)

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
