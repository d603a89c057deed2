"""What to do next: planted label errors are found with their true class suggested (real emoji, real backbone),
the learning curve rises with more images on separable data, the feature map and its CSV line up."""
import csv

import numpy as np
import pytest

from tests.synthetic import synthetic_store
from pipeline.analysis.insight import embedding_2d, label_issues, learning_curve
from pipeline.data.rows import open_rows
from pipeline.stages.train import load_rows, train_head
from tests.conftest import ROOT, params

SHARED = ROOT.parent / "shared" / "data"


@pytest.mark.slow
@pytest.mark.ci
@pytest.mark.skipif(not (SHARED / "emoji-faces7").is_dir(), reason="needs ../shared/data")
def test_planted_label_errors_are_found_with_their_true_class(tmp_path):
    """The issue's check: 5 happy emoji (seeded random picks, any style) moved into 'sad' of the shared data's
    class folders, the pipeline run as params.yaml sets it up (fused backbones, default head, 5-fold CV), and at
    least 3 of the 5 are in the report's top 10 with 'happy' suggested (a row picked at random is there with
    probability 10/245). Measured by benchmarks/planted_labels.py over 6 seeds: 4, 4, 5, 3, 5, 3 (BENCHMARKS.md,
    before preprocessing version 4); this is seed 0, which found 4 before and 3 after that version's uint8
    resize, so the bar is the seeds' minimum, not one seed's luck."""
    from features.extract import extract
    from pipeline.stages.report import build_report
    rows = [(str(p), p.parent.name) for style in sorted((SHARED / "emoji-faces7").iterdir())
            if style.is_dir() for p in sorted(style.glob("*/*.png"))]
    happy = [i for i, r in enumerate(rows) if r[1] == "happy"]
    planted = set(np.random.default_rng(0).choice(happy, 5, replace=False).tolist())
    with open(tmp_path / "m.csv", "w", newline="") as f:  # a manifest without groups is a folder of classes
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows((p, "sad" if i in planted else lab) for i, (p, lab) in enumerate(rows))
    p = params(cv={"folds": 5})
    stores = [str(tmp_path / f"{b}.h5") for b in p.extract.backbones]
    for b, out in zip(p.extract.backbones, stores):
        extract(images=str(tmp_path / "m.csv"), out=out, backbone=b, allow_outside=True, progress=False)
    train_head(stores=stores, out=str(tmp_path / "model"), params=p, progress=lambda s: None)
    build_report(model_dir=str(tmp_path / "model"), out=str(tmp_path / "report"), progress=lambda s: None)
    issues = list(csv.DictReader(open(tmp_path / "report" / "label_issues.csv")))
    top = {r["path"]: r for r in issues[:10]}
    found = [rows[i][0] for i in planted if rows[i][0] in top and top[rows[i][0]]["suggested"] == "happy"]
    assert len(found) >= 3, (len(found), len(issues))
    assert len(issues) < len(rows) / 3 and all(top[q]["label"] == "sad" for q in found)
    scores = [float(r["score"]) for r in issues]
    assert scores == sorted(scores) and scores[0] < 0  # worst first: the model prefers another class
    page = (tmp_path / "report" / "index.html").read_text()
    assert "Suspected label errors" in page and "alt='learning curve'" in page and "alt='embedding map'" in page


def test_label_issues_rank_flipped_labels_first():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    probs = np.full((300, 3), 0.05)
    probs[np.arange(300), y] = 0.9  # a confident, correct model...
    flipped = rng.choice(300, 6, replace=False)
    given = y.copy()
    given[flipped] = (y[flipped] + 1) % 3  # ...and 6 labels that disagree with it
    idx, suggested, score = label_issues(labels=given, probs=probs)
    assert set(idx[:6]) == set(flipped) and (suggested[:6] == y[idx[:6]]).all() and (score[:6] < 0.1).all()


def test_learning_curve_rises_and_ends_at_the_full_cv(tmp_path):
    rows = open_rows([synthetic_store(tmp_path / "s.h5", n=3000, dim=32, classes=3, separation=0.25)])
    p = params(cv={"folds": 3}, head={"hidden": [], "adapt": "affine", "min_val_images": 50})
    _, fold, _ = load_rows([str(tmp_path / "s.h5")], p, False)
    points = learning_curve(rows=rows, fold=fold, params=p, max_val=None)
    assert [q["per_class"] for q in points][:-1] == [2, 5, 10, 20, 50, 100, 200, 500]
    assert points[-1]["all"] and 600 < points[-1]["per_class"] < 720  # ~2/3 of ~1000 per class train per fold
    assert points[0]["macro_f1"] < points[-1]["macro_f1"] - 0.15  # 2 images a class << 1000
    assert all(q["lo"] <= q["macro_f1"] <= q["hi"] for q in points)
    full = train_head(stores=[str(tmp_path / "s.h5")], out=str(tmp_path / "m"), params=p, progress=lambda s: None)
    assert points[-1]["macro_f1"] == pytest.approx(full["cv"]["macro_f1_mean"], abs=1e-6)


