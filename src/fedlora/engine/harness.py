"""Evaluating a run's model with an external harness (``fedlora eval RUN --harness lm-eval``).

One harness today: EleutherAI's lm-evaluation-harness (the ``lm_eval`` package, ``pip install
'fedlora[eval]'``). The model is built in memory exactly as ``fedlora eval`` builds it
(:func:`fedlora.engine.evaluate.load_model_for_eval`: base weights, the backbone delta, the
unmerged PEFT adapter) and handed to lm-eval as an object (``HFLM(pretrained=<model>,
tokenizer=<tokenizer>)``): no merged copy is written to disk.

Everything that can fail cheaply fails before the model loads: lm-eval missing, a model that is
not a causal LM, a run without ``final/``, an ``--include-path`` that does not exist, a task name
lm-eval does not know (with close matches), and a task whose dataset cannot be loaded (hub tasks
need the network or a filled ``HF_DATASETS_CACHE``): the tasks are built, datasets included,
before the model, and that same build is what the evaluation runs on.

The record (``RUN/eval/lm_eval.json``, written atomically) holds lm-eval's per-task metrics
(its own ``metric,filter`` keys, stderr included), group metrics, the harness version, each
task's resolved config, version, n-shot and sample count, the options given (tasks, few-shot,
limit, batch size, include paths) and what was loaded (model, adapter, backbone delta).
"""

from __future__ import annotations

import difflib
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedlora import atomic
from fedlora.engine.config import Config, load_config
from fedlora.engine.evaluate import is_adapter_dir

HARNESSES = ("lm-eval",)
LM_EVAL_NAME = "lm_eval.json"
INSTALL_HINT = "pip install 'fedlora[eval]'"


def lm_eval_version() -> str:
    """The installed lm-eval's version; a ValueError naming the package and the install line when
    it (or the Hugging Face backend it needs) is missing."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM  # noqa: F401  (needs accelerate)
    except ImportError as exc:
        raise ValueError(
            f"--harness lm-eval needs the lm-eval package (lm-evaluation-harness, import lm_eval) and its "
            f"Hugging Face backend: {INSTALL_HINT} (or pip install 'lm-eval[hf]'); import failed: {exc}"
        ) from exc
    return str(lm_eval.__version__)


def parse_tasks(spec: str | Sequence[str] | None) -> list[str]:
    """``"arc_easy,hellaswag"`` (or a list of such strings) -> ``["arc_easy", "hellaswag"]``."""
    items = [spec] if isinstance(spec, str) else list(spec or [])
    names = [n.strip() for item in items for n in item.split(",") if n.strip()]
    if not names:
        raise ValueError("--harness lm-eval needs --tasks T1,T2 (lm-eval task, group or tag names)")
    return list(dict.fromkeys(names))


def _is_yaml(name: str) -> bool:
    return Path(name).suffix in (".yaml", ".yml") and Path(name).is_file()


def task_manager(names: Sequence[str], include_path: Sequence[str | Path] = ()) -> Any:
    """An lm-eval ``TaskManager`` that knows every name in ``names`` (task, group, tag or a YAML
    file), else a ValueError listing the unknown ones with close matches. With ``include_path``
    and every name found there, lm-eval's own ~15k task configs are not indexed (seconds saved)."""
    from lm_eval.tasks import TaskManager

    paths = [Path(p) for p in include_path]
    for p in paths:
        if not p.exists():
            raise ValueError(f"--include-path {p}: no such file or folder")
    if paths:
        custom = TaskManager(include_path=[str(p) for p in paths], include_defaults=False)
        if all(n in custom.all_tasks or _is_yaml(n) for n in names):
            return custom
    manager = TaskManager(include_path=[str(p) for p in paths] or None)
    unknown = [n for n in names if n not in manager.all_tasks and not _is_yaml(n)]
    if unknown:
        hints = []
        for n in unknown:
            close = difflib.get_close_matches(n, manager.all_tasks, n=3)
            hints.append(f"{n!r}" + (f" (close: {', '.join(close)})" if close else ""))
        raise ValueError(
            f"unknown lm-eval task(s): {'; '.join(hints)}; `lm-eval ls tasks` lists them"
            + ("" if paths else ", --include-path DIR adds task YAMLs")
        )
    return manager


class _Prebuilt:
    """A TaskManager whose ``load(names)`` returns the tasks already built (datasets loaded)
    before the model; every other attribute is the manager's."""

    def __init__(self, manager: Any, names: list[str]) -> None:
        self._manager, self._names = manager, names
        try:
            self._loaded = manager.load(list(names))
        except Exception as exc:  # lm-eval and datasets raise many kinds; all mean "cannot build"
            raise ValueError(
                f"lm-eval could not build task(s) {', '.join(names)}: {type(exc).__name__}: {exc} "
                "(hub tasks need the network or their datasets in HF_DATASETS_CACHE; HF_HUB_OFFLINE=1 "
                "allows the cache only)"
            ) from exc

    def load(self, spec: Any) -> Any:
        return self._loaded if spec == self._names else self._manager.load(spec)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._manager, name)


