"""Head training speed across data regimes, side by side in one run, each against scikit-learn's
LogisticRegression(max_iter=1000) on the same features and the same 5 folds:

  regimes   fer-hard  35,887 rows, 7 classes with FER-2013 priors, overlapping (~65% accuracy)
            easy      35,887 rows, 7 classes, well separated (class means 0.08 x N(0,1) apart, unit noise), float16
            many      100 classes x 100 images (10,000 rows)
  dims      1280 (one backbone) and 2560 (two fused)

  ours      = `imgsent train-head` in a fresh process: 5-fold CV + temperature calibration + final fit, process
              start and store read included (the time a user waits); with params.yaml's head ([256], Adam) and
              with `hidden: []` (the linear head, full-batch L-BFGS)
  LR proc   = the same for StandardScaler + LogisticRegression: a fresh process that imports scikit-learn, reads
              the store, runs 5-fold CV on the same folds and a final fit (no calibration: flattering to LR)
  LR CV     = the 5 CV fits alone, timed inside that process (no start-up, no read, no final fit)
  paired    = ours ([]) vs LR on the same out-of-fold images: right where LR is wrong / wrong where LR is right,
              McNemar's exact p, and the 95% paired-bootstrap interval of (our - LR) macro-F1 over the pooled
              out-of-fold predictions (1,000 resamples): an interval holding 0 is a tie the data cannot break

    python benchmarks/head_speed.py [--regimes easy fer-hard many] [--dims 1280 2560] [--seeds 0 1 2] [--linear-only]
    python benchmarks/head_speed.py --baseline /tmp/before    # an older checkout's heads vs this one's, and auto
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.preprocessing import StandardScaler

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHELL_ENV = dict(os.environ)  # what each measured process starts with: not the defaults features/__init__.py sets
# in this process on import (they would reach a baseline tree's runs)
from features.storage.write import StoreContent, write_store  # noqa: E402
from tests.synthetic import synthetic_store  # noqa: E402
from pipeline.data.folds import assign_folds  # noqa: E402
from pipeline.data.rows import open_rows  # noqa: E402


def fer_hard_store(path: Path, dim: int, seed: int = 0) -> None:
    """Class means on a random 32-dim subspace + isotropic noise, post-ReLU-like: about as hard as FER-2013."""
    rng = np.random.default_rng(seed)
    n, c = 35_887, 7
    prior = np.array([4953, 547, 5121, 8989, 6077, 4002, 6198], float)  # FER-2013 class counts
    y = rng.choice(c, size=n, p=prior / prior.sum())
    basis = rng.normal(size=(32, dim)) / np.sqrt(32)
    means = rng.normal(size=(c, 32)) * 0.35

    def blocks():
        for i in range(0, n, 8192):
            j = slice(i, min(n, i + 8192))
            x = (means[y[j]] + rng.normal(size=(j.stop - i, 32))) @ basis + rng.normal(size=(j.stop - i, dim)) * 0.5
            yield np.maximum(x + 0.3, 0).astype(np.float32)

    fp = {"backbone": "synthetic", "weights_sha256": "0" * 64, "preprocess": {}, "dim": dim}
    write_store(path, StoreContent(dtype="float32", labels=y, paths=[f"img/{i:06d}.png" for i in range(n)],
                                   sha256=[f"{seed:08x}{i:056x}" for i in range(n)], groups=None,
                                   class_names=[f"c{i}" for i in range(c)], fingerprint=fp),
                blocks=blocks(), dim=dim)


def make(regime: str, dim: int, work: Path, seed: int) -> Path:
    path = work / (f"{regime}_{dim}.h5" if seed == 0 else f"{regime}_{dim}_s{seed}.h5")
    if not path.exists():
        if regime == "fer-hard":
            fer_hard_store(path, dim, seed)
        elif regime == "easy":
            synthetic_store(path, n=35_887, dim=dim, classes=7, separation=0.08, dtype="float16", random_state=seed)
        else:
            synthetic_store(path, n=10_000, dim=dim, classes=100, separation=0.15, random_state=seed)
    return path


def logistic_regression(store: Path, folds: int, seed: int, pred_out: Path) -> None:
    """Runs in the fresh process of `--lr STORE`: prints 'cv_seconds macro_f1' (then fits on every row); the
    out-of-fold predictions (N,) go to pred_out (.npy) after the timed part."""
    rows = open_rows([str(store)])
    x, y = rows.features, rows.labels
    fold = assign_folds(labels=y, groups=None, sha256=rows.sha256, k=folds, class_names=rows.class_names,
                        random_state=seed)
    t = time.time()
    f1s, pred = [], np.zeros(len(y), np.int64)
    for k in range(folds):
        tr, te = fold != k, fold == k
        sc = StandardScaler().fit(x[tr])
        lr = LogisticRegression(max_iter=1000).fit(sc.transform(x[tr]), y[tr])
        pred[te] = lr.predict(sc.transform(x[te]))
        f1s.append(f1_score(y[te], pred[te], average="macro"))
    cv = time.time() - t
    LogisticRegression(max_iter=1000).fit(StandardScaler().fit_transform(x), y)  # the model a user would keep
    print(cv, float(np.mean(f1s)))
    np.save(pred_out, pred)


def lr_process(store: Path, pred_out: Path) -> tuple[float, float, float]:
    t = time.time()
    out = subprocess.run([sys.executable, __file__, "--lr", str(store), "--pred-out", str(pred_out)], check=True,
                         capture_output=True, text=True)
    wall = time.time() - t
    cv, f1 = (float(v) for v in out.stdout.split())
    return wall, cv, f1


def macro_f1(y: np.ndarray, pred: np.ndarray, c: int) -> float:
    cm = np.bincount(y * c + pred, minlength=c * c).reshape(c, c)
    tp, support, predicted = np.diag(cm), cm.sum(1), cm.sum(0)
    f1 = np.divide(2 * tp, support + predicted, out=np.zeros(c), where=support + predicted > 0)
    return float(f1.mean())


def paired(y: np.ndarray, ours: np.ndarray, lr: np.ndarray, seed: int = 0) -> str:
    """'b/c p=.. [lo, hi]': images only ours / only LR got right, McNemar's exact p, and the 95% bootstrap
    interval of our macro-F1 minus LR's on the pooled out-of-fold predictions."""
    from scipy.stats import binomtest
    b, c = int(((ours == y) & (lr != y)).sum()), int(((ours != y) & (lr == y)).sum())
    p = binomtest(min(b, c), b + c).pvalue if b + c else 1.0
    rng, k = np.random.default_rng(seed), int(y.max()) + 1
    diffs = []
    for _ in range(1000):
        i = rng.integers(0, len(y), len(y))
        diffs.append(macro_f1(y[i], ours[i], k) - macro_f1(y[i], lr[i], k))
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return f"{b}/{c} p={p:.2f} [{lo:+.4f}, {hi:+.4f}]"


