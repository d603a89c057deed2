"""Stage two as a user runs it: `imgsent train-head` with the DEFAULT params.yaml (hidden: auto, adapt: auto,
cv.repeats) at 5 folds, and with one head forced, beside scikit-learn LogisticRegression's 5-fold CV on the same
features, in one run; each a fresh process, wall clock with start-up. Prints each run's time by phase.

    stores  fer-like  35,887 x 1280, 7 classes, float16 (head_speed.py's 'easy' regime)
            many      10,000 x 1280, 100 classes of 100 images (head_speed.py's 'many')
            1k        1,000 x 1280, 3 classes (synthetic_store, separation 0.1)
            --store PATH ...: your own stores as well (e.g. emoji styles with a group column)
    configs default   params.yaml, cv.folds 5
            []        the same with hidden: [] ; [256]: with hidden: [256]
    LR      StandardScaler + LogisticRegression(max_iter=1000), 5 folds (head_speed.py), its CV time alone
    phases  read, CV per head (its folds' fits and held-out sources adapted; every head's fold tasks share the
            cores, selection/foldwork.py, so a head's figure is the wall time its results were waited for), stress
            batches, repeats (reseeded CV), final fit, calibration, out-of-distribution reference; 'other' = the
            rest (start-up, writing)

    python benchmarks/stage_two.py [--stores fer-like many 1k] [--store PATH ...] [--baseline DIR]
    --baseline DIR: an older checkout's default train-head on the same stores, its wall time beside this one's
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHELL_ENV = dict(os.environ)  # what each measured process starts with: the environment this script was given, not
# the defaults features/__init__.py sets in this process once it is imported (they would reach a baseline's runs)
# The measured process (--run) imports only what `imgsent train-head` does: head_speed's scikit-learn (0.9 s) is
# imported by the parent alone (until 2026-12-07 it was imported by both, and every figure here held its 0.9 s).

CONFIGS = {"default": "", "[]": "hidden: [] ", "[256]": "hidden: [256] "}


def run_train(store: str, out: str, params: str) -> None:
    """In the fresh process of `--run`: train-head through the Python API, then one JSON line of its figures."""
    import atexit
    import gc
    atexit.register(gc.freeze)  # as `imgsent` does (pipeline/cli.main): the exit's last collection skipped
    t0 = time.time()
    from pipeline.params import load_params
    from pipeline.stages.train import train_head
    m = train_head(stores=[store], out=out, params=load_params(params), progress=lambda line: None)
    print(json.dumps({"phases": m["phase_seconds"], "in_process": time.time() - t0, "f1": m["cv"]["macro_f1_mean"],
                      "head": m["head_choice"]["chosen"], "transform": m["adaptation"]["transform"],
                      "repeats": len(m["cv"]["repeats"]), "why_head": m["head_choice"]["why"]}))


def ours(store: Path, params: Path, out: Path, tree: Path = ROOT) -> dict:
    """A fresh process of the code in `tree`: its wall time with start-up, and what run_train printed (an older
    tree without this script: only the wall time and the score)."""
    t = time.time()
    script = Path(tree) / "benchmarks" / "stage_two.py"  # an older tree with this script reports its phases too
    if tree == ROOT or script.exists():
        res = subprocess.run([sys.executable, str(script), "--run", str(store), str(out), str(params)], check=True,
                             capture_output=True, text=True, env={**SHELL_ENV, "PYTHONPATH": str(tree)}, cwd=tree)
        fig = json.loads(res.stdout.strip().splitlines()[-1])
    else:
        subprocess.run([sys.executable, "-c", "from pipeline.cli import main; main()", "train-head", str(store),
                        "--out", str(out), "--params", str(params)], check=True, stdout=subprocess.DEVNULL,
                       env={**SHELL_ENV, "PYTHONPATH": str(tree)}, cwd=tree)
        fig = {"f1": json.loads((out / "metrics.json").read_text())["cv"]["macro_f1_mean"]}
    return fig | {"wall": time.time() - t}


def stores(args, work: Path) -> dict[str, Path]:
    from benchmarks.head_speed import make
    from tests.synthetic import synthetic_store
    out = {}
    for name in args.stores:
        if name == "fer-like":
            out[name] = make("easy", 1280, work, 0)
        elif name == "many":
            out[name] = make("many", 1280, work, 0)
        else:
            path = work / "1k_1280.h5"
            if not path.exists():
                synthetic_store(path, n=1000, dim=1280, classes=3, separation=0.1, random_state=0)
            out[name] = path
    return out | {Path(p).stem: Path(p).resolve() for p in args.store}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stores", nargs="+", default=["fer-like", "many", "1k"], choices=["fer-like", "many", "1k"])
    ap.add_argument("--store", nargs="*", default=[], help="more stores of your own")
    ap.add_argument("--baseline", help="an older checkout: its default train-head's wall time beside this one's")
    ap.add_argument("--run", nargs=3, help=argparse.SUPPRESS)  # internal: STORE OUT PARAMS in a fresh process
    args = ap.parse_args()
    if args.run:
        return run_train(*args.run)
    from benchmarks.head_speed import lr_process
    work = ROOT / "out" / "bench" / "stage_two"
    work.mkdir(parents=True, exist_ok=True)
    text = (ROOT / "params.yaml").read_text().replace("folds: 3 ", "folds: 5 ")
    assert "hidden: auto " in text, "params.yaml's head is expected to be hidden: auto"
    for name, extra in CONFIGS.items():
        (work / f"{name}.yaml").write_text(text.replace("hidden: auto ", extra) if extra else text)
    if args.baseline:  # the older checkout's own params.yaml (its keys may differ), at 5 folds as well
        (work / "default_before.yaml").write_text(
            (Path(args.baseline) / "params.yaml").read_text().replace("folds: 3 ", "folds: 5 "))
    print(f"{os.cpu_count()} CPUs; 5-fold CV; wall seconds of fresh processes, start-up included")
    for sname, store in stores(args, work).items():
        lr_wall, lr_cv, lr_f1 = lr_process(store, work / "lr_pred.npy")
        print(f"\n{sname}: LogisticRegression 5-fold CV {lr_cv:.1f} s (process {lr_wall:.1f} s), macro-F1 {lr_f1:.4f}")
        if args.baseline:
            base = ours(store, work / "default_before.yaml", work / "model_before", Path(args.baseline).resolve())
            print(f"  default before ({args.baseline}): {base['wall']:.1f} s, macro-F1 {base['f1']:.4f}")
            if "phases" in base:
                print("           " + ", ".join(f"{k} {v:.1f}" for k, v in base["phases"].items() if v >= 0.05))
        for cname in CONFIGS:
            fig = ours(store, work / f"{cname}.yaml", work / f"model_{sname}")
            phases = fig["phases"]
            other = fig["wall"] - sum(phases.values())
            print(f"  {cname:8s} {fig['wall']:6.1f} s  LR CV / this {lr_cv / fig['wall']:4.2f}x  macro-F1 "
                  f"{fig['f1']:.4f}  head {json.dumps(fig['head'])}, {fig['transform']}, {fig['repeats']} CV run(s)")
            print("           " + ", ".join(f"{k} {v:.1f}" for k, v in phases.items() if v >= 0.05) +
                  f", other {other:.1f}", flush=True)


if __name__ == "__main__":
    main()
