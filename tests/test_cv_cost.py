"""What stage two shares, skips and stops early to stay fast (issue #40), and that none of it changes a result
it did not say it changed: shared passes give the same logits, shared statistics the same numbers, a skipped or
stopped phase is said in metrics.json and on the summary line."""
import dataclasses
import sys
import threading

import numpy as np
import pytest

import pipeline.selection.crossval as crossval
import pipeline.selection.foldwork as foldwork
import pipeline.selection.heads as selection
import pipeline.stages.train as train
from tests.synthetic import synthetic_store
from pipeline.analysis.noise import t975
from pipeline.selection.crossval import Candidate, behind, cross_validate
from pipeline.data.rows import open_rows
from pipeline.heads import adapt, sources as per_source_loop
from pipeline.heads import fitting
from pipeline.heads.fitting import fit_rows, make_head
from pipeline.heads.head import one_blas_thread
from features.input.prefetch import available_cores
from pipeline.stages.train import summary_line, train_head
from tests.conftest import params
from tests.test_adapt import _world


def _fold_rows(seed=0, separation=1.0):
    rows = _world(seed=seed, separation=separation)
    test = np.asarray(rows.groups) == "style3"
    return rows, test, fit_rows(rows, ~test, params(head={"hidden": (), "adapt": "affine"}).head, 0)


def test_transforms_fitted_together_equal_each_fitted_alone():
    """source_logits_each shares the value order, the moments and the unadapted class mix between transforms: the
    logits and shifts are those of each transform fitted on its own, bit for bit, for a large and a small source,
    and where the transforms' class-mix steps end apart (classes close together: each starts from the mix as is)."""
    rows, test, head = _fold_rows()
    hard_rows, hard_test, hard_head = _fold_rows(seed=1, separation=0.3)
    for head, x in ((head, rows.features[test]), (head, rows.features[test][:3]),
                    (hard_head, hard_rows.features[hard_test])):
        together = adapt.source_logits_each(head, x, adapt.TRANSFORMS)
        for t in adapt.TRANSFORMS:
            alone, shift = adapt.source_logits(head, x, t)
            assert np.array_equal(together[t][0], alone), t
            assert (shift is None) == (together[t][1] is None), t
            if shift is not None:
                assert np.array_equal(shift.ratio, together[t][1].ratio) and np.array_equal(shift.offset,
                                                                                            together[t][1].offset)


def test_a_shift_folded_into_the_head_predicts_as_the_adapted_features_do():
    """Shift.adapt(head) moves the shift into the head's standardisation: the same logits as the head on the
    adapted features, to float32 rounding."""
    rows, test, head = _fold_rows()
    x = rows.features[test]
    shift = adapt.source_logits(head, x, "affine")[1]
    assert shift is not None and np.abs(shift.offset).max() > 0.5  # a real shift, not the identity
    np.testing.assert_allclose(shift.adapt(head).logits(x), head.logits(shift.apply(x)), rtol=1e-4, atol=1e-4)


def test_reference_statistics_are_the_float64_class_moments_whatever_the_row_order():
    rng = np.random.default_rng(0)
    x, y = (rng.normal(3, 2, (500, 6)) ** 2).astype(np.float32), rng.integers(0, 4, 500)
    y[y == 2] = 1  # a class without rows
    ref = adapt.fit_reference([(x[:200], y[:200]), (x[200:], y[200:])], 4)
    x64 = x.astype(np.float64)
    for c in (0, 1, 3):
        np.testing.assert_allclose(ref.mean[c], x64[y == c].mean(0), rtol=1e-6)
        np.testing.assert_allclose(ref.sq[c], (x64[y == c] ** 2).mean(0), rtol=1e-6)
    assert not ref.mean[2].any() and ref.prior[2] == 0 and abs(ref.prior.sum() - 1) < 1e-6
    perm = rng.permutation(500)
    again = adapt.fit_reference([(x[perm], y[perm])], 4)
    np.testing.assert_allclose(again.mean, ref.mean, rtol=1e-6)