def _jsonable(value: Any) -> Any:
    """lm-eval's results as plain JSON: NaN/inf and unknown objects become strings."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy / torch scalars
        return _jsonable(value.item())
    return str(value)


def evaluate_lm_eval(
    cfg: Config,
    adapter_dir: str | Path | None,
    tasks: Sequence[str],
    *,
    num_fewshot: int | None = None,
    limit: float | None = None,
    batch_size: int | str = 1,
    include_path: Sequence[str | Path] = (),
    manager: Any = None,
) -> dict[str, Any]:
    """Evaluate ``cfg``'s model (+ ``adapter_dir``: backbone delta + LoRA, in memory) on lm-eval
    ``tasks``; the ``lm_eval.json`` record (not written)."""
    from fedlora.engine.evaluate import load_model_for_eval

    version = lm_eval_version()
    names = parse_tasks(tasks)
    if cfg.model.kind != "causal_lm":
        raise ValueError(f"lm-eval scores causal language models; this model is model.kind={cfg.model.kind!r}")
    if num_fewshot is not None and num_fewshot < 0:
        raise ValueError(f"--num-fewshot must be >= 0, got {num_fewshot}")
    if limit is not None and not limit > 0:
        raise ValueError(f"--limit must be > 0 (a count, or a fraction below 1), got {limit}")
    if adapter_dir is not None and not is_adapter_dir(adapter_dir):
        raise ValueError(f"{adapter_dir}: not a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)")
    t0 = time.perf_counter()
    prebuilt = _Prebuilt(manager if manager is not None else task_manager(names, include_path), names)
    t1 = time.perf_counter()

    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    model, tokenizer, loaded = load_model_for_eval(cfg, adapter_dir)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size)
    t2 = time.perf_counter()
    with torch.no_grad():
        out = simple_evaluate(
            model=lm,
            tasks=names,
            num_fewshot=num_fewshot,
            limit=limit,
            batch_size=batch_size,
            task_manager=prebuilt,
            log_samples=False,
        )
    t3 = time.perf_counter()
    if out is None:  # only on a non-zero rank of a distributed launch
        raise ValueError("lm-eval returned no results (not rank 0?)")
    run_config = out.get("config", {})
    return _jsonable(
        {
            "harness": "lm-eval",
            "harness_version": version,
            "tasks": names,
            "results": out.get("results", {}),
            "groups": out.get("groups", {}),
            "group_subtasks": out.get("group_subtasks", {}),
            "n_shot": out.get("n-shot", {}),
            "n_samples": out.get("n-samples", {}),
            "versions": out.get("versions", {}),
            "higher_is_better": out.get("higher_is_better", {}),
            "configs": out.get("configs", {}),
            "options": {
                "num_fewshot": num_fewshot,
                "limit": limit,
                "batch_size": batch_size,
                "include_path": [str(p) for p in include_path],
                "seeds": {k: run_config.get(k) for k in ("random_seed", "numpy_seed", "torch_seed", "fewshot_seed")},
            },
            **loaded,
            "dtype": cfg.model.dtype,
            "device": str(lm.device),
            "seconds": {"tasks": t1 - t0, "load": t2 - t1, "evaluate": t3 - t2},
        }
    )


def run_config(run_dir: str | Path, overrides: Mapping[str, str] | None = None) -> Config:
    """The config of a run folder (``--set`` overrides applied), like ``fedlora eval RUN``."""
    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise ValueError(f"{run}: not a run folder (no config.yaml)")
    sets = dict(overrides or {})
    sets.setdefault("output_dir", str(run.parent))
    sets.setdefault("name", run.name)
    return load_config(run / "config.yaml", sets)


def lm_eval_run(
    run_dir: str | Path,
    tasks: Sequence[str],
    *,
    adapter: str | Path | None = None,
    overrides: Mapping[str, str] | None = None,
    out: str | Path | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Evaluate a finished run's final model (or ``adapter``) with lm-eval; writes
    ``RUN/eval/lm_eval.json`` (or ``out``) and returns the record (``path`` added)."""
    run = Path(run_dir)
    lm_eval_version()
    parse_tasks(tasks)
    cfg = run_config(run, overrides)
    adapter_dir = Path(adapter) if adapter is not None else run / "final"
    if not is_adapter_dir(adapter_dir):
        if adapter is None:
            raise ValueError(
                f"{run}: the run has no final/ adapter (not finished?); `fedlora run --resume {run}` ends it, "
                "--adapter DIR picks another adapter folder"
            )
        raise ValueError(f"--adapter {adapter_dir}: not a PEFT adapter folder")
    result = {"run": str(run), **evaluate_lm_eval(cfg, adapter_dir, tasks, **options)}
    target = Path(out) if out is not None else run / "eval" / LM_EVAL_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    result["path"] = str(target)
    atomic.write_json(target, result)
    return result


def result_table(result: Mapping[str, Any]) -> str:
    """One line per (task, metric): value, stderr, n-shot and samples, groups last."""
    rows = [("task", "metric", "filter", "n-shot", "n", "value", "stderr")]
    for section in ("results", "groups"):
        for task, metrics in result.get(section, {}).items():
            if section == "results" and task in result.get("groups", {}):
                continue
            shot = result.get("n_shot", {}).get(task, "")
            n = result.get("n_samples", {}).get(task, {}).get("effective", "")
            for key, value in metrics.items():
                if key == "alias" or "_stderr," in key or key == "samples":
                    continue
                metric, _, filt = key.partition(",")
                err = metrics.get(f"{metric}_stderr,{filt}", "")
                fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
                rows.append(
                    (metrics.get("alias", task).strip(" -"), metric, filt, str(shot), str(n), fmt(value), fmt(err))
                )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows
    )


__all__ = [
    "HARNESSES",
    "LM_EVAL_NAME",
    "evaluate_lm_eval",
    "lm_eval_run",
    "lm_eval_version",
    "parse_tasks",
    "result_table",
    "run_config",
    "task_manager",
]
