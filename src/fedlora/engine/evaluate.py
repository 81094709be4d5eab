"""Evaluating a saved model on a task's test set (``fedlora eval``).

Three inputs, one procedure:

* a finished run folder (``runs/NAME``): its ``config.yaml`` (``--set`` overrides any key, e.g.
  ``task.settings.n_test=500``) gives the base model, head size, task, task settings and seed;
  the model is the base model + ``final/`` (the PEFT adapter, classifier head included for
  ``seq_cls``) + ``final/backbone_delta.safetensors`` when the method changed the backbone;
  the metrics go to ``runs/NAME/eval.json``;
* an adapter folder (a PEFT ``save_pretrained`` folder, optionally with
  ``backbone_delta.safetensors``) on top of ``--model``;
* a plain model (``--model``: a merged/exported folder, a hub id, ``offline:NAME``) as it is.

The test set is the task's own (:meth:`Task.load` with the given settings and seed, so a run's
evaluation sees exactly the examples the run was evaluated on), and the metrics are the task's
:meth:`Task.evaluate` under ``torch.no_grad()`` in eval mode. Loading follows the runtime: base
weights in ``model.dtype`` on ``model.device``, the backbone delta added to the base weights
in float32 accumulation (:func:`fedlora.model.backbone.apply_backbone_delta`), then the
LoRA/head from the adapter folder via ``PeftModel.from_pretrained`` (unmerged). The result
(``eval.json``) holds the metrics, the task's protocol, what was loaded and the time taken.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fedlora import atomic
from fedlora.engine.config import Config, load_config
from fedlora.engine.setup import device_for
from fedlora.model.adapter_io import CONFIG_NAME, DELTA_NAME, WEIGHTS_NAME, load_deltas
from fedlora.model.binding import quiet_checkpointing_deprecation
from fedlora.progress import Progress, tracking

EVAL_NAME = "eval.json"


def is_adapter_dir(path: str | Path) -> bool:
    p = Path(path)
    return (p / CONFIG_NAME).is_file() and (p / WEIGHTS_NAME).is_file()


def load_model_for_eval(cfg: Config, adapter_dir: str | Path | None = None) -> tuple[Any, Any, dict[str, Any]]:
    """``(model, tokenizer, loaded)``: the base model of ``cfg`` (+ backbone delta + adapter)."""
    from fedlora.model.backbone import apply_backbone_delta
    from fedlora.model.loading import load_model, load_tokenizer
    from fedlora.model.quantization import check_quantization

    device = device_for(cfg.model.device)
    check_quantization(cfg.model.quantization, device, getattr(torch, cfg.model.dtype))
    tokenizer = load_tokenizer(cfg.model.name)
    model = load_model(
        cfg.model.name,
        cfg.model.kind,
        dtype=getattr(torch, cfg.model.dtype),
        num_labels=cfg.model.num_labels,
        device=str(device),
        quantization=cfg.model.quantization,
        attention=cfg.model.attention,
    )
    loaded: dict[str, Any] = {"model": cfg.model.name, "kind": cfg.model.kind, "adapter": None, "backbone_delta": False}
    if cfg.model.quantization != "none":
        loaded["quantization"] = cfg.model.quantization
    if cfg.model.kind == "seq_cls":
        loaded["num_labels"] = cfg.model.num_labels
    if adapter_dir is not None:
        from peft import PeftModel

        adapter_dir = Path(adapter_dir)
        if not is_adapter_dir(adapter_dir):
            raise ValueError(f"{adapter_dir}: not a PEFT adapter folder ({CONFIG_NAME} + {WEIGHTS_NAME})")
        delta_file = adapter_dir / DELTA_NAME
        with quiet_checkpointing_deprecation():  # PEFT reads a name transformers deprecated
            model = PeftModel.from_pretrained(model, str(adapter_dir))
        if delta_file.exists():
            apply_backbone_delta(model, load_deltas(delta_file), mode=cfg.model.backbone_delta)
            loaded["backbone_delta"] = True
        loaded["adapter"] = str(adapter_dir)
    model.eval()
    return model, tokenizer, loaded


def evaluate_config(cfg: Config, adapter_dir: str | Path | None = None) -> dict[str, Any]:
    """Evaluate ``cfg``'s model (+ adapter) on ``cfg``'s task test set; the ``eval.json`` record."""
    from fedlora.tasks import build_task

    t0 = time.perf_counter()
    task = build_task(cfg.task.name, cfg.task.settings, seed=cfg.seed)
    if task.kind != cfg.model.kind:
        raise ValueError(f"task {cfg.task.name!r} needs model.kind {task.kind!r}, not {cfg.model.kind!r}")
    data = task.load()
    model, tokenizer, loaded = load_model_for_eval(cfg, adapter_dir)
    t1 = time.perf_counter()
    with torch.no_grad(), tracking(Progress(desc="evaluating", unit="example")):
        metrics = task.evaluate(model, tokenizer, data.test)
    t2 = time.perf_counter()
    return {
        "metrics": metrics,
        "task": cfg.task.name,
        "settings": dict(cfg.task.settings),
        "seed": cfg.seed,
        "split": "test",
        "n_test": len(data.test),
        **loaded,
        "protocol": task.protocol(),
        "seconds": {"load": t1 - t0, "evaluate": t2 - t1},
    }


def write_eval(result: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``result`` as JSON to ``path`` atomically."""
    return atomic.write_json(path, result)


