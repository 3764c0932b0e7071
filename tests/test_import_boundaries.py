"""The package boundaries of DESIGN.md, checked on the source (a violation fails here, not on a GPU box)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_roots(package: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    return found


def offenders(package: str, forbidden: tuple[str, ...]) -> dict[str, set[str]]:
    return {name: files for name, files in imported_roots(package).items() if name.split(".")[0] in forbidden}


def test_workers_import_neither_ray_nor_orchestrator():
    assert offenders("workers", ("ray", "orchestrator")) == {}


def test_analysis_reads_parquet_only():
    assert offenders("analysis", ("workers", "orchestrator", "torch", "transformers", "peft", "ray")) == {}


def test_orchestrator_uses_only_the_public_worker_surface():
    public = {"workers.run_cell", "workers.cell", "workers.config", "workers.schema", "workers.rowfile",
              "workers.registry", "workers.methods", "workers.tasks", "workers.models.ladder"}
    used = {name for name in imported_roots("orchestrator") if name.split(".")[0] == "workers"}
    assert used <= public, used - public
