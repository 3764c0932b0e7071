"""Shared fixtures: a private model cache with the tiny `test` ladder, and a sweep YAML writer."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ladder_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model cache for the session (or $STEERSCALE_TEST_CACHE to reuse one across runs)."""
    root = Path(os.environ.get("STEERSCALE_TEST_CACHE") or tmp_path_factory.mktemp("cache"))
    os.environ["STEERSCALE_CACHE"] = str(root)  # inherited by Ray workers the tests start
    return root


@pytest.fixture(scope="session")
def test_ladder(ladder_cache: Path) -> list[str]:
    """Model ids of the tiny `test` ladder, built once per session."""
    from workers.models import ladder

    for size in ladder.sizes("test"):
        ladder.ensure_built(size, "test", progress=False)
    return [f"ladder:test/{size}" for size in ladder.sizes("test")]


@pytest.fixture(scope="session")
def default_ladder() -> list[str]:
    """Sizes of the default ladder, built (if missing) by `steerscale ladder build` as `make demo` builds it:
    rungs side by side in their own processes, minutes instead of the sum of their build times."""
    subprocess.run([sys.executable, "-m", "orchestrator.cli", "ladder", "build"], cwd=ROOT, check=True)
    from workers.models import ladder

    return ladder.sizes("default")


@pytest.fixture
def write_sweep(tmp_path: Path):
    """Write a sweep YAML under tmp_path and return its path (results go under tmp_path too)."""

    def write(data: dict, name: str = "sweep.yaml") -> Path:
        data = {"results_dir": str(tmp_path / "results" / data["sweep"]), **data}
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return write
