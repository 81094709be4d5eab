"""Greedy completions of the code preset's untuned model for the first N HumanEval problems, as
``CodeTask.generate`` makes them in evaluation (for ``benchmarks/code_sandbox.py --texts``).

    HF_HUB_OFFLINE=1 PYTHONPATH=src python benchmarks/code_generate.py 20 benchmarks/code-untuned-humaneval20.json
"""

from __future__ import annotations

import json
import sys
import time

import torch

from fedlora.model.loading import load_model, load_tokenizer
from fedlora.tasks import build_task

MODEL = "offline:smollm2-135m"  # src/fedlora/configs/code.yaml


def main() -> None:
    n, out = int(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    task = build_task("code", {"n_train": 1, "n_eval": n, "max_new_tokens": 192, "max_length": 256}, seed=0)
    problems = task.load().test
    tokenizer, model = load_tokenizer(MODEL), load_model(MODEL)
    torch.manual_seed(0)
    t0 = time.time()
    texts = task.generate(model, tokenizer, problems)
    record = {"n": n, "seconds": time.time() - t0, "task_ids": [p["task_id"] for p in problems], "texts": texts}
    with open(out, "w", encoding="utf-8") as fh:
        json.dump(record, fh)


if __name__ == "__main__":
    main()
