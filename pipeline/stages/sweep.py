"""`imgsent sweep`: every combination of a grid of head settings, cross-validated on the same features and the
same folds in one process (features read once, no process start per config), ranked by CV macro-F1; the config
train-head's rule chooses (selection/rules.prefer: a difference inside the noise is a tie) becomes a model directory.

    DIR/sweep.csv   rank, the grid values, CV macro-F1 / accuracy mean and std, folds run, seconds, chosen, why
                    stopped early (a config clearly behind the best so far); highest first, stopped ones last
    DIR/best/       the model directory of the chosen config (predict, evaluate, report, export read it)
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
from pipeline.heads.fitting import FoldViews
from pipeline.params import HeadParams, Params, parse_params
from pipeline.selection.foldwork import FoldPool
from pipeline.selection.heads import AUTO_CANDIDATES, choose_head, heads_to_fit, queue_heads
from pipeline.selection.rules import prefer, worst_of
from pipeline.stages.train import finish, load_rows

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

    def parsed(values: dict) -> Params:
        raw = json.loads(json.dumps(base.to_dict()))  # tuples -> lists, as params.yaml would give them
        for key, v in values.items():
            raw["head"][key[5:]] = v
        return parse_params(raw, where="--grid")
    for key, values in axes.items():  # one value twice (0.001,1e-3) would be one config run twice, its rows a tie
        seen = {}  # parsed value -> its first place in the list
        for i, v in enumerate(values):
            first = seen.setdefault(getattr(parsed({key: v}).head, key[5:]), i)
            if first != i:
                raise UserError(f"--grid {key}: {json.dumps(values[first])} and {json.dumps(v)} are the same value; "
                                "list each value once")
    combos = (dict(zip(axes, combo)) for combo in itertools.product(*axes.values()))
    return [(values, parsed(values)) for values in combos]


def _effective(h: HeadParams) -> HeadParams:
    """The settings that change the fits: the linear head (hidden: []) is trained by L-BFGS on the full batch, so
    lr, dropout and batch_size do not apply to it."""
    return dataclasses.replace(h, lr=1.0, dropout=0.0, batch_size=1) if h.hidden == () else h


def _depth(h: HeadParams) -> int:
    """A config's hidden layers (hidden: auto, whose candidates include the linear head: 0)."""
    return 0 if h.hidden == "auto" else len(h.hidden)


def preference(values: dict) -> int:
    """A config's place when CV cannot tell configs apart: by its hidden layers in AUTO_CANDIDATES' order (the
    order `hidden: auto` keeps on a tie, so sweep and train-head choose alike), else after them."""
    hidden = tuple(values["head.hidden"]) if isinstance(values.get("head.hidden"), list) else None
    return AUTO_CANDIDATES.index(hidden) if hidden in AUTO_CANDIDATES else len(AUTO_CANDIDATES)


def _name(row: dict) -> str:
    """A sweep row's config in words: its head.* values (describe)."""
    return describe({k: v for k, v in row.items() if k.startswith("head.")})


def describe(values: dict) -> str:
    return ", ".join(f"{k}={json.dumps(v)}" for k, v in values.items())


