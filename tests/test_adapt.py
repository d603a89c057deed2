"""Adapting a source to the training statistics (pipeline/heads/adapt.py) and measuring it in CV
(pipeline/selection/), on synthetic features where the truth is known: a new source is the training
distribution with every dimension scaled and shifted."""
import dataclasses

import numpy as np
import pytest

from pipeline.data.folds import cv_sources
from pipeline.selection.crossval import cross_validate
from pipeline.data.folds import assign_folds
from pipeline.data.rows import Rows
from pipeline.heads.adapt import (MIN_IMAGES, TRANSFORMS, fit_shift, many_sources_logits_each, source_logits,
                                  source_logits_each, value_order)
from pipeline.heads.sources import rows_logits
from pipeline.heads.fitting import fit_rows
from pipeline.heads.head import softmax
from tests.conftest import params

D, C = 24, 3


def _world(seed: int = 0, n: int = 60, groups: int = 4, separation: float = 1.0):
    """Rows of `groups` sources x `n` images: class means apart in D dims; source g scales every dimension by its
    own factor and shifts it (what a new emoji style does to the features)."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0, separation, (C, D))
    x, y, g = [], [], []
    for s in range(groups):
        scale, shift = rng.uniform(0.3, 3.0, D), rng.normal(0, 3.0, D)
        ys = np.arange(n) % C
        x.append(((means[ys] + rng.normal(0, 1, (n, D))) * scale + shift).astype(np.float32))
        y.append(ys)
        g += [f"style{s}"] * n
    x, y = np.concatenate(x), np.concatenate(y)
    return Rows(labels=y, paths=[f"{i}.png" for i in range(len(y))], sha256=[f"{i:064x}" for i in range(len(y))],
                groups=g, class_names=["a", "b", "c"], fingerprints=[{}], weights_paths=[None], root="", stores=[],
                dim=D, features=x)


def _head(rows, train):
    return fit_rows(rows, train, params(head={"hidden": (), "adapt": "affine"}).head, 0)


def test_a_shifted_new_source_is_recovered_and_a_skewed_known_one_is_left_alone():
    """The gain (a new source, every dimension scaled and shifted) and the safeguard (a batch of the training
    source holding mostly one class keeps its accuracy: the class-mix step reads it as a class mix, not a style)."""
    rows = _world()
    test = np.asarray(rows.groups) == "style3"
    head = _head(rows, ~test)
    x, y = rows.features[test], rows.labels[test]
    acc = {t: float((source_logits(head, x, t)[0].argmax(1) == y).mean()) for t in ("none", "scale", "affine")}
    assert acc["affine"] >= acc["none"] + 0.2 and acc["affine"] >= 0.9, acc
    rows = _world(seed=1, separation=0.8)  # here a class mix started from the training one was misread (0.57)
    head = _head(rows, np.asarray(rows.groups) != "style3")
    known = (np.asarray(rows.groups) != "style3") & ((rows.labels == 0) | (np.arange(len(rows)) % 12 == 1))
    xk, yk = rows.features[known], rows.labels[known]  # class a, and 1 in 12 of b: 80% one class
    assert (yk == 0).mean() >= 0.8
    plain = (source_logits(head, xk, "none")[0].argmax(1) == yk).mean()
    for t in ("scale", "affine"):
        assert (source_logits(head, xk, t)[0].argmax(1) == yk).mean() >= plain - 0.02, t


def test_an_unsure_head_reads_a_two_class_batch_as_two_classes():
    """The class mix is estimated by counting the head's answers, not by its mean probability: a head that answers
    right but unsure (probabilities near even, as on a new source) would read a batch of two classes as a mix of all
    three, centre it on the wrong training statistics and lose accuracy to no adaptation."""
    rows = _world(separation=3.0)
    test = np.asarray(rows.groups) == "style3"
    sure = _head(rows, ~test)
    *hidden, (w, b) = sure.layers
    unsure = dataclasses.replace(sure, layers=[*hidden, (w / 50, b / 50)])  # the same answers, softer
    known = ~test & (rows.labels < 2)  # a training source's images of classes a and b only
    x, y = rows.features[known], rows.labels[known]
    assert (unsure.logits(x).argmax(1) == y).mean() > 0.95 and softmax(unsure.logits(x)).max(1).mean() < 0.5
    adapted, shift = source_logits(unsure, x, "affine")
    np.testing.assert_allclose(shift.class_mix, np.bincount(y, minlength=C) / len(y), atol=0.05)
    plain = (unsure.logits(x).argmax(1) == y).mean()
    assert (adapted.argmax(1) == y).mean() >= plain - 0.02


def test_fewer_than_min_images_are_never_adapted():
    rows = _world()
    head = _head(rows, np.asarray(rows.groups) != "style3")
    x = rows.features[np.asarray(rows.groups) == "style3"]
    for n in (1, 2, MIN_IMAGES - 1):
        logits, shift = source_logits(head, x[:n], "affine")
        assert shift is None and np.array_equal(logits, source_logits(head, x[:n], "none")[0])
    assert source_logits(head, x[:MIN_IMAGES], "affine")[1] is not None


def test_adaptation_does_not_depend_on_the_order_of_the_images():
    rows = _world()
    head = _head(rows, np.asarray(rows.groups) != "style3")
    x = rows.features[np.asarray(rows.groups) == "style3"]
    perm = np.random.default_rng(1).permutation(len(x))
    for t in ("scale", "affine"):
        (a, sa), (b, sb) = source_logits(head, x, t), source_logits(head, x[perm], t)
        assert np.array_equal(a[perm], b), t  # bit for bit, not merely close
        # ...down to the float64 statistics, where a sum in another order differs in its last bits
        assert np.array_equal(sa.ratio, sb.ratio) and np.array_equal(sa.offset, sb.offset), t
    assert sorted(value_order(x[perm])) == list(range(len(x)))


def test_the_value_order_of_rows_is_the_same_whatever_order_they_come_in():
    """Rows alike but in their last byte, with zero bytes, duplicated: the same rows in the same order from any
    permutation of them (a sort that stopped at a zero byte, or at the first dimensions, would not)."""
    rng = np.random.default_rng(0)
    x = np.zeros((40, 6), np.float32)
    x[:, -1] = rng.integers(0, 3, 40)  # alike but in the last dimension, many zero bytes
    x[:10, 0] = np.nextafter(np.float32(1), np.float32(2))  # ...or in one bit of the first
    x[10:20, 2] = -0.0
    x = np.concatenate([x, x[:7]])  # and duplicates
    want = x[value_order(x)]
    for seed in range(5):
        y = x[np.random.default_rng(seed).permutation(len(x))]
        assert np.array_equal(y[value_order(y)].view(np.uint32), want.view(np.uint32)), seed


@pytest.mark.parametrize("hidden", [(), (16,)])
def test_many_sources_at_once_are_each_adapted_as_alone(hidden):
    """CV's stress batches are adapted many at a time (many_sources_logits_each): each source by its own
    statistics and class mix, as source_logits_each adapts it alone, a source too small left as it is. The
    sources come from differently shifted styles, so statistics shared or cut at the wrong row would show."""
    rows = _world()
    head = fit_rows(rows, np.asarray(rows.groups) == "style0", params(head={"hidden": hidden}).head, 0)
    rng = np.random.default_rng(2)
    parts = [rng.choice(np.flatnonzero(np.asarray(rows.groups) == f"style{1 + i % 3}"), size, replace=False)
             for i, size in enumerate((5, MIN_IMAGES - 1, 40, 10, 60, 1, 7))]
    many = many_sources_logits_each(head, rows.features[np.concatenate(parts)], [len(p) for p in parts], TRANSFORMS)
    alone = [source_logits_each(head, rows.features[p], TRANSFORMS) for p in parts]
    for t in TRANSFORMS:
        expected = np.concatenate([a[t][0] for a in alone])  # (R, C)
        assert np.allclose(many[t], expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max()), t
        assert np.array_equal(many[t].argmax(1), expected.argmax(1)), t
    assert not np.allclose(many["affine"], many["none"])  # the sources were adapted: the check above had teeth


def test_held_out_statistics_use_no_labels():
    """The test part's labels never reach its adaptation: permuting them leaves every logit as it was."""
    rows = _world()
    test = np.asarray(rows.groups) == "style3"
    head = _head(rows, ~test)
    shuffled = rows.labels.copy()
    shuffled[test] = np.random.default_rng(2).permutation(shuffled[test])
    sources = np.asarray(rows.groups)
    a = rows_logits(head, rows, test, sources, "affine")[0]
    b = rows_logits(head, dataclasses.replace(rows, labels=shuffled), test, sources, "affine")[0]
    assert np.array_equal(a, b)


