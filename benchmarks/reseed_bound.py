"""Whether the spread across folds bounds what reseeding moves the CV score (stages/train.repeats_for): per store,
train-head's default with cv.repeats 6 (every reseeded run made, whatever the rule says), then the first run's
std across folds / sqrt(folds) beside the std of the 6 runs' means.

    python benchmarks/reseed_bound.py [SPEC ...]     SPEC = STORE:HEAD:FOLDS, HEAD one of auto, lin, mlp

Without SPECs: the 1,000-row and 100-class stores of stage_two.py and the shared emoji stores of loso.py and
shift_families.py (run those first).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import pipeline.stages.train as train  # noqa: E402
from pipeline.params import load_params  # noqa: E402

DEFAULT = ["out/bench/stage_two/1k_1280.h5:auto:5", "out/bench/stage_two/many_1280.h5:lin:5",
           "out/bench/loso/emoji-polarity3_efficientnet_lite0.h5:auto:5",
           "out/bench/loso/emoji-faces7_efficientnet_lite0.h5:auto:5",
           "out/bench/loso/emoji-faces7_efficientnet_lite0.h5:auto:3",
           "out/bench/families/emoji-polarity3_efficientnet_lite0.h5:auto:5"]
HEADS = {"auto": "auto", "lin": (), "mlp": (256,)}


def main() -> None:
    train.REPEATS_NOISE = 0.0  # every reseeded run made: the bound is what is measured here
    base = load_params(ROOT / "params.yaml")
    print("store, head, folds: images, first run's std across folds / sqrt(folds), std of 6 runs' means, ratio")
    for spec in sys.argv[1:] or DEFAULT:
        store, head, folds = spec.split(":")
        p = dataclasses.replace(base, head=dataclasses.replace(base.head, hidden=HEADS[head]),
                                cv=dataclasses.replace(base.cv, repeats=6, folds=int(folds)))
        out = Path(tempfile.mkdtemp()) / "model"
        m = train.train_head(stores=[str(ROOT / store)], out=str(out), params=p, progress=lambda line: None)
        shutil.rmtree(out.parent)
        f1s = [f["macro_f1"] for f in m["cv"]["per_fold"]]
        bound, spread = np.std(f1s) / np.sqrt(len(f1s)), np.std(m["cv"]["repeats"])
        print(f"{Path(store).stem}, {json.dumps(m['head_choice']['chosen'])}, {folds}: {m['n_images']}, "
              f"{bound:.4f}, {spread:.4f}, {spread / bound:.2f}", flush=True)


if __name__ == "__main__":
    main()
