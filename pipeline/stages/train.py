"""Stage two: stratified k-fold cross-validation of the head on cached features, each held-out source adapted
(heads/adapt.py), temperature calibration on the out-of-fold logits, a final fit on every labelled row, and the
model directory, written whole or not at all.

    rows, fold = load_rows(stores)     in memory, or read in blocks past cv.memory_budget_mb; one fold rule
    choose_head(rows, fold, params)    CV of the head(s) under every transform, stress batches; the choices
                                       (pipeline/selection/)
    reseeded(...)                      the chosen head's CV again, reseeded: the run-to-run spread
    finish(...)                        calibration, final fit, out-of-distribution reference, the model directory
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from features.storage.atomic import atomic_dir, check_output
from features.text import plural
from features.errors import UserError
from features.timing import Phases
from pipeline.data.folds import assign_folds
from pipeline.heads.head import softmax
from pipeline.inference.calibration import fit_temperature
from pipeline.heads.common import labelled_blocks
from pipeline.heads.fitting import FoldViews, fit_final
from pipeline.selection.crossval import cross_validate, start_cv
from pipeline.selection.foldwork import FoldPool
from pipeline.selection.heads import Choice, choose_head, describe_choice, heads_to_fit
from pipeline.analysis.metrics import (classification_metrics, expected_calibration_error, per_image_metrics,
                                       write_confusion, write_metrics, write_predictions)
from pipeline.inference.modeldir import ModelInfo, is_model_dir, save_model_dir
from pipeline.inference.ood import fit_ood, image_ids, reference_rows, save_ood
from pipeline.params import Params
from pipeline.data.memory import memory_budget
from pipeline.data.rows import Rows, open_rows


HEADLINE = {"cv": ("macro_f1_mean", "macro_f1_std", "repeats_std", "accuracy_mean", "ece_after")}  # metrics.json
REPEATS_NOISE = 0.005  # the reseeded runs are made where the spread across folds allows this much (repeats_for)


def check_model_out(out: str | Path) -> Path:
    return check_output(out, folder=True, is_ours=is_model_dir, what="model directory")


def load_rows(stores: list[str], params: Params, intersect: bool) -> tuple[Rows, np.ndarray, int | None]:
    """Rows, fold per row and the early-stopping slice's row cap (streamed stores) for `params.cv`."""
    rows = open_rows(stores, memory_budget_mb=params.cv.memory_budget_mb, intersect=intersect)
    if not (rows.labels >= 0).any():
        raise UserError(f"{stores[0]}: no labelled images; extract from a folder with one sub-folder per class")
    # Streamed stores: the early-stopping slice is held in memory, so it gets a quarter of the budget.
    max_val = None if rows.in_memory else memory_budget(params.cv.memory_budget_mb) // (4 * 4 * rows.dim)
    return rows, folds_of(rows, params.cv.folds, params.cv.seed), max_val


def folds_of(rows: Rows, k: int, seed: int) -> np.ndarray:
    return assign_folds(labels=rows.labels, groups=rows.groups, sha256=rows.sha256, k=k,
                        class_names=rows.class_names, random_state=seed)


def reseeded(rows: Rows, params: Params, transform: str, first: list[float], max_val: int | None,
             on_fold=lambda: None, repeats: int | None = None) -> list[float]:
    """Mean CV macro-F1 of the chosen head in each of `repeats` runs (default cv.repeats; repeats_for says how
    many train-head runs): the choosing run's, then the same CV with the folds and the fits reseeded (seed + r).
    Their spread is the run-to-run noise shown beside the score: on the demo, reseeding moves CV macro-F1 by
    0.008 (std) where 1e-6 of feature noise moves nothing (benchmarks/repro_noise.py)."""
    out = [float(np.mean(first))]
    reseeds = [dataclasses.replace(params, cv=dataclasses.replace(params.cv, seed=params.cv.seed + r))
               for r in range(1, params.cv.repeats if repeats is None else repeats)]
    with FoldPool(rows, params) as pool:  # every run's folds queued at once, on every core
        started = []
        for p in reseeds:
            f = folds_of(rows, p.cv.folds, p.cv.seed)
            views = FoldViews(rows, f)
            started.append((p, f, views, start_cv(pool, rows, f, p, (transform,), max_val, views)))
        for p, f, views, run in started:
            cand = cross_validate(rows, f, p, (transform,), max_val, on_fold, stress=False, views=views, run=run)
            out.append(float(np.mean(cand.f1s(transform))))
    return out


