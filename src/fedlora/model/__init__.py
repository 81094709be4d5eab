"""Model binding: PEFT adapter folders and backbone deltas on disk (safetensors), and later
transformers + PEFT models in memory."""

from fedlora.model.adapter_io import (
    Adapter,
    AdapterError,
    load_deltas,
    read_adapter,
    save_deltas,
    write_adapter,
)

__all__ = ["Adapter", "AdapterError", "load_deltas", "read_adapter", "save_deltas", "write_adapter"]