def test_each_cv_group_is_adapted_by_its_own_statistics():
    """In grouped CV each held-out group is one source, adapted by its own images' statistics only: not the
    training groups', not the whole fold's (two groups then share a fold)."""
    rows = _world(groups=6)
    p = params(head={"hidden": (), "adapt": "affine"}, cv={"folds": 3})
    fold = assign_folds(labels=rows.labels, groups=rows.groups, sha256=rows.sha256, k=3, class_names=rows.class_names,
                        random_state=0)
    cand = cross_validate(rows, fold, p, ("none", "affine"), None)
    groups = np.asarray(rows.groups)
    j = 0
    head = fit_rows(rows, fold != j, p.head, p.cv.seed + j)  # the fold's own head, as cross_validate fits it
    held = sorted(set(groups[fold == j]))
    assert len(held) == 2
    for g in held:
        own = groups == g
        assert np.array_equal(cand.oof["affine"][own], source_logits(head, rows.features[own], "affine")[0])
    both = fold == j  # adapting the fold as one source gives other logits: the test can tell the two apart
    assert not np.allclose(cand.oof["affine"][both], source_logits(head, rows.features[both], "affine")[0])
    assert (cand.oof["affine"][fold >= 0].argmax(1) == rows.labels).mean() > \
        (cand.oof["none"][fold >= 0].argmax(1) == rows.labels).mean() + 0.1
    assert set(cv_sources(None, fold)) == {"fold 1", "fold 2", "fold 3"}


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_a_streamed_store_adapts_as_the_array_does_in_any_row_order(transform, tmp_path):
    """rows_logits over blocks read from a store whose rows are in another order (store order) gives the in-memory
    path's predictions (value order), image for image: the same labels, the logits within float rounding (the
    streamed sums run in store order)."""
    rows = _world(groups=5)
    groups = np.asarray(rows.groups)
    head = _head(rows, groups != "style3")
    perm = np.random.default_rng(3).permutation(len(rows.labels))  # the store's rows in another order

    class Streamed:  # the parts of Rows rows_logits reads, the features only through blocks
        in_memory, labels = False, rows.labels[perm]

        def __len__(self):
            return len(perm)

        def blocks(self, mask=None):
            for s in range(0, len(perm), 50):
                yield s, rows.features[perm[s:s + 50]]

    held = np.isin(groups, ["style3", "style4"])  # two sources, each adapted on its own
    a = rows_logits(head, rows, held, groups, transform)
    b = rows_logits(head, Streamed(), held[perm], groups[perm], transform)
    order = np.argsort(perm[held[perm]])  # b's rows in a's (the in-memory store's) order
    np.testing.assert_array_equal(a[0].argmax(1), b[0][order].argmax(1))
    np.testing.assert_allclose(a[0], b[0][order], atol=1e-5)
    assert a[2] == b[2]  # each source adapted (or not) alike
    assert fit_shift(head, lambda: iter([rows.features[groups == "style3"]]), transform) is not None or \
        transform == "none"


