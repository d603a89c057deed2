"""Each training group aligned onto the training statistics before the head is fitted (pipeline/heads/align.py):
what it maps, what it leaves alone, that a streamed store gets the same, and that CV aligns on training rows only."""
import dataclasses
import json

import numpy as np

from tests.synthetic import synthetic_store
from pipeline.selection.crossval import cross_validate
from pipeline.data.rows import open_rows
from pipeline.heads.adapt import MIN_IMAGES, source_logits
from pipeline.heads.align import fit_alignment
from pipeline.heads.fitting import FoldViews, fit_rows, training_reference, training_view
from tests.conftest import params
from tests.test_adapt import _world


def test_each_group_is_mapped_by_its_own_shift_and_reads_the_same_every_way():
    """take, features_of and blocks give each group's rows mapped by that group's Shift; rows outside `train`
    are read as every other row of their group."""
    rows = _world()
    train = np.asarray(rows.groups) != "style3"
    ref = training_reference(rows, train)
    al = fit_alignment(rows, train, ref)
    assert set(al.rows.shifts) == {"style0", "style1", "style2"}  # style3 is not in training: never mapped
    expect = rows.features.copy()
    for g, shift in al.rows.shifts.items():
        m = np.asarray(rows.groups) == g
        expect[m] = shift.apply(rows.features[m])
    mask = np.arange(len(rows)) % 3 != 1
    np.testing.assert_array_equal(al.rows.take(mask), expect[mask])
    np.testing.assert_array_equal(al.rows.features_of(mask), expect[mask])
    np.testing.assert_array_equal(np.concatenate([x for _, x in al.rows.blocks()]), expect)
    assert not np.array_equal(expect[train], rows.features[train])
    # the aligned groups now share their statistics: each group's mean moves to the training centre of its mix
    # (all the way but for the prior's pull, PRIOR_IMAGES against the group's 60 images)
    for g in al.rows.shifts:
        m = np.asarray(rows.groups) == g
        centre, _ = ref.moments(np.bincount(rows.labels[m], minlength=3) / m.sum())
        assert np.abs(expect[m].mean(0) - centre).mean() < 0.3 * np.abs(rows.features[m].mean(0) - centre).mean()


def test_a_group_holding_mostly_one_class_is_not_pulled_onto_the_average():
    """Alignment uses each group's true class mix: a group of the training distribution that holds mostly one
    class is left (nearly) as it is, where standardising it by its own mean would move it onto the others."""
    rows = _world(groups=1, n=300)  # one style; split it into a balanced group and a skewed one
    skewed = (rows.labels == 0) | (np.arange(len(rows)) % 10 == 1)
    rows = dataclasses.replace(rows, groups=np.where(skewed, "skewed", "rest").tolist())
    train = np.ones(len(rows), bool)
    al = fit_alignment(rows, train, training_reference(rows, train))
    shift = al.rows.shifts["skewed"]
    naive = rows.features[skewed].mean(0) - rows.features.mean(0)  # what a class-blind centring would move
    assert np.abs(shift.offset).mean() < 0.25 * np.abs(naive).mean()
    assert np.abs(np.log(shift.ratio)).mean() < 0.2


def test_a_group_too_small_to_adapt_is_not_aligned_either():
    rows = _world(n=60)
    small = (np.asarray(rows.groups) == "style2") & (np.arange(len(rows)) % 60 < 60 - (MIN_IMAGES - 1))
    train = ~small  # style2 keeps MIN_IMAGES - 1 training rows
    al = fit_alignment(rows, train, training_reference(rows, train))
    assert "style2" not in al.rows.shifts and len(al.rows.shifts) == 3
    m = train & (np.asarray(rows.groups) == "style2")
    np.testing.assert_array_equal(al.rows.take(m), rows.features[m])


def test_a_streamed_store_is_aligned_as_the_same_store_in_memory(tmp_path):
    """Shifts, statistics and the fitted head agree whether the store is read whole or in blocks."""
    store = synthetic_store(tmp_path / "s.h5", n=6000, dim=64, classes=3, groups=5, separation=0.5)
    whole = open_rows([store])
    streamed = open_rows([store], memory_budget_mb=1)
    assert whole.in_memory and not streamed.in_memory
    streamed.block_rows = 700  # several blocks, a group's rows in each
    train = np.asarray(whole.groups) != "g4"
    p = params(head={"hidden": (), "adapt": "affine", "align": "groups"}).head
    a, b = training_view(whole, train, "groups"), training_view(streamed, train, "groups")
    np.testing.assert_allclose(a.reference.mean, b.reference.mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.reference.sq, b.reference.sq, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.rows.take(train), b.rows.take(train), rtol=1e-5, atol=1e-5)
    ha, hb = fit_rows(whole, train, p, 0), fit_rows(streamed, train, p, 0)
    np.testing.assert_allclose(ha.layers[0][0], hb.layers[0][0], rtol=1e-3, atol=1e-4)


def test_cv_aligns_each_fold_on_its_training_groups_only():
    """No leak: a fold's alignment and statistics come from its training rows; the held-out group is adapted at
    prediction like any new source, never aligned with its own labels."""
    rows = _world(groups=4)
    fold = np.array([int(g[-1]) % 2 for g in rows.groups])  # styles 0, 2 in fold 0; 1, 3 in fold 1
    views = FoldViews(rows, fold)
    cross_validate(rows, fold, params(head={"hidden": (), "adapt": "auto", "align": "groups"}, cv={"folds": 2}),
                   ("none", "affine"), None, views=views)
    assert set(views.get(0, "groups").rows.shifts) == {"style1", "style3"}
    assert set(views.get(1, "groups").rows.shifts) == {"style0", "style2"}
    ref = training_view(rows, fold != 0, "groups").reference
    np.testing.assert_allclose(views.get(0, "groups").reference.mean, ref.mean, rtol=1e-6)


def test_details_say_whether_the_groups_were_aligned(tmp_path):
    from pipeline.stages.train import train_head
    p = params(head={"hidden": (), "epochs": 5}, cv={"folds": 3, "repeats": 1})
    said = {}
    for groups in (3, None):
        store = synthetic_store(tmp_path / f"s{groups}.h5", n=240, dim=8, groups=groups)
        m = train_head(stores=[store], out=str(tmp_path / f"m{groups}"), params=p, progress=lambda s: None)
        said[groups] = m["adaptation"]["align"]
    assert said[3].startswith("groups: each training group aligned") and said[None].startswith("none: no group")
    m = train_head(stores=[str(tmp_path / "s3.h5")], out=str(tmp_path / "m_none"), progress=lambda s: None,
                   params=params(head={"hidden": (), "epochs": 5, "align": "none"}, cv={"folds": 3, "repeats": 1}))
    assert m["adaptation"]["align"] == "none: set in params"
    m = train_head(stores=[str(tmp_path / "s3.h5")], out=str(tmp_path / "m_raw"), progress=lambda s: None,
                   params=params(head={"hidden": (), "epochs": 5, "adapt": "none"}, cv={"folds": 3, "repeats": 1}))
    assert m["adaptation"]["align"].startswith("none: adapt is none")  # a head for raw features meets raw ones
    assert json.loads((tmp_path / "m_raw" / "model.json").read_text())["params"]["head"]["align"] == "none"