def ours(store: Path, params: Path, out: Path, tree: Path = ROOT) -> tuple[float, float]:
    """(wall seconds, CV macro-F1) of a fresh `imgsent train-head` process of the code in `tree`."""
    t = time.time()
    subprocess.run([sys.executable, "-c", "from pipeline.cli import main; main()", "train-head", str(store),
                    "--out", str(out), "--params", str(params)], check=True, stdout=subprocess.DEVNULL,
                   env={**SHELL_ENV, "PYTHONPATH": str(tree)}, cwd=tree)
    return time.time() - t, json.loads((out / "metrics.json").read_text())["cv"]["macro_f1_mean"]


def cells(args, work: Path):
    """(regime, dim, seed, store) for every cell of the matrix, each store made once."""
    for regime in args.regimes:
        for dim in args.dims:
            for seed in args.seeds:
                yield regime, dim, seed, make(regime, dim, work, seed)


def against_baseline(args, work: Path) -> None:
    """--baseline DIR: the [256] and [] heads of an older checkout and of this one, and this one's `auto`, on the
    same stores, side by side (no scikit-learn columns)."""
    base = Path(args.baseline).resolve()
    print(f"{os.cpu_count()} CPUs; 5-fold CV; wall seconds of fresh processes; before = {base}")
    print(f"{'regime':9s} {'dim':>5s} {'seed':>4s} {'[256] before':>12s} {'after':>6s} {'ratio':>6s} {'[] before':>9s} "
          f"{'after':>6s} {'ratio':>6s} {'auto':>6s} {'F1 [256] before':>15s} {'after':>6s} {'F1 [] before':>12s} "
          f"{'after':>6s} {'F1 auto':>7s}")
    for regime, dim, seed, store in cells(args, work):
        runs = [ours(store, work / cfg, work / f"{name}_{regime}_{dim}", tree)
                for cfg, name, tree in (("mlp.yaml", "mlp_before", base), ("mlp.yaml", "mlp", ROOT),
                                        ("linear.yaml", "linear_before", base), ("linear.yaml", "linear", ROOT),
                                        ("auto.yaml", "auto", ROOT))]
        (a, fa), (b, fb), (c, fc), (d, fd), (e, fe) = runs
        print(f"{regime:9s} {dim:5d} {seed:4d} {a:12.1f} {b:6.1f} {b / a:5.2f}x {c:9.1f} {d:6.1f} {d / c:5.2f}x "
              f"{e:6.1f} {fa:15.4f} {fb:6.4f} {fc:12.4f} {fd:6.4f} {fe:7.4f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--regimes", nargs="+", default=["easy", "fer-hard", "many"])
    ap.add_argument("--dims", nargs="+", type=int, default=[1280, 2560])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0], help="data seeds: each draws another store")
    ap.add_argument("--linear-only", action="store_true", help="skip the [256] head (its column shows -)")
    ap.add_argument("--baseline", help="an older checkout: time its heads against this one's (no LR columns)")
    ap.add_argument("--lr", help=argparse.SUPPRESS)  # internal: the LR process
    ap.add_argument("--pred-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.lr:
        return logistic_regression(Path(args.lr), 5, 0, Path(args.pred_out))
    work = ROOT / "out" / "bench" / "head_speed"
    work.mkdir(parents=True, exist_ok=True)
    text = (ROOT / "params.yaml").read_text().replace("folds: 3 ", "folds: 5 ")
    assert "hidden: auto " in text, "params.yaml's head is expected to be hidden: auto"
    (work / "auto.yaml").write_text(text)
    (work / "mlp.yaml").write_text(text.replace("hidden: auto ", "hidden: [256] "))
    (work / "linear.yaml").write_text(text.replace("hidden: auto ", "hidden: [] "))
    if args.baseline:
        return against_baseline(args, work)
    print(f"{os.cpu_count()} CPUs; 5-fold CV; times in seconds, wall, each process started fresh")
    print(f"{'regime':9s} {'dim':>5s} {'seed':>4s} {'[256]':>6s} {'[]':>6s} {'LR proc':>8s} {'LR CV':>6s} "
          f"{'LRproc/[]':>9s} {'LRCV/[]':>8s} {'F1 [256]':>8s} {'F1 []':>7s} {'F1 LR':>7s}  paired [] vs LR")
    for regime, dim, seed, store in cells(args, work):
        t_mlp, f1_mlp = (float("nan"),) * 2 if args.linear_only else \
            ours(store, work / "mlp.yaml", work / f"model_{regime}_{dim}")
        t_lin, f1_lin = ours(store, work / "linear.yaml", work / f"linear_{regime}_{dim}")
        t_lr, t_cv, f1_lr = lr_process(store, work / "lr_pred.npy")
        y = open_rows([str(store)]).labels
        ours_pred = np.load(work / f"linear_{regime}_{dim}" / "oof_logits.npy").argmax(1)
        print(f"{regime:9s} {dim:5d} {seed:4d} {t_mlp:6.1f} {t_lin:6.1f} {t_lr:8.1f} {t_cv:6.1f} "
              f"{t_lr / t_lin:8.1f}x {t_cv / t_lin:7.1f}x {f1_mlp:8.3f} {f1_lin:7.4f} {f1_lr:7.4f}  "
              f"{paired(y, ours_pred, np.load(work / 'lr_pred.npy'))}", flush=True)


if __name__ == "__main__":
    main()
