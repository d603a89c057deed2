"""DVC deps are structural: every project module a stage's command imports lies under one of that stage's deps,
so editing any of them makes `dvc status` list the stage (the slow e2e test checks `dvc status` itself)."""
import json
import subprocess
import sys

import pytest
import yaml

from tests.conftest import ROOT

ENTRY = {  # what each stage's command runs: the CLI plus the stage's module
    "extract_train": ["pipeline.cli", "features.extract", "features.shards"],
    "extract_test": ["pipeline.cli", "features.extract", "features.shards"],
    "train": ["pipeline.cli", "pipeline.stages.train", "pipeline.params"],
    "evaluate": ["pipeline.cli", "pipeline.stages.evaluate", "pipeline.params"],
    "report": ["pipeline.cli", "pipeline.stages.report", "pipeline.params"],
}


@pytest.mark.parametrize("stage", list(ENTRY))
def test_every_module_a_stage_imports_is_one_of_its_deps(stage):
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]
    deps = [d for d in (spec.get("do") or spec)["deps"] if "${" not in d]
    code = ("import json, sys; " + "; ".join(f"import {m}" for m in ENTRY[stage]) +
            "; print(json.dumps([getattr(m, '__file__', None) for m in list(sys.modules.values())]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    ours = sorted({f for f in json.loads(r.stdout)
                   if f and f.startswith((str(ROOT / "features") + "/", str(ROOT / "pipeline") + "/"))})
    assert any("/features/" in f for f in ours)
    for f in ours:
        rel = f[len(str(ROOT)) + 1:]
        assert any(rel == d or rel.startswith(d.rstrip("/") + "/") for d in deps), (stage, rel, deps)