def repeats_for(params: Params, first: list[float]) -> tuple[int, str | None]:
    """(CV runs to make, why fewer than cv.repeats, or None), from the choosing run's per-fold macro-F1 `first`.
    Reseeding moves the mean of k folds by less than their spread across folds / sqrt(k): over 6 reseeded runs
    on 6 stores (1,000 to 13,270 images, with and without groups) its std was 0.12-0.65 of that bound
    (benchmarks/reseed_bound.py). Where the bound is under REPEATS_NOISE, half the 0.01 a spread must be shown
    at, the reseeded runs could not show one worth printing and are skipped (35,887 FER-like images: 0.0005;
    10,000 images of 100 classes: 0.003); where it is not, they are made, at any size (13,270 images in 10
    shift families as groups: the reseeded std was 0.014). Said in metrics.json and on the summary line."""
    bound = float(np.std(first) / np.sqrt(len(first)))
    if params.cv.repeats == 1 or bound >= REPEATS_NOISE:
        return params.cv.repeats, None
    return 1, (f"{params.cv.repeats - 1} of cv.repeats {params.cv.repeats} skipped: the spread across folds "
               f"(± {np.std(first):.4f} over {len(first)}) bounds the mean's run-to-run noise by ± {bound:.4f} "
               f"(std / sqrt(folds)), under {REPEATS_NOISE}")


def train_head(*, stores: list[str], out: str, params: Params, intersect: bool = False, progress=print) -> dict:
    """The train stage: CV, calibration, final fit; writes head.npz, model.json, metrics.json (HEADLINE numbers),
    details.json (everything, with the whys), oof_logits.npy, oof_predictions.csv and confusion.csv into `out`.
    `progress` gets a line per step; the result is details.json's content (summary_line says it in one line),
    plus `seconds` and `phase_seconds` (the run's wall time, whole and by phase, which no file holds)."""
    t0, phases = time.time(), Phases()
    out_dir = check_model_out(out)
    with phases("read"):
        rows, fold, max_val = load_rows(stores, params, intersect)
    k = int(fold.max()) + 1
    progress(f"{out}: {int((rows.labels >= 0).sum())} labelled images, {len(rows.class_names)} classes, "
             f"{rows.dim} features; cross-validating {k} folds")
    on_fold = counter(progress, f"{out}: fit", k * heads_to_fit(params.head))  # heads x folds (a head clearly
    # behind stops early: its CV's line says so)
    views = FoldViews(rows, fold)  # each fold's training statistics and the final fit's, from one pass
    choice = choose_head(rows, fold, params, max_val, on_fold, phases, views, final_fit=True)
    progress(f"{out}: {describe_choice(choice.record)}")
    repeats, skipped = repeats_for(params, choice.cv.f1s(choice.transform))
    if skipped:
        progress(f"{out}: reseeded runs: {skipped}")
    with phases("repeats"):
        runs = reseeded(rows, choice.params, choice.transform, choice.cv.f1s(choice.transform), max_val,
                        counter(progress, f"{out}: reseeded fit", k * (repeats - 1)), repeats)
    progress(f"{out}: calibrating and fitting the final head on every labelled image")
    with atomic_dir(out_dir) as d:
        metrics = finish(rows, fold, choice, max_val, d, t0, runs, skipped, phases, views)
    return metrics | {"phase_seconds": phases.seconds}


def capped_note(cv: int, folds: int, final: bool, epochs: int) -> str:
    """details.json's words for fits that ran every epoch (or L-BFGS iteration) head.epochs allows before their
    stop rule (early stopping, convergence) decided (scikit-learn's ConvergenceWarning)."""
    which = " and ".join(filter(None, [f"{cv} of {folds} CV fits" if cv else "", "the final fit" if final else ""]))
    return (f"{which} ran all head.epochs ({epochs}) before early stopping or convergence decided: the scores are "
            "of a head the cap stopped, not its stop rule; raise head.epochs to see what the rule gives")


