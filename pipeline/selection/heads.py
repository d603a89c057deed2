"""Choosing the head: each candidate config cross-validated on the same folds under every transform, then the
transform per head and the head by the rules of selection/rules.py; the result as one record. train-head and sweep
both choose here."""
from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import dataclass

import numpy as np

from features.timing import Phases
from pipeline.data.rows import Rows
from pipeline.heads.adapt import TRANSFORMS
from pipeline.heads.fitting import FoldViews, fit_final
from pipeline.heads.head import Head
from pipeline.params import HeadParams, Params
from pipeline.selection.crossval import Candidate, behind_any, cross_validate, score_stress_batches, start_cv
from pipeline.selection.foldwork import FoldPool, Run
from pipeline.selection.rules import adaptation_record, choose_transform, prefer, weakest, worst_of
from pipeline.transforms import NONE

AUTO_CANDIDATES = ((256,), ())  # `hidden: auto`: CV chooses between one hidden layer and the linear head; a tie
# (within the fold-to-fold noise) goes to the first: on 5 unseen emoji styles it generalised better (benchmarks/loso.py)


@dataclass(frozen=True)
class Choice:
    """What choose_head picked: the params with `hidden` and `adapt` resolved, the chosen config's CV, its
    transform, and details.json's record of what was chosen and why (head_choice, adaptation); or, `stopped`,
    that every candidate's CV stopped clearly behind choose_head's leader."""
    params: Params
    cv: Candidate
    transform: str
    record: dict
    stopped: str | None = None  # why every candidate's CV stopped early, behind choose_head's leader: no choice
    final: Head | None = None  # the final head on every labelled row, where choose_head fitted it (final_fit)


def choose_head(rows: Rows, fold: np.ndarray, params: Params, max_val: int | None, on_fold=lambda: None,
                phases: Phases | None = None, views: FoldViews | None = None,
                leader: tuple[str, list[float]] | None = None, final_fit: bool = False, pool: FoldPool | None = None,
                runs: list[Run] | None = None) -> Choice:
    """Cross-validate params' head (hidden: auto: each of AUTO_CANDIDATES on the same folds) under params' transform
    (adapt: auto: every one), then choose the transform per head (choose_transform) and the head (prefer: the
    first candidate unless the other beats it by more than the fold-to-fold noise). Returns the Choice. Stress
    batches are scored for a head that may yet be chosen only (could_win): not one whose CV stopped, nor one that
    loses under each of its transforms (FER-like: the [256] head's, 0.9 of 1.2 s).
    `leader`: (name, per-fold scores on these folds) of a config chosen among outside (sweep's best so far): a
    candidate's CV stops once it is clearly behind that one too (crossval.behind); when every one's did, the
    Choice is of the first candidate, and says why (Choice.stopped). `final_fit` (train-head, no leader): every
    candidate's final fit on every labelled row is queued behind all the folds, into their last round's idle core
    (a final fit waits on no transform: one is applied at prediction, not fitted); the chosen head's comes back as
    Choice.final, the others are stopped (FER-like default: the final fit's 0.6 s). `pool`, `runs`: the FoldPool
    to work on and the candidates' tasks already queued there (queue_heads, same arguments); without them, its own."""
    h, transforms, order, configs = _candidates(params)
    views = FoldViews(rows, fold) if views is None else views  # each fold's training rows and statistics,
    # shared by the heads
    cvs: dict[str, tuple[Candidate, str, str]] = {}  # head -> its CV, its transform and why
    with contextlib.nullcontext(pool) if pool is not None else FoldPool(rows, params) as pool:
        if runs is None:  # every head's folds queued at once, on every core (selection/foldwork.py)
            runs = queue_heads(pool, rows, fold, params, max_val, views)
        finals = {key: pool.start(final_task(rows, p, max_val, views), [-1]) for key, p in configs} \
            if final_fit and leader is None else {}
        for (key, p), run in zip(configs, runs):
            ahead = [(k, c, t) for k, (c, t, _) in cvs.items() if c.stopped is None]  # CV'd before it, not stopped
            leaders = ([leader] if leader else []) + [(k, c.f1s(t)) for k, c, t in ahead][:1]
            cand = cross_validate(rows, fold, p, transforms, max_val, on_fold, stress=False, phases=phases,
                                  views=views, give_up=behind_any(leaders, int(fold.max()) + 1), run=run)
            if cand.stopped is None and (not ahead or could_win(key, cand, ahead, order)):
                score_stress_batches(cand, rows, fold, max_val, phases)  # only a head that may yet be chosen's
            elif cand.stopped and key in finals:
                finals.pop(key).stop()
            cvs[key] = (cand, *(choose_transform(cand) if h.adapt == "auto" else (h.adapt, "set in params")))
        choice = _choice([(key, *cvs[key]) for key in order], grouped=rows.groups is not None)
        chosen = json.dumps(list(choice.params.head.hidden))
        for key, run in finals.items():
            if key != chosen:
                run.stop()
        return dataclasses.replace(choice, final=next(finals[chosen].results())[1]) if chosen in finals else choice


