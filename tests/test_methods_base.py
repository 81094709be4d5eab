"""The pieces every method's reference test relies on (methods/base.py): aggregation weights, LoRA scale."""

from __future__ import annotations

import pytest

from fedlora.methods.base import LoRASpec
from helpers import build


def test_weights_are_normalised_sample_counts_or_explicit():
    """The weights the reference uses are the ones the methods use."""
    from fedlora.methods.base import aggregation_weights

    state, uploads, _, p = build((13, 7), 2, 5, "samples")
    assert aggregation_weights(uploads) == pytest.approx(p, rel=1e-15)
    assert len(set(u.num_examples for u in uploads)) > 1  # unequal
    assert aggregation_weights(uploads, [1, 3, 0, 0, 4]) == pytest.approx([1 / 8, 3 / 8, 0, 0, 4 / 8])
    with pytest.raises(ValueError):
        aggregation_weights(uploads, [1, 2])
    with pytest.raises(ValueError):
        aggregation_weights(uploads, [0, 0, 0, 0, 0])
    with pytest.raises(ValueError):
        aggregation_weights(uploads, [1, -1, 1, 1, 1])
    with pytest.raises(ValueError):
        aggregation_weights(uploads, [1, float("nan"), 1, 1, 1])


def test_spec_scale():
    assert LoRASpec(4, 8.0).scale() == 2.0
    assert LoRASpec(4, 8.0, True).scale() == 4.0
    assert LoRASpec(4, 8.0).scale(2) == 4.0
