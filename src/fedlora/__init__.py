"""fedlora: federated fine-tuning of large language models with LoRA, exactly and fast."""

__version__ = "0.1.0"
