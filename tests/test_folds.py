"""Fold assignment, as properties over random label / group / duplicate layouts: no group and no identical
image ever straddles folds, every fold is used, and stratification holds."""
import numpy as np
import pytest

from features.errors import UserError
from pipeline.data.folds import assign_folds


def _layout(rng, n, classes, groups, dup_rate):
    labels = rng.integers(0, classes, n)
    labels[:classes * 6] = np.repeat(np.arange(classes), 6)  # every class has enough images for 5 folds
    sha = [f"{i:064x}" for i in range(n)]
    grp = [f"g{v}" for v in rng.integers(0, groups, n)] if groups else None
    for i in np.flatnonzero(rng.random(n) < dup_rate):  # identical images: same hash (and same label)
        j = int(rng.integers(0, n))
        sha[i], labels[i] = sha[j], labels[j]
        if grp and rng.random() < 0.9:  # a copy mostly stays in its group (same style / camera)
            grp[i] = grp[j]
    labels[rng.random(n) < 0.05] = -1  # a few unlabelled rows
    return labels, grp, sha


def _units(labels, groups, sha) -> int:
    """Labelled rows that must share a fold (same group or same image), counted independently of folds.py."""
    parent = {}

    def find(x):
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    for i, (lab, s) in enumerate(zip(labels, sha)):
        if lab < 0:
            continue
        for key in ([("g", groups[i])] if groups else []) + [("s", s)]:
            parent[find(("row", i))] = find(key)
    return len({find(("row", i)) for i, lab in enumerate(labels) if lab >= 0})


@pytest.mark.parametrize("seed", range(12))
def test_groups_and_duplicates_never_straddle_folds(seed):
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(200, 800)), int(rng.integers(2, 6))
    plain = seed % 3 == 0  # every third layout has no groups and no copies: each row is its own key
    classes = int(rng.integers(2, 6))
    labels, groups, sha = _layout(rng, n, classes, 0 if plain else int(rng.choice([0, 12, 40])),
                                  0.0 if plain else rng.random() * 0.2)
    try:
        fold = assign_folds(labels=labels, groups=groups, sha256=sha, k=k, class_names=[str(i) for i in range(classes)],
                            random_state=seed)
    except UserError as e:  # copies shared across groups can merge them into fewer than k units: refused clearly
        assert f"cv.folds={k} exceeds the" in str(e) and "groups of images" in str(e)
        assert _units(labels, groups, sha) < k  # ...and only then: an always-refusing rule fails here
        return
    lab = labels >= 0
    assert (fold[~lab] == -1).all() and set(fold[lab]) == set(range(k))
    for key in (sha, groups) if groups else (sha,):
        seen = {}
        for kk, f, ok in zip(key, fold, lab):
            if ok:
                seen.setdefault(kk, set()).add(int(f))
        assert all(len(v) == 1 for v in seen.values())
    if plain:  # plain stratified k-fold: each class spread evenly over folds, and so the folds' sizes
        for c in np.unique(labels[lab]):
            per_fold = np.bincount(fold[labels == c], minlength=k)
            assert per_fold.max() - per_fold.min() <= 1
        sizes = np.bincount(fold[lab], minlength=k)
        assert sizes.max() - sizes.min() <= 1
    else:  # groups and copies: whole keys move, so sizes only roughly balance
        sizes = np.bincount(fold[lab], minlength=k)
        assert sizes.min() > 0


def test_same_input_same_folds_and_clear_refusals():
    rng = np.random.default_rng(0)
    labels, groups, sha = _layout(rng, 300, 3, 10, 0.1)
    kw = dict(labels=labels, groups=groups, sha256=sha, class_names=["a", "b", "c"])
    np.testing.assert_array_equal(assign_folds(k=3, random_state=1, **kw), assign_folds(k=3, random_state=1, **kw))
    with pytest.raises(UserError, match="cv.folds=11 exceeds the 10 groups"):
        assign_folds(k=11, random_state=0, labels=np.repeat([0, 1, 2], 100), groups=[f"g{i % 10}" for i in range(300)],
                     sha256=[f"{i:064x}" for i in range(300)], class_names=["a", "b", "c"])
    with pytest.raises(UserError, match="only one class"):
        assign_folds(k=2, random_state=0, labels=np.zeros(10, int), groups=None, sha256=[f"{i}" for i in range(10)],
                     class_names=["a", "b"])


def test_a_class_the_store_lists_without_labelled_images_is_refused_naming_it():
    """Its F1 of 0 was averaged into every CV macro score (a manifest's --classes, or every image of it skipped)."""
    with pytest.raises(UserError, match=r"class 'angry' has no labelled images .*leave it out \(extract --classes\)"):
        assign_folds(labels=np.repeat([0, 2], 10), groups=None, sha256=[f"{i:064x}" for i in range(20)], k=2,
                     class_names=["happy", "angry", "sad"], random_state=0)


def test_a_fold_that_trains_without_a_class_is_refused_naming_it():
    """The newcomer's layout (issue #24): each image's group is its source photo and each class came from one
    photo, so the fold that tests a class trains without it."""
    labels = np.repeat([0, 1, 2], 20)
    groups = [f"photo{c}" for c in labels]
    with pytest.raises(UserError, match=r"CV fold \d of 3 trains without class '(happy|sad|angry)'.*lower cv.folds"):
        assign_folds(labels=labels, groups=groups, sha256=[f"{i:064x}" for i in range(60)], k=3,
                     class_names=["happy", "sad", "angry"], random_state=0)


def test_a_fold_that_tests_a_single_class_is_refused():
    """Two classes; the groups put class 1 whole into fold tests that hold nothing else."""
    labels = np.array([0] * 10 + [1] * 10)
    groups = ["a"] * 10 + ["b"] * 5 + ["c"] * 5  # class 0 all in group a: some fold tests only it
    with pytest.raises(UserError, match=r"CV fold \d of 2 (tests only class|trains without class)"):
        assign_folds(labels=labels, groups=groups, sha256=[f"{i:064x}" for i in range(20)], k=2,
                     class_names=["x", "y"], random_state=0)
