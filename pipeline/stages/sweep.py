"""`imgsent sweep`: every combination of a grid of head settings, cross-validated on the same features and the
same folds in one process (features read once, no process start per config), ranked by CV macro-F1; the best
config becomes a normal model directory.

    DIR/sweep.csv   rank, the grid values, CV macro-F1 / accuracy mean and std, seconds; best first
    DIR/best/       the model directory of the best config (predict, evaluate, report, export read it)
"""
from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import sys
import time

import numpy as np
import yaml
from tqdm import tqdm

from features.storage.atomic import atomic_dir, check_output, holds_only
from features.text import plural
from features.errors import UserError
from pipeline.params import HeadParams, Params, parse_params
from pipeline.stages.train import choose_head, finish, load_rows

MAX_CONFIGS = 1000  # a grid is multiplied out: refuse a typo that asks for days of work


def _split_values(text: str) -> list[str]:
    """'[],[256],[512, 128]' -> ['[]', '[256]', '[512, 128]']: commas inside brackets do not split."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return out + [cur]


def parse_grid(specs: list[str], base: Params) -> list[tuple[dict, Params]]:
    """['head.lr=0.001,0.003', 'head.hidden=[],[256]'] -> [({'head.lr': 0.001, 'head.hidden': []}, Params), ...],
    every config validated like params.yaml (one line naming the key and the allowed range)."""
    keys = [f.name for f in dataclasses.fields(HeadParams)]
    axes: dict[str, list] = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip()
        if not sep or not values.strip():
            raise UserError(f"--grid {spec!r}: expected head.KEY=V1,V2,... e.g. --grid head.lr=0.001,0.003")
        if not key.startswith("head.") or key[5:] not in keys:
            raise UserError(f"--grid {key}: only head keys can be swept (every config shares the features and the "
                            f"folds); one of: {', '.join('head.' + k for k in keys)}")
        if key in axes:
            raise UserError(f"--grid {key}: given twice; list all its values in one --grid")
        try:
            axes[key] = [yaml.safe_load(v) for v in _split_values(values)]
        except yaml.YAMLError:
            raise UserError(f"--grid {spec!r}: a value is not valid YAML (lists look like [256] or [])") from None
    if not axes:
        raise UserError("sweep needs at least one --grid head.KEY=V1,V2,...")
    n = int(np.prod([len(v) for v in axes.values()]))
    if n > MAX_CONFIGS:
        raise UserError(f"--grid: {n} combinations; at most {MAX_CONFIGS}, sweep fewer values")
    configs = []
    for combo in itertools.product(*axes.values()):
        raw = json.loads(json.dumps(base.to_dict()))  # tuples -> lists, as params.yaml would give them
        values = dict(zip(axes, combo))
        for key, v in values.items():
            raw["head"][key[5:]] = v
        configs.append((values, parse_params(raw, where="--grid")))
    return configs


def _effective(h: HeadParams) -> HeadParams:
    """The settings that change the fits: the linear head (hidden: []) is trained by L-BFGS on the full batch, so
    lr, dropout and batch_size do not apply to it."""
    return dataclasses.replace(h, lr=1.0, dropout=0.0, batch_size=1) if h.hidden == () else h


def sweep(*, stores: list[str], out: str, params: Params, grid: list[str], intersect: bool = False,
          progress=print, bar: bool = True) -> list[dict]:
    """Cross-validate every grid config on shared folds; write DIR/sweep.csv and DIR/best/. Returns the rows of
    sweep.csv, best first."""
    t0 = time.time()
    configs = parse_grid(grid, params)  # every argument checked before any work
    out_dir = check_output(out, folder=True, is_ours=holds_only("sweep.csv", "best"), what="sweep folder")
    rows, fold, max_val = load_rows(stores, params, intersect)
    results, best, done, references = [], None, {}, {}  # references: each fold's statistics, computed once
    fits = sum(params.cv.folds * (2 if p.head.hidden == "auto" else 1) for _, p in configs)
    with tqdm(total=fits, desc="sweep", unit="fit", disable=not bar, file=sys.stderr, dynamic_ncols=True) as pbar:
        for i, (values, p) in enumerate(configs):
            t = time.time()
            key = _effective(p.head)
            if key in done:  # e.g. another lr for the linear head, which has none: the same fits, not rerun;
                (p, per_fold), cand, transform, choice = done[key], None, None, None  # equal scores never
                pbar.update(params.cv.folds * (2 if key.hidden == "auto" else 1))  # replace the best: no logits
            else:
                p, cand, transform, choice = choose_head(rows, fold, p, max_val, on_fold=lambda: pbar.update(1),
                                                           references=references)
                per_fold = cand.per_fold[transform]
                done[key] = (p, per_fold)
            f1 = np.array([f["macro_f1"] for f in per_fold])
            acc = np.array([f["accuracy"] for f in per_fold])
            r = {**values, "macro_f1_mean": float(f1.mean()),
                 "macro_f1_std": float(f1.std()), "accuracy_mean": float(acc.mean()),
                 "accuracy_std": float(acc.std()), "seconds": round(time.time() - t, 3), "_i": i}
            results.append(r)
            if best is None or (r["macro_f1_mean"], -r["macro_f1_std"]) > (best[0]["macro_f1_mean"],
                                                                           -best[0]["macro_f1_std"]):
                best = (r, p, cand, transform, choice)  # only the best config's out-of-fold logits are kept
    r, p, cand, transform, choice = best
    results.sort(key=lambda r: (-r["macro_f1_mean"], r["macro_f1_std"], r["_i"]))
    with atomic_dir(out_dir) as d:
        (d / "best").mkdir()
        finish(rows, fold, cand, transform, p, max_val, d / "best", t0, choice)
        with open(d / "sweep.csv", "w", newline="") as f:
            w = csv.writer(f)
            keys = list(configs[0][0])
            w.writerow(["rank", *keys, "macro_f1_mean", "macro_f1_std", "accuracy_mean", "accuracy_std", "seconds"])
            for rank, row in enumerate(results, 1):
                w.writerow([rank, *(json.dumps(row[k]) if isinstance(row[k], list) else row[k] for k in keys),
                            *(f"{row[k]:.4f}" for k in ("macro_f1_mean", "macro_f1_std", "accuracy_mean",
                                                        "accuracy_std")), row["seconds"]])
    for row in results:
        del row["_i"]
    top = ", ".join(f"{k}={json.dumps(v)}" for k, v in results[0].items() if k.startswith("head."))
    progress(f"{out}: {len(configs)} configs x {params.cv.folds} folds on {plural(int((rows.labels >= 0).sum()), 'image')} in "
             f"{time.time() - t0:.1f} s; best {top}: macro-F1 {results[0]['macro_f1_mean']:.3f} ± "
             f"{results[0]['macro_f1_std']:.3f} -> {out}/best")
    return results
