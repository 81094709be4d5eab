"""fedlora.trees: the one tree serializer (checkpoints, the Flower nodes' client records)."""

from __future__ import annotations

import json

import pytest
import torch

from fedlora import trees


def _round_trip(obj):
    tensors: dict = {}
    skeleton = json.loads(json.dumps(trees.pack(obj, tensors)))  # through JSON, as on disk
    return trees.unpack(skeleton, {k: v.clone() for k, v in tensors.items()})


def test_a_tree_comes_back_exactly_key_types_tuples_and_dtypes_included():
    obj = {
        "round": 3,
        "none": None,
        "f": 0.25,
        "factors": {"m/q": {"A": torch.randn(2, 3), "B": torch.zeros(4, 2, dtype=torch.bfloat16)}},
        "state": {0: {"step": torch.tensor(5.0), "exp_avg": torch.ones(3)}, 7: {}},
        "betas": (0.9, 0.999),
        "ledger": [[torch.arange(3)], []],
    }
    back = _round_trip(obj)
    assert list(back["state"]) == [0, 7] and isinstance(back["betas"], tuple)
    assert back["factors"]["m/q"]["B"].dtype == torch.bfloat16
    assert torch.equal(back["factors"]["m/q"]["A"], obj["factors"]["m/q"]["A"])
    assert torch.equal(back["ledger"][0][0], torch.arange(3)) and back["ledger"][1] == []
    assert {k: v for k, v in back.items() if k not in ("factors", "state", "ledger")} == {
        k: v for k, v in obj.items() if k not in ("factors", "state", "ledger")
    }


def test_keys_never_collide_whatever_the_dict_keys_hold():
    tensors: dict = {}
    trees.pack({"a/b": torch.ones(1), "a": {"b": torch.zeros(1)}, "a.0": torch.full((1,), 2.0)}, tensors)
    assert len(tensors) == 3


def test_what_cannot_be_stored_is_refused_by_path():
    with pytest.raises(TypeError, match="cannot store a set"):
        trees.pack({"x": {1, 2}}, {})
    with pytest.raises(TypeError, match="dict keys must be str or int"):
        trees.pack({(1, 2): 0}, {})


def test_the_formats_written_before_are_still_read():
    t = {"s.0.1": torch.ones(2)}
    old_checkpoint = {"__dict__": [["round", 2], ["x", {"__tensor__": "s.0.1"}], ["l", {"__list__": [1, 2]}]]}
    back = trees.unpack(old_checkpoint, t)
    assert back["round"] == 2 and back["l"] == [1, 2] and torch.equal(back["x"], torch.ones(2))
    leaf = {"__tensor__": "s.0.1", "dtype": "float64"}
    old_record = {"__dict__": {"cursor": 4, "opt": {"__items__": [[0, [1, leaf]]]}}}
    back = trees.unpack(old_record, t)
    assert back["cursor"] == 4 and back["opt"][0][1].dtype == torch.float64
