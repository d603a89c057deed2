"""Planted label errors: move 5 images of one class into another class (seeded picks, any style) of the shared
emoji, run extract + train-head (the default fused backbones and head), and count how many of the 5 the label
issue list puts in its top 10 with their true class suggested, for three cleanlab rankings, with plain CV (a
folder of class sub-folders) and with CV grouped by style.

    python benchmarks/planted_labels.py [--data ../shared/data/emoji-faces7] [--seeds 6]
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from features.extract import extract  # noqa: E402
from pipeline.heads.head import softmax  # noqa: E402
from pipeline.params import load_params  # noqa: E402
from pipeline.stages.train import train_head  # noqa: E402

RANKINGS = ("self_confidence", "normalized_margin", "confidence_weighted_entropy")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "emoji-faces7"))
    ap.add_argument("--seeds", type=int, default=6)
    ap.add_argument("--source", default="happy")
    ap.add_argument("--target", default="sad")
    a = ap.parse_args()
    from cleanlab.filter import find_label_issues
    params = load_params(str(ROOT / "params.yaml"))
    params = type(params)(**{**params.__dict__, "cv": type(params.cv)(**{**params.cv.__dict__, "folds": 5})})
    rows = [(str(p), p.parent.name, style.name) for style in sorted(Path(a.data).resolve().iterdir()) if style.is_dir()
            for p in sorted(style.glob("*/*.png"))]
    source = [i for i, r in enumerate(rows) if r[1] == a.source]
    table: dict[tuple[str, str], list[int]] = {}
    with tempfile.TemporaryDirectory() as d:
        t = Path(d)
        for seed in range(a.seeds):
            planted = set(np.random.default_rng(seed).choice(source, 5, replace=False).tolist())
            for cv in ("plain", "grouped"):
                with open(t / "m.csv", "w", newline="") as f:
                    w = csv.writer(f)
                    w.writerow(["path", "label"] + (["group"] if cv == "grouped" else []))
                    w.writerows([p, a.target if i in planted else lab] + ([g] if cv == "grouped" else [])
                                for i, (p, lab, g) in enumerate(rows))
                stores = []
                for bb in params.extract.backbones:  # features are reused across runs: only labels change
                    extract(images=str(t / "m.csv"), out=str(t / f"{bb}.h5"), backbone=bb, allow_outside=True,
                            progress=False)
                    stores.append(str(t / f"{bb}.h5"))
                train_head(stores=stores, out=str(t / "model"), params=params, progress=lambda s: None)
                info = json.loads((t / "model" / "model.json").read_text())
                names = info["class_names"]
                with open(t / "model" / "oof_predictions.csv", newline="") as f:
                    oof = list(csv.DictReader(f))
                y = np.array([names.index(r["label"]) for r in oof])
                probs = softmax(np.load(t / "model" / "oof_logits.npy"), info["temperature"])
                want = {rows[i][0] for i in planted}
                for how in RANKINGS:
                    idx = find_label_issues(labels=y, pred_probs=probs, return_indices_ranked_by=how)
                    other = probs[idx].copy()
                    other[np.arange(len(idx)), y[idx]] = -1
                    hits = sum(1 for k, (i, s) in enumerate(zip(idx, other.argmax(1)))
                               if k < 10 and oof[i]["path"] in want and names[s] == a.source)
                    table.setdefault((cv, how), []).append(hits)
                print(f"seed {seed} {cv:7s} flagged {len(idx):3d}: " + ", ".join(
                    f"{h} {table[(cv, h)][-1]}" for h in RANKINGS), flush=True)
    print(f"\n{Path(a.data).name}: planted {a.source} -> {a.target}, backbones {', '.join(params.extract.backbones)}; "
          "planted rows in the top 10 with the true class suggested, per seed (mean)")
    for (cv, how), v in table.items():
        print(f"  {cv:7s} {how:28s} {v}  mean {np.mean(v):.2f}")


if __name__ == "__main__":
    main()