def _candidates(params: Params) -> tuple[HeadParams, tuple[str, ...], list[str], list[tuple[str, Params]]]:
    """What choose_head cross-validates for `params`: the head params as resolved (no alignment without a
    transform), the transforms, the candidate heads' names in preference order, and (name, params) of each in
    the order their CVs run: the linear head first, its CV is cheap and a later head's stops once it is clearly
    behind the first one's (crossval.behind)."""
    h = params.head
    if h.adapt == NONE:  # predictions on raw features: a head trained on aligned groups would never meet its inputs
        h = dataclasses.replace(h, align="none")
    transforms = TRANSFORMS if h.adapt == "auto" else (h.adapt,)
    heads = AUTO_CANDIDATES if h.hidden == "auto" else (h.hidden,)
    configs = [(json.dumps(list(hidden)), dataclasses.replace(params, head=dataclasses.replace(h, hidden=hidden)))
               for hidden in sorted(heads, key=len)]
    return h, transforms, [json.dumps(list(hidden)) for hidden in heads], configs


def queue_heads(pool: FoldPool, rows: Rows, fold: np.ndarray, params: Params, max_val: int | None,
                views: FoldViews) -> list[Run]:
    """Every candidate head's fold tasks for `params` queued on `pool`, behind those queued before, in the order
    choose_head(runs=...) reads them. sweep queues the next config's while one is read: its tasks take the cores
    the last round of folds leaves idle."""
    _, transforms, _, configs = _candidates(params)
    return [start_cv(pool, rows, fold, p, transforms, max_val, views) for _, p in configs]


def final_task(rows, params: Params, max_val: int | None, views: FoldViews):
    """A foldwork task: the final head of params.head on every labelled row (fitting.fit_final)."""
    return lambda j, stopped: fit_final(rows, params.head, params.cv.seed, max_val, views, stopped)


def _choice(tried: list[tuple[str, Candidate, str, str]], grouped: bool) -> Choice:
    """The Choice among the heads `tried` (name, CV, its transform, why), in preference order."""
    finished = [t for t in tried if t[1].stopped is None]
    if not finished:  # every candidate clearly behind the leader: nothing here to choose
        key, cand, transform, _ = tried[0]
        return Choice(cand.params, cand, transform, {"head_choice": {"chosen": json.loads(key)}}, cand.stopped)
    name, why = prefer([(key, cand.f1s(t)) for key, cand, t, _ in finished],
                       worst_of({key: (cand, t) for key, cand, t, _ in finished})) if len(finished) > 1 else \
        (finished[0][0], "set in params" if len(tried) == 1 else f"{finished[0][0]} chosen")
    why += "".join(f"; {key}: {cand.stopped}" for key, cand, _, _ in tried if cand.stopped)
    why += "".join(f"; {key} lost under each of its transforms, so its stress batches were not scored (its score "
                   f"here: under {t}, the transform it would take before them)" for key, cand, t, _ in finished
                   if not cand.stress)
    if not grouped and name != tried[0][0]:  # the within-source winner is not the one new sources favour
        why += f"; without a group column CV saw only sources like the training ones, and on new ones {tried[0][0]} " \
               "generalised better (docs/evaluation.md): give the group to choose for them"
    _, cand, transform, why_t = next(t for t in tried if t[0] == name)
    chosen = dataclasses.replace(cand.params, head=dataclasses.replace(cand.params.head, adapt=transform))
    choice = {"head_choice": {"chosen": json.loads(name), "why": why,
                              "cv_macro_f1": {key: round(float(np.mean(c.f1s(t))), 4) for key, c, t, _ in tried},
                              "cv_macro_f1_per_fold": {key: c.f1s(t) for key, c, t, _ in tried},
                              "worst_source": {key: weakest(c, t) for key, c, t, _ in finished}},
              "adaptation": adaptation_record(cand, transform, why_t, grouped=grouped)}
    rivals = [(key, c, t) for key, c, t, _ in tried if key != name and c.capped()]  # its CV stopped early or not
    if rivals:  # a rival's score is of a fit the cap stopped: the choice may rest on an underfitted rival
        choice["head_choice"]["capped_rivals"] = "; ".join(
            f"{key} lost with {c.capped()} of its {len(c.heads)} CV fits cut short by head.epochs "
            f"({c.params.head.epochs}) before its stop rule decided: its {np.mean(c.f1s(t)):.3f} is of a capped fit; "
            "raise head.epochs to compare it converged" for key, c, t in rivals)
    return Choice(chosen, cand, transform, choice)


def could_win(key: str, cand: Candidate, finished: list[tuple[str, Candidate, str]], order: list[str]) -> bool:
    """Whether `cand` (head `key`) could be chosen against the `finished` heads (name, CV, its transform): whether
    prefer (heads in `order`, of preference) picks it under one of its transforms. Where it picks another under
    each, the stress batches, which only ever refuse a transform, cannot make it the choice."""
    scored = {k: (c, t) for k, c, t in finished}
    for t in cand.oof:
        cvs = scored | {key: (cand, t)}
        if prefer([(k, cvs[k][0].f1s(cvs[k][1])) for k in order if k in cvs], worst_of(cvs))[0] == key:
            return True
    return False


def heads_to_fit(head) -> int:
    """Heads choose_head cross-validates for these head params: both of AUTO_CANDIDATES for `hidden: auto`."""
    return len(AUTO_CANDIDATES) if head.hidden == "auto" else 1


def describe_choice(choice: dict) -> str:
    h, a = choice["head_choice"], choice["adaptation"]
    scores = ", ".join(f"hidden {k}: {v:.3f}" for k, v in h["cv_macro_f1"].items())
    return f"head {json.dumps(h['chosen'])} ({scores}: {h['why']}); adaptation {a['transform']} ({a['why']})"
