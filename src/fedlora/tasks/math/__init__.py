"""The math task: GSM8K-style word problems for causal LMs, completion-only training, greedy exact match.

* :mod:`~fedlora.tasks.math.task`: the task (data split, prompts, batches, evaluation protocol);
* :mod:`~fedlora.tasks.math.generator`: the offline generator of GSM8K-style problems;
* :mod:`~fedlora.tasks.math.numbers`: final-number extraction and comparison;
* :mod:`~fedlora.tasks.math.gsm8k`: GSM8K / MetaMathQA rows (local files or the hub) as examples.
"""

from __future__ import annotations

from fedlora.tasks.math.task import (
    IGNORE_INDEX,
    TEST_START,
    MathSettings,
    MathTask,
    extract_final_number,
    numbers_equal,
)

__all__ = [
    "IGNORE_INDEX",
    "TEST_START",
    "MathSettings",
    "MathTask",
    "extract_final_number",
    "numbers_equal",
]