def sweep(*, stores: list[str], out: str, params: Params, grid: list[str], intersect: bool = False,
          progress=print, bar: bool = True) -> list[dict]:
    """Cross-validate every grid config on shared folds; write DIR/sweep.csv and DIR/best/. The config kept in
    best/ is chosen by train-head's rule (selection/rules.prefer): the first in preference order unless another
    beats it by more than the fold-to-fold noise. A config clearly behind the best so far (more than the noise at
    99%, the rule that stops a hidden-layer head's CV in train-head: crossval.behind) stops its CV there and
    cannot be chosen; its row says after how many folds and why. Configs run fewest hidden layers first (as
    choose_head runs its candidates): the linear head's CV is cheap, and as the best so far it stops a clearly
    worse hidden-layer config early, even one preferred on a tie (100 classes x 100 images, lr x [], [256], [512]:
    the [256] configs ran all 5 folds, 0.13 behind; now 2, 21.5 -> 15.0 s). Every config's folds run on one
    FoldPool, the next config's queued behind those of the config being read (FER-like 12-config sweep, 2 cores,
    5 runs alternated: 40.2-43.1 -> 38.9-41.9 s, the same rows). Returns the rows of sweep.csv, the configs that
    ran every fold first, highest mean first."""
    t0 = time.time()
    configs = parse_grid(grid, params)  # every argument checked before any work
    configs = [c for _, c in sorted(enumerate(configs), key=lambda ic: (preference(ic[1][0]), ic[0]))]
    out_dir = check_output(out, folder=True, is_ours=holds_only("sweep.csv", "best"), what="sweep folder")
    rows, fold, max_val = load_rows(stores, params, intersect)
    results, f1s, done = [None] * len(configs), [None] * len(configs), {}  # in preference order
    views = FoldViews(rows, fold)  # each fold's training rows and statistics, computed once
    first = best = None  # (row, Choice) of the first config in preference order and of the highest mean so far,
    # neither stopped: the only two prefer() can choose, so only their logits are kept
    fits = sum(params.cv.folds * heads_to_fit(p.head) for _, p in configs)
    runs = sorted(range(len(configs)), key=lambda i: (_depth(configs[i][1].head), i))  # the order CVs run in:
    # fewest hidden layers first, as choose_head runs its candidates (the linear head's CV is cheap, and as the
    # best so far it stops a clearly worse config's CV early), then preference order
    distinct = {}  # each set of fits (_effective) -> the first config that asks for it, in run order
    for i in runs:
        distinct.setdefault(_effective(configs[i][1].head), configs[i][1])
    queued = {}  # _effective -> its candidates' fold tasks (queue_heads), queued but not yet read
    with FoldPool(rows, params) as pool, tqdm(total=fits, desc="sweep", unit="fit", disable=not bar,
                                               file=sys.stderr, dynamic_ncols=True) as pbar:
        for i in runs:
            (values, p), t = configs[i], time.time()
            key = _effective(p.head)
            if key in done:  # e.g. another lr for the linear head, which has none: the same fits, not rerun;
                (per_fold, stopped, capped), choice = done[key], None  # an equal mean never replaces the best
                pbar.update(params.cv.folds * heads_to_fit(key))
            else:  # a config clearly behind the best so far stops its CV there (choose_head's leader). The next
                # config's folds are queued behind this one's: they take the cores its last round leaves idle
                # (5 folds on 2 cores), and are read once this one is done, against the best so far then
                for k in list(distinct)[len(done):len(done) + 2]:  # this config's fits (the first distinct one
                    if k not in queued:  # not done) and the next
                        queued[k] = queue_heads(pool, rows, fold, distinct[k], max_val, views)
                leader, scored = None if best is None else (_name(best[0]), f1s[best[0]["_i"]]), []
                choice = choose_head(rows, fold, p, max_val, on_fold=lambda: scored.append(pbar.update(1)),
                                     views=views, leader=leader, pool=pool, runs=queued.pop(key))
                per_fold, stopped, capped = done[key] = (choice.cv.per_fold[choice.transform], choice.stopped,
                                                         choice.cv.capped())
                pbar.update(params.cv.folds * heads_to_fit(key) - len(scored))  # folds not run
            f1 = np.array([f["macro_f1"] for f in per_fold])
            acc = np.array([f["accuracy"] for f in per_fold])
            r = {**values, "macro_f1_mean": float(f1.mean()),
                 "macro_f1_std": float(f1.std()), "accuracy_mean": float(acc.mean()),
                 "accuracy_std": float(acc.std()), "folds": len(f1), "capped": capped, "stopped": stopped or "",
                 "seconds": round(time.time() - t, 3), "_i": i}
            results[i], f1s[i] = r, f1.tolist()
            if not stopped and choice is not None:  # (a config that reuses fits comes after the config that ran
                # them in both orders, with the same mean: it would replace neither)
                first = (r, choice) if first is None or i < first[0]["_i"] else first
                best = (r, choice) if best is None or (r["macro_f1_mean"], -i) > (best[0]["macro_f1_mean"],
                                                                                  -best[0]["_i"]) else best
    # the one rule train-head uses (prefer: it returns the first option or the highest mean, the earlier of equal
    # ones, whose logits were kept)
    heads = [_name(x) for x in results]  # preference order
    kept = {heads[e[0]["_i"]]: (e[1].cv, e[1].transform) for e in (first, best)}  # the two with their logits
    name, why = prefer([(h, f1s[i]) for i, h in enumerate(heads) if not results[i]["stopped"]], worst_of(kept))
    r, choice = first if name == heads[first[0]["_i"]] else best
    results.sort(key=lambda x: (bool(x["stopped"]), -x["macro_f1_mean"], x["macro_f1_std"], x["_i"]))
    with atomic_dir(out_dir) as d:
        (d / "best").mkdir()
        finish(rows, fold, choice, max_val, d / "best", t0, views=views)
        with open(d / "sweep.csv", "w", newline="") as f:
            w = csv.writer(f)
            keys = list(configs[0][0])
            w.writerow(["rank", *keys, "macro_f1_mean", "macro_f1_std", "accuracy_mean", "accuracy_std", "folds",
                        "capped", "seconds", "chosen", "stopped"])
            for rank, row in enumerate(results, 1):
                w.writerow([rank, *(json.dumps(row[k]) if isinstance(row[k], list) else row[k] for k in keys),
                            *(f"{row[k]:.4f}" for k in ("macro_f1_mean", "macro_f1_std", "accuracy_mean",
                                                        "accuracy_std")), row["folds"], row["capped"], row["seconds"],
                            int(row is r), row["stopped"]])
    for row in results:
        del row["_i"]
    top = _name(r)
    stopped, capped = sum(bool(x["stopped"]) for x in results), sum(x["capped"] > 0 for x in results)
    progress(f"{out}: {plural(len(configs), 'config')} x {params.cv.folds} folds on "
             f"{plural(int((rows.labels >= 0).sum()), 'image')} in {time.time() - t0:.1f} s; chose {top}: macro-F1 "
             f"{r['macro_f1_mean']:.3f} ± {r['macro_f1_std']:.3f} ({why}) -> {out}/best" +
             (f"; {plural(stopped, 'config')} stopped early, clearly behind the best so far (sweep.csv: folds, "
              "stopped)" if stopped else "") +
             (f"; {plural(capped, 'config')} with fits head.epochs cut short before their stop rule decided "
              "(sweep.csv: capped)" if capped else ""))
    return results
