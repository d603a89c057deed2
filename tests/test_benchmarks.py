"""The benchmark scripts still import against the code they measure: a name one of them takes from features/ or
pipeline/ that a change renamed or removed fails here, not months later in front of whoever re-runs the figure
(benchmarks/loso_class_mix.py read adapt.class_mix for four days after it was gone)."""
import subprocess
import sys

from tests.conftest import ROOT

# Each script imported as a module (its main() not run), in a fresh process: some set threads or sys.path on import.
IMPORT_ALL = """
import importlib.util, pathlib, sys
failed = []
for p in sorted(pathlib.Path("benchmarks").glob("*.py")):
    spec = importlib.util.spec_from_file_location(f"benchmark_{p.stem}", p)
    try:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    except Exception as e:  # noqa: BLE001 - every failure is reported, with its script
        failed.append(f"{p.name}: {type(e).__name__}: {e}")
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_every_benchmark_script_imports():
    scripts = sorted((ROOT / "benchmarks").glob("*.py"))
    assert len(scripts) >= 20
    res = subprocess.run([sys.executable, "-c", IMPORT_ALL], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr[-2000:]