def evaluate_run(
    run_dir: str | Path, overrides: Mapping[str, str] | None = None, out: str | Path | None = None
) -> dict[str, Any]:
    """Evaluate a finished run's ``final/`` model; writes ``eval.json`` in the run folder (or ``out``)."""
    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise ValueError(f"{run}: not a run folder (no config.yaml)")
    final = run / "final"
    if not is_adapter_dir(final):
        raise ValueError(f"{run}: the run has no final/ adapter (not finished?); `fedlora run --resume {run}` ends it")
    sets = dict(overrides or {})
    sets.setdefault("output_dir", str(run.parent))
    sets.setdefault("name", run.name)
    cfg = load_config(run / "config.yaml", sets)
    result = {"run": str(run), **evaluate_config(cfg, final)}
    result["path"] = str(write_eval(result, out if out is not None else run / EVAL_NAME))
    return result


def evaluate_saved(
    path: str | Path | None,
    *,
    model: str,
    task: str,
    overrides: Mapping[str, str] | None = None,
    out: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate an adapter folder ``path`` on top of ``model`` (or ``model`` itself when ``path`` is
    None) on ``task``; ``overrides`` are config keys (``task.settings.n_test``, ``model.num_labels``,
    ``seed`` ...). ``model.kind`` is the task's; ``model.num_labels`` defaults to the task's head size."""
    from fedlora.tasks import build_task

    sets = dict(overrides or {})
    sets["model.name"], sets["task.name"] = model, task
    probe = load_config(None, sets)
    t = build_task(task, probe.task.settings, seed=probe.seed)
    sets.setdefault("model.kind", t.kind)
    if getattr(t, "num_labels", None) is not None:
        sets.setdefault("model.num_labels", str(t.num_labels))
    cfg = load_config(None, sets)
    if path is not None and not is_adapter_dir(path):
        raise ValueError(
            f"{path}: not a PEFT adapter folder ({CONFIG_NAME} + {WEIGHTS_NAME}); for a merged model pass it "
            "as --model without a positional folder"
        )
    result = evaluate_config(cfg, path)
    if out is not None:
        result["path"] = str(write_eval(result, out))
    return result


__all__ = ["EVAL_NAME", "evaluate_config", "evaluate_run", "evaluate_saved", "is_adapter_dir", "write_eval"]