def notes(metrics: dict) -> list[str]:
    """What train-head says after its line, on stderr: the caveats a user must see."""
    out = [] if metrics["n_groups"] else [  # CV never met a new source
        "no group column, so CV tested new images of the training sources, never a new source (a style, a camera, "
        "a person); give the manifest a group column to measure that (README)"]
    return out + [metrics["head_choice"][k] for k in ("capped", "capped_rivals") if k in metrics["head_choice"]]


def counter(progress, what: str, total: int):
    """A callback that says '{what} n of {total} done' the n-th time it is called."""
    done = iter(range(1, total + 1))
    return lambda: progress(f"{what} {next(done)} of {total} done")


def summary_line(out: str, metrics: dict) -> str:
    """train-head's one line: what was chosen, the score with its noise (across folds, across reseeded runs),
    the pooled out-of-fold score the report shows, and calibration."""
    c, h = metrics["cv"], metrics["head_choice"]
    faces = (f" ({metrics['n_faces']} face crops; per image, mean of its faces: macro-F1 "
             f"{metrics['per_image']['macro_f1']:.3f})") if "n_faces" in metrics else ""
    runs = (f", ± {c['repeats_std']:.3f} over {len(c['repeats'])} reseeded runs" if len(c["repeats"]) > 1 else
            f"; reseeded runs: {c['repeats_skipped']}" if "repeats_skipped" in c else "")
    return (f"{out}: {c['folds']}-fold CV on {plural(metrics['n_images'], 'image')}{faces}, "
            f"head {json.dumps(h['chosen'])}, "
            f"adaptation {metrics['adaptation']['transform']}: macro-F1 {c['macro_f1_mean']:.3f} (mean of folds; "
            f"± {c['macro_f1_std']:.3f} across folds{runs}), accuracy {c['accuracy_mean']:.3f}; pooled out-of-fold "
            f"macro-F1 {c['oof_macro_f1']:.3f} (the report's); ECE {c['ece_before']:.3f} -> {c['ece_after']:.3f} "
            f"(T={c['temperature']:.2f}) in {metrics['seconds']:.1f} s ({metrics['mode']})")


def finish(rows: Rows, fold: np.ndarray, choice: Choice, max_val: int | None, d: Path, t0: float,
           repeats: list[float] | None = None, skipped: str | None = None, phases: Phases | None = None,
           views: FoldViews | None = None) -> dict:
    """The model directory in `d`, from the chosen config's out-of-fold logits (N, C) under its transform
    (choose_head's Choice): fit the final head on every labelled row, calibrate it on the out-of-fold logits, fit
    its out-of-distribution reference, then write head.npz, model.json, ood.npz, metrics.json, details.json and
    the out-of-fold files. Returns details.json's content (plus `seconds`). `views`: the FoldViews of `fold`
    that CV used, whose sums give the final fit's statistics without another pass."""
    lab = rows.labels >= 0
    phases = phases or Phases()
    params, cand, transform = choice.params, choice.cv, choice.transform
    oof, per_fold = cand.oof[transform], cand.per_fold[transform]
    with phases("final fit"):  # train-head's was fitted beside CV (choose_head's final_fit); sweep's best is not
        final = choice.final if choice.final is not None else fit_final(rows, params.head, params.cv.seed, max_val,
                                                                          views)
    with phases("calibration"):
        final = dataclasses.replace(final, temperature=fit_temperature(oof[lab], rows.labels[lab]))
    with phases("out-of-distribution reference"):
        sample = reference_rows(lab, params.cv.seed)  # (N,) bool: at most MAX_REF rows, read a slice at a time
        ref, loo = fit_ood((x for x, _ in labelled_blocks(rows, sample)), int(sample.sum()), params.cv.seed)
        ood = save_ood(d, ref, loo, image_ids([s for s, m in zip(rows.sha256, lab) if m]))  # and which images
        # it was trained on: evaluate leaves them out
    repeats = repeats or [float(np.mean([f["macro_f1"] for f in per_fold]))]  # mean CV macro-F1 per reseeded run
    metrics = {**cv_metrics(rows, oof, per_fold, final.temperature, params.cv.folds),
               **choice.record,
               "mode": "in-memory" if rows.in_memory else "streamed", "seconds": round(time.time() - t0, 3)}
    capped = cand.capped()  # the chosen head's CV fits that head.epochs cut short
    if capped or final.capped:
        metrics["head_choice"] = {**metrics["head_choice"], "capped": capped_note(capped, len(cand.heads), final.capped,
                                                                                  params.head.epochs)}
    metrics["cv"] |= {"repeats": [round(r, 4) for r in repeats], "repeats_std": float(np.std(repeats)),
                      **({"repeats_skipped": skipped} if skipped else {})}
    info = ModelInfo(class_names=rows.class_names, backbones=rows.fingerprints, backbone_weights=rows.weights_paths,
                     hidden=params.head.hidden, dim=rows.dim, dropout=params.head.dropout,
                     temperature=final.temperature, stores=rows.stores, image_root=rows.root,
                     params=params.to_dict(), ood=ood, adapt=transform)
    save_model_dir(d, final, info)
    # the run time is said on the command line, not stored: the metrics change only when the model does, so
    # `dvc repro` of unchanged inputs leaves git clean and `dvc metrics diff` lists what matters
    write_metrics(d, {k: v for k, v in metrics.items() if k != "seconds"}, HEADLINE)
    write_out_of_fold(d, rows, fold, oof, final.temperature, cand.said[transform], cand.sources)
    return metrics