def test_cv_without_adaptation_computes_no_statistics_and_no_stress_batches(monkeypatch):
    """adapt: none (and align: none) never uses the training statistics or the stress batches: neither is
    computed. With align: groups the statistics are computed (the groups are aligned to them), the stress batches
    still not."""
    rows, _, _ = _fold_rows()
    real = fitting.training_view
    monkeypatch.setattr(fitting, "training_view", lambda *a: pytest.fail("statistics computed for 'none'"))
    monkeypatch.setattr(fitting, "class_sums", lambda *a: pytest.fail("statistics computed for 'none'"))
    monkeypatch.setattr(crossval, "stress_batches", lambda *a: pytest.fail("stress batches drawn for 'none'"))
    fold = np.arange(len(rows)) % 3
    cand = cross_validate(rows, fold, params(head={"hidden": (), "adapt": "none", "align": "none"}), ("none",), None)
    assert len(cand.per_fold["none"]) == 3
    monkeypatch.setattr(fitting, "class_sums", adapt.class_sums)
    calls = []
    monkeypatch.setattr(fitting, "training_view", lambda *a: calls.append(1) or real(*a))
    cross_validate(rows, fold, params(head={"hidden": (), "adapt": "none", "align": "groups"}), ("none",), None)
    assert len(calls) == 3


