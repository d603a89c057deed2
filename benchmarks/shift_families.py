"""Harder shifts than the shared emoji styles (issue #41): new "styles" made from the shared images by whole-image
transformations (outlines, flat colour, greyscale, blur, hue, inversion, emboss, noise, tiny JPEG), each a shift
family; leave-one-family-out as a user runs it, per family and the worst, spread over seeds.

    python benchmarks/shift_families.py [--data ../shared/data/emoji-faces7] [--seeds 0 1 2] [--forced]
                                        [--backbones efficientnet_lite0] [--families ...]

For each held-out family F: train-head on every other family (the untouched images are the family 'original';
the family is the manifest group, so `auto` chooses on held-out families), then F's folder predicted as predict
does. Rows: the default (grouped; and without the group column); the default with `align: none` (the training
families pooled as stored, not each aligned onto the training statistics: heads/align.py); with --forced also
the default's head under each transform, and each head forced (`hidden: []`, `[256]`) with the transform auto
then chose. Columns: macro-F1 per held-out family (mean over seeds), the mean over families ± its std over
seeds, the worst family ± its std over seeds; then accuracy on batches of the held-out family (whole, skewed,
small, each image alone). Nothing here is tuned to one family: they are made once, by the fixed recipes below.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import sys
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter, ImageOps

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.loso import held_out, score  # noqa: E402
from features.extract import extract  # noqa: E402
from pipeline.data.rows import open_rows  # noqa: E402
from pipeline.heads.adapt import TRANSFORMS  # noqa: E402
from pipeline.params import load_params  # noqa: E402


def _edges(im, rng):  # outlines only: dark edges on white
    return ImageOps.invert(ImageOps.autocontrast(ImageOps.grayscale(im).filter(ImageFilter.FIND_EDGES))).convert("RGB")


def _blur(im, rng):  # heavy blur + downscale: a 24-pixel thumbnail blown up and blurred again
    small = im.resize((24, 24), Image.BILINEAR)
    return small.resize(im.size, Image.BILINEAR).filter(ImageFilter.GaussianBlur(2))


def _hue(im, rng):  # every hue rotated by a third of the circle
    h, s, v = im.convert("HSV").split()
    return Image.merge("HSV", (h.point(lambda p: (p + 85) % 256), s, v)).convert("RGB")


def _noise(im, rng):  # added texture: Gaussian noise, sigma 40 of 255
    a = np.asarray(im, np.float32) + rng.normal(0, 40, (im.size[1], im.size[0], 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def _jpeg(im, rng):  # small-size JPEG: 32 pixels at quality 10, shown at full size
    import io
    buf = io.BytesIO()
    im.resize((32, 32), Image.BILINEAR).save(buf, "JPEG", quality=10)
    return Image.open(buf).convert("RGB").resize(im.size, Image.BILINEAR)


FAMILIES = {
    "original": lambda im, rng: im,
    "edges": _edges,
    "posterise": lambda im, rng: ImageOps.posterize(im, 2),  # 4 levels a channel: flat colour
    "grey": lambda im, rng: ImageOps.grayscale(im).convert("RGB"),
    "blur": _blur,
    "hue": _hue,
    "invert": lambda im, rng: ImageOps.invert(im),
    "emboss": lambda im, rng: im.filter(ImageFilter.EMBOSS),
    "noise": _noise,
    "jpeg": _jpeg,
}


def build(data: Path, work: Path, families: list[str]) -> Path:
    """Every image of `data` (style/label/*.png) through every family, under work/<family>/<style>/<label>/, and
    the manifest path,label,group=family. Deterministic: a family's randomness is seeded by the file's path."""
    rows = []
    for p in sorted(data.glob("*/*/*.png")):
        rel = p.relative_to(data)
        im = Image.open(p).convert("RGB")
        for fam in families:
            out = work / fam / rel
            if not out.exists():
                out.parent.mkdir(parents=True, exist_ok=True)
                rng = np.random.default_rng(zlib.crc32(str(rel).encode()))
                FAMILIES[fam](im, rng).save(out)
            rows.append((str(out.resolve()), rel.parts[1], fam))
    path = work / "manifest.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([("path", "label", "group"), *rows])
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", nargs="+", default=[str(ROOT.parent / "shared" / "data" / "emoji-faces7")])
    ap.add_argument("--backbones", nargs="+", default=["efficientnet_lite0"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--families", nargs="+", default=list(FAMILIES))
    ap.add_argument("--work", default="out/bench/families")
    ap.add_argument("--forced", action="store_true", help="also each transform and each head forced (slower)")
    args = ap.parse_args()
    params = load_params(str(ROOT / "params.yaml"))
    for data in map(Path, args.data):
        csv_path = build(data, Path(args.work) / data.name, args.families)
        for backbone in args.backbones:
            store = str(Path(args.work) / f"{data.name}_{backbone}.h5")
            extract(images=str(csv_path), out=store, backbone=backbone, allow_outside=True, progress=False)
            rows = open_rows([store])
            groups = np.asarray(rows.groups)
            table: dict[str, dict[str, list[dict]]] = {}  # row -> family -> score() per seed
            chose: dict[str, list[str]] = {}
            for seed in args.seeds:
                for fam in args.families:
                    te = groups == fam
                    x, y = rows.features[te], rows.labels[te]

                    def add(key, head, transform):
                        got = score(head, x, y, transform, np.random.default_rng(seed))
                        table.setdefault(key, {}).setdefault(fam, []).append(got)
                    head, chosen = held_out(rows, params, fam, seed, grouped=True)
                    chose.setdefault(fam, []).append(f"{list(chosen.head.hidden)} {chosen.head.adapt}")
                    add("default", head, chosen.head.adapt)
                    for t in TRANSFORMS if args.forced else ():
                        add(f"default's head, {t}", head, t)
                    before = dataclasses.replace(params, head=dataclasses.replace(params.head, align="none"))
                    h, c = held_out(rows, before, fam, seed, grouped=True)
                    add("default with align: none", h, c.head.adapt)
                    for hidden in ((), (256,)) if args.forced else ():
                        forced = dataclasses.replace(params, head=dataclasses.replace(params.head, hidden=hidden))
                        h, c = held_out(rows, forced, fam, seed, grouped=True)
                        add(f"{list(hidden)}, auto transform", h, c.head.adapt)
                    head, chosen = held_out(rows, params, fam, seed, grouped=False)
                    add("default, no groups", head, chosen.head.adapt)
                    print(f"  seed {seed} {fam}: " + ", ".join(f"{k} {v[fam][-1]['F1']:.3f}" for k, v in table.items()),
                          flush=True)
            fams = args.families
            print(f"\n{data.name} {backbone}: leave-one-family-out, {len(args.seeds)} seeds; default chose: "
                  + "; ".join(f"{f}: {', '.join(sorted(set(c)))}" for f, c in chose.items()))
            print(f"{'':28s}" + "".join(f"{f[:9]:>10s}" for f in fams) + f"{'mean':>16s}{'worst':>16s}")
            for key, per in table.items():
                f1 = np.array([[s["F1"] for s in per[f]] for f in fams])  # (families, seeds)
                mean, worst = f1.mean(0), f1.min(0)  # per seed
                print(f"{key:28s}" + "".join(f"{v:10.3f}" for v in f1.mean(1))
                      + f"{mean.mean():9.3f} ± {mean.std():.3f}{worst.mean():9.3f} ± {worst.std():.3f}", flush=True)
            kinds = [k for k in next(iter(table["default"].values()))[0] if k != "F1"]
            print(f"\naccuracy on batches of the held-out family (mean over families and seeds)\n{'':28s}"
                  + "".join(f"{k:>18s}" for k in kinds))
            for key, per in table.items():
                print(f"{key:28s}" + "".join(f"{np.mean([s[k] for f in fams for s in per[f]]):18.3f}" for k in kinds))


if __name__ == "__main__":
    main()