def cv_metrics(rows: Rows, oof: np.ndarray, per_fold: list[dict], temperature: float, folds: int) -> dict:
    """metrics.json's scores: per-fold means and spreads, the pooled out-of-fold scores and calibration error
    before and after temperature scaling, per class; in face mode also per image (the mean of its faces)."""
    lab = rows.labels >= 0
    names, y, logits = rows.class_names, rows.labels[lab], oof[lab]  # (n,), (n, C)
    probs_raw, probs = softmax(logits), softmax(logits, temperature)
    overall = classification_metrics(y, probs.argmax(1), names)
    accs, f1s = (np.array([f[key] for f in per_fold]) for key in ("accuracy", "macro_f1"))
    paths = [p for p, m in zip(rows.paths, lab) if m]
    return {
        "cv": {"folds": folds, "accuracy_mean": float(accs.mean()), "accuracy_std": float(accs.std()),
               "macro_f1_mean": float(f1s.mean()), "macro_f1_std": float(f1s.std()),
               "oof_accuracy": overall["accuracy"], "oof_macro_f1": overall["macro_f1"],
               "oof_balanced_accuracy": overall["balanced_accuracy"],
               "ece_before": expected_calibration_error(probs_raw, y), "ece_after": expected_calibration_error(probs, y),
               "temperature": temperature, "per_fold": per_fold},
        "per_class": overall["per_class"],
        "n_images": int(lab.sum()), "n_unlabelled": int((~lab).sum()),
        "n_groups": 0 if rows.groups is None else len(set(rows.groups)),  # 0: no group column
        **({} if rows.face_index is None else  # face mode: rows are face crops, each scored on its own...
           {"n_images": len(set(paths)), "n_faces": int(lab.sum()),
            # ...and each image by the mean of its faces' out-of-fold probabilities, as predict decides
            "per_image": per_image_metrics(paths, y, probs, names)}),
    }


def write_out_of_fold(d: Path, rows: Rows, fold: np.ndarray, oof: np.ndarray, temperature: float,
                      adapted: list[str], sources: np.ndarray) -> None:
    """oof_logits.npy (n, C), oof_predictions.csv (calibrated, with the fold, the source and what its prediction
    rested on: `sources` (N,) and `adapted`, per row, as CV recorded them) and confusion.csv."""
    lab = rows.labels >= 0
    names, y, logits = rows.class_names, rows.labels[lab], oof[lab]
    probs = softmax(logits, temperature)
    np.save(d / "oof_logits.npy", logits)
    write_predictions(d / "oof_predictions.csv", paths=[p for p, m in zip(rows.paths, lab) if m],
                      labels=[names[i] for i in y], probs=probs, class_names=names,
                      extra={"fold": fold[lab], "source": sources[lab],
                             "adapted": [a for a, m in zip(adapted, lab) if m],
                             **rows.face_columns(lab)})
    write_confusion(d / "confusion.csv", y, probs.argmax(1), names)