def test_the_heads_of_one_cv_share_each_folds_statistics(monkeypatch):
    """The training statistics of a fold are the same rows whatever the head: each fold's view made once, and
    every fold's statistics from one pass over the rows."""
    rows, _, _ = _fold_rows()
    calls, passes = [], []
    real, sums = fitting.training_view, fitting.class_sums
    monkeypatch.setattr(fitting, "training_view", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(fitting, "class_sums", lambda *a: passes.append(1) or sums(*a))
    selection.choose_head(rows, np.arange(len(rows)) % 3, params(head={"hidden": "auto", "epochs": 3}, cv={"folds": 3}),
                      None)
    assert len(calls) == 3 and len(passes) == 1


def test_the_heads_of_one_cv_share_one_array_of_sources(monkeypatch):
    """Each row's CV source (an (N,) string array: 4.5 MB for 160,000 rows) is made once per fold assignment, for
    every head's fold tasks and records alike (FoldViews.sources): two copies lifted a streamed store's peak
    memory past its stated bound (tests/test_rows.py)."""
    rows, _, _ = _fold_rows()
    calls = []
    real = fitting.cv_sources
    monkeypatch.setattr(fitting, "cv_sources", lambda *a: calls.append(1) or real(*a))
    for name, module in list(sys.modules.items()):  # any other module of the pipeline that could make them again
        if name.startswith("pipeline.") and name not in ("pipeline.data.folds", "pipeline.heads.fitting") and \
                hasattr(module, "cv_sources"):
            monkeypatch.setattr(module, "cv_sources",
                                lambda *a, name=name: pytest.fail(f"sources made again ({name})"))
    selection.choose_head(rows, np.arange(len(rows)) % 3, params(head={"hidden": "auto", "epochs": 3}, cv={"folds": 3}),
                          None)
    assert len(calls) == 1


@pytest.mark.parametrize("streamed", [False, True])
def test_each_folds_statistics_from_one_pass_are_those_of_its_training_rows(tmp_path, streamed):
    """FoldViews' one pass (class sums per fold, each fold's the sum over the others) gives each fold the
    statistics of its own training rows, a class missing from some fold included; in memory and streamed."""
    store = synthetic_store(tmp_path / "s.h5", n=40_000, dim=8, classes=4, random_state=3)  # 1.3 MB > 1 MB
    rows = open_rows([store], memory_budget_mb=1 if streamed else 0)
    assert rows.in_memory != streamed
    fold = np.arange(len(rows)) % 3
    fold[rows.labels == 2] = 0  # class 2 only in fold 0: fold 0's training rows lack it
    views = fitting.FoldViews(rows, fold)
    for j in (0, 1, 2, "every fold"):  # ...and the final fit the statistics of every labelled row
        train = (rows.labels >= 0) & (fold != j)
        got = (views.whole("none") if j == "every fold" else views.get(j, "none")).reference
        direct = fitting.training_reference(rows, train)
        for a, b in ((got.mean, direct.mean), (got.sq, direct.sq), (got.prior, direct.prior)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert views.get(1, "none").reference.prior[2] > 0 and views.get(0, "none").reference.prior[2] == 0


def test_train_head_makes_one_pass_for_every_folds_statistics_and_the_final_fits(tmp_path, monkeypatch):
    """CV's folds and the final fit share FoldViews: one pass over the rows for all of their statistics (without
    a group column: with one, each view's aligned rows need their own, heads/align.py)."""
    passes = []
    sums = adapt.class_sums
    for module in (fitting, adapt):  # FoldViews' pass, and any other (adapt.fit_reference)
        monkeypatch.setattr(module, "class_sums", lambda *a: passes.append(1) or sums(*a))
    store = synthetic_store(tmp_path / "s.h5", n=300, dim=8, classes=3, random_state=0)
    train_head(stores=[str(store)], out=str(tmp_path / "m"), progress=lambda line: None,
               params=params(head={"hidden": (), "adapt": "auto"}, cv={"folds": 3, "repeats": 1}))
    assert len(passes) == 1


def test_logits_from_the_class_mix_steps_are_those_of_the_shift_they_settle_on(monkeypatch):
    """Where the class-mix steps reach a fixed point their last pass is kept as the answer (adapt.shifted_logits):
    it equals a pass under the returned Shift, bit for bit; where they do not, the pass is made. Both happen here."""
    ends, real = [], adapt.settled

    def spy(step, pi):
        out = real(step, pi)
        ends.append(out[1] is not None)  # a fixed point: its logits are kept
        return out
    monkeypatch.setattr(adapt, "settled", spy)
    for seed, separation in ((0, 1.0), (1, 0.3), (2, 0.1)):
        rows, test, head = _fold_rows(seed=seed, separation=separation)
        x = rows.features[test]
        chunks = lambda: (x[i:i + 7] for i in range(0, len(x), 7))  # noqa: E731 - several chunks per pass
        for t, (logits, shift) in adapt.shifted_logits(head, chunks, adapt.TRANSFORMS).items():
            assert np.array_equal(logits, np.concatenate([shift.adapt(head).logits(c) for c in chunks()])), t
    assert True in ends and False in ends


def test_a_candidate_clearly_behind_stops_its_cv_and_a_close_one_does_not():
    check = behind("[]", [0.94, 0.93, 0.95, 0.94, 0.92], 5)

    def cand(scores):
        return Candidate(None, {}, {"none": [{"macro_f1": v} for v in scores], "affine": [{"macro_f1": v - 0.01}
                                                                                          for v in scores]})
    assert check(cand([0.83])) is None  # one fold: no noise to weigh the gap against
    why = check(cand([0.83, 0.82]))
    assert why and why.startswith("its CV stopped after 2 of 5 folds, [] ahead by 0.110"), why
    assert check(cand([0.95, 0.90])) is None  # behind by 0.01 on average, but not on every fold: inside the noise
    assert check(cand([0.93, 0.92, 0.945])) is None  # behind by 0.008 +- 0.004: beyond 95%, not beyond 99%


def test_cross_validate_stops_where_give_up_says_and_records_why(tmp_path):
    rows, _, _ = _fold_rows()
    fold = np.arange(len(rows)) % 4
    seen = []
    cand = cross_validate(rows, fold, params(head={"hidden": (), "adapt": "none"}), ("none",), None,
                          on_fold=lambda: seen.append(1),
                          give_up=lambda c: "enough" if len(c.per_fold["none"]) == 2 else None)
    assert len(seen) == 2 and cand.stopped == "enough" and len(cand.f1s("none")) == 2


def test_the_99_percent_quantile_is_students_t():
    from scipy.stats import t
    for df in range(1, 200):
        assert abs(t975(df, crossval.T995, 2.575829) - t.ppf(0.995, df)) < 0.002, df


def test_repeats_are_skipped_where_the_spread_across_folds_bounds_them_and_the_summary_says_so(tmp_path):
    """cv.repeats CV runs where the spread across folds / sqrt(folds) allows reseeding to move the score by
    REPEATS_NOISE; one where it does not (every fold perfect: nothing to move), said in metrics.json and on the
    summary line with the bound. The progress lines count the fits made, whole: skipped runs are not counted."""
    p = params(head={"hidden": (), "adapt": "none"}, cv={"folds": 3, "repeats": 3})
    hard = synthetic_store(tmp_path / "hard.h5", n=120, dim=8, separation=0.4)
    said = []
    m = train_head(stores=[hard], out=str(tmp_path / "a"), params=p, progress=said.append)
    f1s = [f["macro_f1"] for f in m["cv"]["per_fold"]]
    assert np.std(f1s) / np.sqrt(3) >= train.REPEATS_NOISE  # the premise: folds apart
    assert len(m["cv"]["repeats"]) == 3 and "repeats_skipped" not in m["cv"]
    counts = [line.split(": ", 1)[1] for line in said if line.endswith(" done")]
    assert counts == [f"fit {i} of 3 done" for i in (1, 2, 3)] + [f"reseeded fit {i} of 6 done" for i in range(1, 7)]
    easy = synthetic_store(tmp_path / "easy.h5", n=120, dim=8, separation=10.0)
    said = []
    m = train_head(stores=[easy], out=str(tmp_path / "b"), params=p, progress=said.append)
    assert [f["macro_f1"] for f in m["cv"]["per_fold"]] == [1.0] * 3
    assert len(m["cv"]["repeats"]) == 1
    assert m["cv"]["repeats_skipped"].startswith("2 of cv.repeats 3 skipped: the spread across folds (± 0.0000 over "
                                                 "3) bounds the mean's run-to-run noise by ± 0.0000")
    assert "reseeded runs: 2 of cv.repeats 3 skipped" in summary_line("b", m)
    assert any("reseeded runs: 2 of cv.repeats 3 skipped" in line for line in said)
    counts = [line.split(": ", 1)[1] for line in said if line.endswith(" done")]
    assert counts == [f"fit {i} of 3 done" for i in (1, 2, 3)]  # the skipped runs' fits are not promised
    assert set(m["phase_seconds"]) >= {"read", "CV []", "final fit", "calibration"}


def test_rows_fitted_together_per_source_equal_each_transform_alone():
    """rows_logits_each (several sources, several transforms) = rows_logits one transform at a time."""
    rows, test, head = _fold_rows(seed=2)
    sources = np.asarray(rows.groups)
    mask = np.ones(len(rows), bool)
    together = per_source_loop.rows_logits_each(head, rows, mask, sources, adapt.TRANSFORMS)
    for t in adapt.TRANSFORMS:
        logits, said, per_source = per_source_loop.rows_logits(head, rows, mask, sources, t)
        assert np.array_equal(together[t][0], logits) and together[t][1] == said and together[t][2] == per_source


@pytest.mark.parametrize("groups", [None, 3])
def test_train_head_says_on_the_terminal_when_there_is_no_group_column(tmp_path, groups):
    """Issue #42: without a group column only metrics.json said that CV could not measure a new source."""
    from tests.conftest import ROOT, run_cli
    store = synthetic_store(tmp_path / "s.h5", n=240, dim=8, groups=groups)
    text = (ROOT / "params.yaml").read_text().replace("hidden: auto ", "hidden: [] ").replace("repeats: 3 ", "repeats: 1 ")
    (tmp_path / "p.yaml").write_text(text)
    r = run_cli("train-head", store, "--out", str(tmp_path / "m"), "--params", str(tmp_path / "p.yaml"))
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip().splitlines()) == 1  # the one summary line
    note = "note: no group column, so CV tested new images of the training sources, never a new source"
    assert (note in r.stderr) == (groups is None), r.stderr


def test_predicts_summary_says_once_that_an_adapted_label_depends_on_the_other_images():
    """Issue #42: the screen said '1 source adapted (affine)' and nothing of what that means for a label."""
    from types import SimpleNamespace
    from pipeline.heads.sources import Adapted
    from pipeline.inference.summary import adaptation_note
    both = {"a": Adapted("affine", 6), "b": Adapted(None, 2, too_small=True)}
    adapted = adaptation_note(SimpleNamespace(sources=["a"] * 6 + ["b"] * 2, per_source=both))
    assert adapted.startswith("1 source adapted (affine); 1 source too small to adapt (2 images < 5)")
    assert adapted.count("depends on the other images passed with it; --source none labels each image") == 1
    small = adaptation_note(SimpleNamespace(sources=["b"] * 2, per_source={"b": both["b"]}))
    assert "depends on" not in small and small == "1 source too small to adapt (2 images < 5)"


def test_metrics_json_holds_headline_numbers_and_details_json_the_rest(tmp_path):
    """Issue #42: metrics.json held text ('+0.060 ± 0.021', 'affine scored highest'), a column each in
    `dvc metrics show`. Numbers only there, rounded to the 4 decimals they are read at; the whys in details.json."""
    import json
    store = synthetic_store(tmp_path / "s.h5", n=300, dim=8, groups=3)
    m = train_head(stores=[store], out=str(tmp_path / "m"), params=params(cv={"folds": 3, "repeats": 2},
                                                                        head={"hidden": "auto", "epochs": 5}),
                   progress=lambda line: None)
    top = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert set(top["cv"]) == set(train.HEADLINE["cv"]) and list(top) == ["cv"]
    assert all(isinstance(v, (int, float)) and round(v, 4) == v for v in top["cv"].values()), top
    details = json.loads((tmp_path / "m" / "details.json").read_text())
    assert details["head_choice"]["why"] == m["head_choice"]["why"] and "adaptation" in details
    assert top["cv"]["macro_f1_mean"] == round(details["cv"]["macro_f1_mean"], 4)


def test_stress_batches_score_as_each_batch_alone_whatever_their_sizes():
    """score_stress adapts batches under ALONE_ROWS many at a time and bigger ones alone: each batch's accuracy
    is the one it gets adapted alone, in the batches' order, with only big, only small or both kinds, and with
    the rows read in parts (a streamed store's cap)."""
    rows = _world(n=120)
    head = fit_rows(rows, np.asarray(rows.groups) != "style3", params(head={"hidden": (), "adapt": "affine"}).head, 0)
    rng = np.random.default_rng(0)
    held = np.flatnonzero(np.asarray(rows.groups) == "style3")
    big = [("two classes", rng.choice(held, crossval.ALONE_ROWS + i, replace=False)) for i in range(2)]
    small = [("5 images", rng.choice(held, 5, replace=False)) for _ in range(3)]
    for batches, max_rows in (big, None), (small, None), ([small[0], big[0], small[1], big[1], small[2]], None), \
            ([small[0], big[0], small[1], big[1], small[2]], 70):  # 70: read in parts of consecutive batches
        hits = {t: {k: [] for k in crossval.STRESS} for t in ("none", "affine")}
        crossval.score_stress(head, rows, batches, ("none", "affine"), hits, max_rows)
        for t in ("none", "affine"):
            alone = {k: [] for k in crossval.STRESS}
            for kind, b in batches:
                logits = adapt.source_logits(head, rows.features[b], t)[0]
                alone[kind].append(float((logits.argmax(1) == rows.labels[b]).mean()))
            assert hits[t] == alone, (t, batches)


def test_fold_tasks_on_any_number_of_workers_give_what_one_at_a_time_gives(monkeypatch):
    """CV's fold tasks run on a FoldPool (selection/foldwork.py), several at once: on 1, 2 or 3 workers every
    out-of-fold logit, stress score and per-fold figure is the same, bit for bit, in a CV that gives up after 2
    folds too; and torch's global random state is left as it was."""
    import torch
    from pipeline.data.folds import assign_folds
    rows = _world(groups=6)
    fold = assign_folds(labels=rows.labels, groups=rows.groups, sha256=rows.sha256, k=3,
                        class_names=rows.class_names, random_state=0)
    p = params(head={"hidden": (16,), "adapt": "affine", "epochs": 20}, cv={"folds": 3})
    assert foldwork.workers_for(rows, p) == available_cores()  # a few KiB of rows: one task per core
    before = torch.get_rng_state()
    cands, stopped = {}, {}
    for n in (1, 2, 3):  # 1: in the reader's thread; 2: two tasks at once, then the third
        monkeypatch.setattr(foldwork, "workers_for", lambda rows, params, n=n: n)
        with one_blas_thread():  # as a pool of several runs its products (one worker's would use every core)
            cands[n] = cross_validate(rows, fold, p, ("none", "affine"), None)
            stopped[n] = cross_validate(rows, fold, p, ("none", "affine"), None,  # gives up after 2 folds
                                        give_up=lambda cand: "enough" if len(cand.f1s("none")) == 2 else None)
    for runs in cands, stopped:
        for a, b in (runs[1], runs[2]), (runs[1], runs[3]):
            for t in ("none", "affine"):
                assert np.array_equal(a.oof[t], b.oof[t]) and a.per_fold[t] == b.per_fold[t]
            assert a.stress == b.stress and a.stress["affine"] and np.array_equal(a.scored, b.scored)
    assert stopped[2].stopped == "enough" and len(stopped[2].f1s("none")) == 2 and not stopped[2].scored.all()
    assert torch.equal(before, torch.get_rng_state())


def test_a_cv_that_gives_up_starts_no_more_tasks_and_stops_its_running_fits():
    """Run.stop: the tasks still queued never start, and a running one sees stopped() (its fit ends at its next
    check). Two workers, four folds: the first two tasks hold their workers until the stop, so the other two are
    still queued then, whatever the timing."""
    started, saw, both, release = [], {}, threading.Barrier(3, timeout=30), threading.Event()

    def task(j, stopped):
        started.append(j)
        both.wait()  # folds 0 and 1 are running, on the two workers
        release.wait(timeout=30)
        saw[j] = stopped()
        return j
    with foldwork.FoldPool(None, None, workers=2) as pool:
        run = pool.start(task, range(4))
        both.wait()
        run.stop()
        release.set()
    assert sorted(started) == [0, 1] and saw == {0: True, 1: True}
    assert all(f.cancelled() for _, f in run.futures[2:])


def test_the_final_fit_queued_beside_cv_is_the_one_fitted_after_the_choice(tmp_path, monkeypatch):
    """choose_head(final_fit=True) queues every candidate's final fit behind the CV's folds and keeps the chosen
    one's: the head it returns is the one fitted on every labelled row after the choice, bit for bit, statistics
    included, for forced heads and for `auto` choosing either head; with a leader (sweep) a CV may stop, so there
    is none."""
    from pipeline.data.folds import assign_folds
    monkeypatch.setattr(foldwork, "workers_for", lambda rows, params: 2)
    styles = _world(groups=6)
    many = open_rows([synthetic_store(tmp_path / "s.h5", n=600, dim=16, classes=20, separation=0.3, groups=4,
                                      random_state=0)])  # 20 classes: [256] loses, [] is chosen
    cases = [(styles, {"hidden": ()}, ()), (styles, {"hidden": (16,)}, (16,)), (styles, {"hidden": "auto"}, (256,)),
             (many, {"hidden": "auto", "epochs": 5, "lr": 3e-4}, ())]
    for world, head, expect in cases:
        fold = assign_folds(labels=world.labels, groups=world.groups, sha256=world.sha256, k=3,
                            class_names=world.class_names, random_state=0)
        p = params(head={"adapt": "auto", "epochs": 20} | head, cv={"folds": 3})
        with one_blas_thread():  # as the pool's workers compute
            choice = selection.choose_head(world, fold, p, None, final_fit=True)
            after = fitting.fit_final(world, choice.params.head, p.cv.seed, None, fitting.FoldViews(world, fold))
        got = choice.final
        assert choice.params.head.hidden == expect and got is not None and len(got.layers) == len(after.layers)
        for a, b in [*zip(got.layers, after.layers), ((got.mean, got.scale), (after.mean, after.scale)),
                     ((got.reference.mean, got.reference.sq), (after.reference.mean, after.reference.sq))]:
            assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
        assert selection.choose_head(world, fold, p, None).final is None  # not asked for
    forced = params(head={"hidden": (), "epochs": 20}, cv={"folds": 3})
    assert selection.choose_head(styles, np.arange(len(styles)) % 3, forced, None, leader=("best", [0.5] * 3),
                                 final_fit=True).final is None


@pytest.mark.parametrize("hidden", [(), (16,)])
def test_a_fit_asked_to_stop_ends_at_its_first_check(hidden):
    """The estimators' stop(): asked at each check (the linear head: each L-BFGS iteration), True ends the fit."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(600, 8)).astype(np.float32), rng.integers(0, 3, 600)
    head = make_head(params(head={"hidden": hidden, "epochs": 50, "patience": 100}).head, 3, 0)
    whole = make_head(params(head={"hidden": hidden, "epochs": 50, "patience": 100}).head, 3, 0).fit(x, y)
    head.fit(x, y, stop=lambda: True)
    if hidden:
        assert head.n_steps_ == 5 < whole.n_steps_  # one epoch of 5 batches of 128: the first check
    else:
        assert head.n_iter_ == 1 < whole.n_iter_


@pytest.mark.parametrize("classes, n, lr, vetted", [(20, 600, 3e-4, [()]), (10, 400, 1e-3, [(), (256,)])])
def test_a_head_that_loses_under_every_transform_is_not_stress_tested_and_the_choice_is_the_same(
        tmp_path, monkeypatch, classes, n, lr, vetted):
    """The stress batches only ever refuse a transform: a head that loses to the other under each of its
    transforms cannot be chosen whatever they say, and its are not scored (selection/heads.could_win). The choice
    is the one every head stress-tested gives; where the losing head wins under one of its transforms (the second
    case) it is stress-tested."""
    store = synthetic_store(tmp_path / "s.h5", n=n, dim=16, classes=classes, separation=0.3, groups=4, random_state=0)
    rows, fold = open_rows([store]), np.arange(n) % 4
    p = params(head={"hidden": "auto", "epochs": 5, "lr": lr}, cv={"folds": 4})
    calls, real = [], selection.score_stress_batches
    monkeypatch.setattr(selection, "score_stress_batches",
                        lambda cand, *a, **k: calls.append(cand.params.head.hidden) or real(cand, *a, **k))
    lazy = selection.choose_head(rows, fold, p, None)
    assert calls == vetted and lazy.record["head_choice"]["chosen"] == [] and lazy.stopped is None
    monkeypatch.setattr(selection, "could_win", lambda *a: True)  # every head stress-tested
    full = selection.choose_head(rows, fold, p, None)
    assert (full.transform, full.record["adaptation"]) == (lazy.transform, lazy.record["adaptation"])
    assert np.array_equal(full.cv.oof[full.transform], lazy.cv.oof[lazy.transform])
    assert ("its stress batches were not scored" in lazy.record["head_choice"]["why"]) == (vetted == [()])