def test_learning_curve_interval_is_students_t_over_the_folds(tmp_path, monkeypatch):
    """The curve's '95% interval' over 3 folds is t(2 df) = 4.30 standard errors, not the normal 1.96 (which
    covers about 82% with 3 folds). Folds scoring 0.5, 0.6, 0.7: 0.6 +- 0.248."""
    import pipeline.analysis.insight as insight
    scores = iter([0.5, 0.6, 0.7] * 20)
    monkeypatch.setattr(insight, "classification_metrics", lambda *a: {"macro_f1": next(scores)})
    rows = open_rows([synthetic_store(tmp_path / "s.h5", n=90, dim=4, classes=3)])
    p = params(cv={"folds": 3}, head={"hidden": [], "epochs": 2, "adapt": "none"})
    _, fold, _ = load_rows([str(tmp_path / "s.h5")], p, False)
    last = learning_curve(rows=rows, fold=fold, params=p, max_val=None)[-1]
    assert last["macro_f1"] == pytest.approx(0.6)
    assert last["hi"] - last["macro_f1"] == pytest.approx(4.303 * 0.1 / np.sqrt(3), abs=1e-3)


def test_embedding_separates_what_the_features_separate():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    x = rng.normal(size=(400, 50)) + y[:, None] * 3.0
    xy = embedding_2d(x)
    assert xy.shape == (400, 2)
    assert abs(xy[y == 0, 0].mean() - xy[y == 1, 0].mean()) > 3 * xy[:, 0].std() / 2


def test_learning_curve_ticks_are_all_labelled_and_turn_when_crowded():
    """Issue #32: the ticks at 20 and at 24 (every image) were drawn on top of each other; issue #42: blanking one
    of them left the tick at 10 without a label. Every tick keeps its label; crowded ones are turned upright."""
    from pipeline.analysis.plots import tick_rotation
    assert tick_rotation([2, 5, 10, 20, 24]) == 90 and tick_rotation([2, 5, 10, 13]) == 90
    assert tick_rotation([2, 5, 10]) == 0


def test_the_learning_curve_never_says_still_rising_at_a_perfect_score():
    """Issue #42: 'still rising: more labelled images per class should help' was printed at CV 1.000."""
    from pipeline.analysis.sections import learning_verdict
    assert learning_verdict(1.0, 0.05).startswith("at the ceiling: CV already scores 1.000")
    assert learning_verdict(0.80, 0.05).startswith("still rising")
    assert learning_verdict(0.80, 0.01).startswith("flat at the end")


def test_crops_of_one_photo_across_folds_come_first_among_the_closest_pairs():
    """Issue #32: 24 crops of one photo in one class: 'Near-duplicates in different folds: None found' and a
    perfect CV score. Crops are less alike than near-duplicates (cosine ~0.8 here, below 0.97), so the report also
    lists the most similar pairs across folds, whatever their similarity; the crops' pairs come first."""
    from pipeline.analysis.insight import closest_across_folds, near_duplicates
    rng = np.random.default_rng(0)
    photo = rng.normal(size=64)
    crops = photo + rng.normal(scale=0.5, size=(24, 64))  # one scene, 24 views: cosine ~0.8 to each other
    others = rng.normal(size=(40, 64))
    x = np.concatenate([crops, others]).astype(np.float32)
    fold = np.arange(len(x)) % 3
    assert near_duplicates(x, fold) == []  # what the 0.97 check sees: nothing
    top = closest_across_folds(x, fold, top=10)
    assert len(top) == 10 and all(i < 24 and j < 24 and fold[i] != fold[j] for i, j, _ in top)
    assert all(0.6 < s < 0.97 for _, _, s in top)


@pytest.mark.parametrize("pairs", [[], [(0, 1), (2, 3)]])
def test_the_maps_near_duplicates_are_visible_and_in_the_legend_only_when_there_are_some(tmp_path, monkeypatch, pairs):
    """Issue #42: the legend text named a grey line for near-duplicate pairs, which sit on one spot of the map and
    so drew nothing visible, though two pairs were listed."""
    import matplotlib.figure
    from pipeline.analysis.plots import plot_embedding
    seen = {}

    def keep(fig, *a, **k):
        ax = fig.axes[0]
        seen["legend"] = [t.get_text() for t in ax.get_legend().get_texts()]
        seen["rings"] = sum(len(c.get_offsets()) for c in ax.collections if c.get_label().startswith("near-dup"))
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    xy = np.array([[0, 0], [0, 0], [1, 1], [1, 1], [2, 0], [0, 2]], float)  # each pair on one spot
    plot_embedding(xy, np.array([0, 0, 1, 1, 0, 1]), ["a", "b"], np.zeros(6, bool), np.zeros(6, bool), pairs,
                   tmp_path / "m.png")
    named = [t for t in seen["legend"] if t.startswith("near-duplicates across folds")]
    assert named == ([] if not pairs else ["near-duplicates across folds (2 pairs)"]), seen["legend"]
    assert seen["rings"] == (4 if pairs else 0)