@pytest.mark.parametrize("edit", [{"prior_images": 16}, {"class_mix_steps": None}, {"class_mix": "probabilities"},
                                  {"transform": "rank"}])
def test_a_model_adapted_by_another_recipe_is_refused_naming_the_file(tmp_path, edit):
    """model.json records the adaptation recipe (heads/adapt.RECIPE) and its transform; a model made with another
    one would predict other numbers here, so loading it is one line naming model.json."""
    import json
    from features.errors import UserError
    from tests.synthetic import synthetic_store
    from pipeline.inference.modeldir import load_model_dir
    from pipeline.stages.train import train_head
    store = synthetic_store(tmp_path / "s.h5", n=120, dim=8, groups=3)
    train_head(stores=[store], out=str(tmp_path / "m"), progress=lambda s: None,
               params=params(head={"hidden": [], "adapt": "affine"}, cv={"folds": 3, "repeats": 1}))
    load_model_dir(tmp_path / "m")  # as written: loads
    f = tmp_path / "m" / "model.json"
    meta = json.loads(f.read_text())
    meta["adaptation"] |= edit
    f.write_text(json.dumps(meta))
    with pytest.raises(UserError, match=f"{f}: .*(another recipe|must name a transform)"):
        load_model_dir(tmp_path / "m")
