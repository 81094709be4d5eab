"""LoRABinding wraps a model quietly: no deprecation warning from PEFT's wrap (issue #21)."""

from __future__ import annotations

import warnings

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from fedlora.model.binding import LoRABinding, LoRASettings

DEPRECATED = "is_gradient_checkpointing"


def _tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config)


def test_creating_the_binding_emits_no_future_warning():
    model = _tiny_llama()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        binding = LoRABinding(model, LoRASettings(rank=2, alpha=4.0), "CAUSAL_LM")
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]
    assert len(binding.layers) == 2
    # the filter is narrow and temporary: reading the deprecated name ourselves still warns
    with pytest.warns(FutureWarning, match=DEPRECATED):
        assert model.is_gradient_checkpointing is False
