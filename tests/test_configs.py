"""Every shipped sweep config loads, validates and expands into cells, with nothing downloaded."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.grid import expand
from orchestrator.spec import load_spec

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert any(p.name == "quickstart.yaml" for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_validates_and_expands(path):
    spec = load_spec(path)
    cells = expand(spec)
    assert cells, f"{path.name} expands to no cells"
    assert len({c.cell_id for c in cells}) == len(cells)
