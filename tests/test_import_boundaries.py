"""The package boundaries of DESIGN.md, checked on the source (a violation fails here, not on a GPU box)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
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


def modules_loaded_by(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running `code` (from the repository root)."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_planning_a_sweep_loads_neither_transformers_models_nor_peft():
    """The driver plans from config types; transformers' modeling code and peft cost seconds to import."""
    loaded = modules_loaded_by(
        "import contextlib, io\nfrom orchestrator.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n    assert main(['plan', 'configs/quickstart.yaml']) == 0"
    )
    assert "orchestrator.grid" in loaded and "workers.methods.lora" in loaded  # it did plan, with every method
    heavy = {"peft", "transformers.modeling_utils", "transformers.models.llama.modeling_llama"}
    assert loaded.isdisjoint(heavy), loaded & heavy


def test_status_loads_no_torch(tmp_path):
    """`status` of a results directory holding rows, a failed one among them: its table and its failures' errors,
    read without torch, nor the fitter's scipy and the report's matplotlib (≈2 s of imports a `status` paid)."""
    from datetime import datetime, timezone

    from orchestrator.store import ResultsStore
    from workers.schema import SCHEMA_VERSION

    now, store = datetime.now(timezone.utc), ResultsStore(str(tmp_path))
    common = {"schema_version": SCHEMA_VERSION, "sweep": "s", "model": "ladder:xs", "method": "lora", "started_at": now, "finished_at": now}
    store.write({**common, "cell_id": "a", "slug": "a", "status": "ok", "score": 0.5})
    store.write({**common, "cell_id": "b", "slug": "b", "status": "failed", "error": "ValueError: the loss went NaN"})
    loaded = modules_loaded_by(f"from orchestrator.cli import main\nassert main(['status', {str(tmp_path)!r}]) == 0")
    assert "orchestrator.store" in loaded and loaded.isdisjoint({"torch", "scipy", "matplotlib"}), loaded & {"torch", "scipy", "matplotlib"}


def test_every_method_declares_the_side_the_analysis_puts_it_on():
    """The analysis (no workers import) sorts methods into steering / fine-tuning / reference by name;
    a new steering method whose name says otherwise would silently pair as fine-tuning in every D*."""
    from analysis.methods import method_kind
    from workers.methods import METHODS, get_method

    names = [*METHODS.names(), "steer_mean+lora", "lora+steer_trained"]
    assert {name: get_method(name).kind for name in names} == {name: method_kind(name) for name in names}
