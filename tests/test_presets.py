"""Every shipped run preset validates, fits its task to its model and partitions its data."""

from __future__ import annotations

from importlib import resources

import pytest

from fedlora.configs import preset_path
from fedlora.engine.config import load_config
from fedlora.engine.setup import prepare_data

RUN_PRESETS = sorted(
    p.name[:-5]
    for p in (resources.files("fedlora") / "configs").iterdir()
    if p.name.endswith(".yaml") and not p.name.startswith("study_")
)


def test_the_documented_presets_ship():
    assert {"default", "ci", "glue_minilm", "commonsense", "code", "instruction"} <= set(RUN_PRESETS)


@pytest.mark.parametrize("name", RUN_PRESETS)
def test_preset_loads_and_its_data_partitions(name, tmp_path):
    cfg = load_config(preset_path(name), {"output_dir": str(tmp_path)})
    assert cfg.name == name
    data = prepare_data(cfg)  # builds the task, checks it fits the model, loads and partitions
    assert len(data.parts) >= 1 and all(data.parts)
    assert sorted(i for part in data.parts for i in part) == list(range(len(data.train)))
    assert data.test
