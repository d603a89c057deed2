"""`imgsent suggest`: the uncertain images come first, near-identical ones are picked once, bad inputs refused."""
import csv
import shutil

import numpy as np
import pytest
from PIL import Image

from features.extract import extract
from pipeline.stages.suggest import pick
from pipeline.stages.train import train_head
from tests.conftest import COLOURS, TINY, make_images, params, run_cli


def test_pick_orders_by_margin_and_skips_near_duplicates():
    probs = np.array([[0.5, 0.5], [0.51, 0.49], [0.9, 0.1], [0.6, 0.4]])
    feats = np.array([[1, 0], [1, 0], [0, 1], [0.6, 0.8]], dtype=np.float32)  # rows 0 and 1 are the same image
    assert pick(probs=probs, features=feats, n=3).tolist() == [0, 3, 2]
    assert pick(probs=probs, features=feats, n=3, max_similarity=1.01).tolist() == [0, 1, 3]


@pytest.fixture
def setup(tmp_path, tiny_weights):
    imgs = make_images(tmp_path / "imgs", per_class=12)
    kw = dict(backbone=TINY, weights=tiny_weights, progress=False, workers=0)
    extract(images=str(imgs), out=str(tmp_path / "train.h5"), **kw)
    train_head(stores=[str(tmp_path / "train.h5")], out=str(tmp_path / "m"), params=params(cv={"folds": 3}),
               progress=lambda s: None)
    pool = tmp_path / "pool"  # a flat folder: unlabelled
    pool.mkdir()
    rng = np.random.default_rng(5)
    for i in range(6):  # clear members of each class
        for name, rgb in COLOURS.items():
            a = rng.integers(0, 256, (40, 40, 3)) * 0.3 + np.array(rgb) * 0.7
            Image.fromarray(a.astype(np.uint8)).save(pool / f"{name}_{i}.png")
    mix = (np.array(COLOURS["red"]) + np.array(COLOURS["green"])) / 2  # between two classes
    Image.fromarray((rng.integers(0, 256, (40, 40, 3)) * 0.3 + mix * 0.7).astype(np.uint8)).save(pool / "mix.png")
    for i in range(4):
        shutil.copy(pool / "mix.png", pool / f"mix_copy{i}.png")
    extract(images=str(pool), out=str(tmp_path / "pool.h5"), **kw)
    return tmp_path


def test_suggest_cli_writes_ranked_diverse_picks(setup):
    out = setup / "to_label.csv"
    r = run_cli("suggest", str(setup / "m"), str(setup / "pool.h5"), "--n", "5", "--out", str(out), check=True)
    assert "5 of 23 unlabelled images to label next" in r.stdout
    rows = list(csv.DictReader(open(out)))
    assert [int(x["rank"]) for x in rows] == [1, 2, 3, 4, 5]
    margins = [float(x["margin"]) for x in rows]
    assert margins == sorted(margins)
    assert sum("mix" in x["path"] for x in rows) <= 1  # five identical images: suggested once
    assert all(x["ood_score"] != "" for x in rows) and "p_red" in rows[0]


def test_suggest_refuses_what_it_cannot_use(setup):
    r = run_cli("suggest", str(setup / "m"), str(setup / "train.h5"), "--out", str(setup / "a.csv"))
    assert r.returncode == 2 and "every image is labelled" in r.stderr and not (setup / "a.csv").exists()
    r = run_cli("suggest", str(setup / "m"), str(setup / "pool.h5"), "--n", "0", "--out", str(setup / "b.csv"))
    assert r.returncode == 2 and "--n 0: must be >= 1" in r.stderr
    (setup / "mine.csv").write_text("my notes\n")
    r = run_cli("suggest", str(setup / "m"), str(setup / "pool.h5"), "--out", str(setup / "mine.csv"))
    assert r.returncode == 2 and (setup / "mine.csv").read_text() == "my notes\n"


def test_suggest_says_when_nothing_is_uncertain():
    """Issue #24: 'most uncertain first' over picks the head is 0.9999 sure of said nothing about it."""
    from pipeline.stages.suggest import sure_note
    assert sure_note(np.array([0.55, 0.9999])) == ""
    note = sure_note(np.array([0.9951, 0.9999]))
    assert "at least 0.9951 sure of every one of them" in note and "teaches it little" in note


def test_suggest_skips_images_the_model_was_trained_on(setup, tiny_weights):
    """An unlabelled pool that holds training images (the same bytes, any name) must not suggest labelling them
    again: they are skipped and counted; a pool of nothing else is refused in one line."""
    kw = dict(backbone=TINY, weights=tiny_weights, progress=False, workers=0)
    pool = setup / "pool2"
    shutil.copytree(setup / "pool", pool)
    trained = sorted((setup / "imgs").rglob("*.*"))
    for f in trained:  # every training image, flat (unlabelled), under another name
        shutil.copy(f, pool / f"again_{f.parent.name}_{f.name}")
    extract(images=str(pool), out=str(setup / "pool2.h5"), **kw)
    r = run_cli("suggest", str(setup / "m"), str(setup / "pool2.h5"), "--n", "30", "--out", str(setup / "s.csv"),
                check=True)
    rows = list(csv.DictReader(open(setup / "s.csv")))
    assert not any("again_" in x["path"] for x in rows) and len(rows) > 5
    assert "of 23 unlabelled images to label next" in r.stdout and \
        f"{len(trained)} images the model was trained on skipped" in r.stdout, r.stdout
    only = setup / "only_trained"
    only.mkdir()
    for f in trained:
        shutil.copy(f, only / f"{f.parent.name}_{f.name}")
    extract(images=str(only), out=str(setup / "only.h5"), **kw)
    r = run_cli("suggest", str(setup / "m"), str(setup / "only.h5"), "--out", str(setup / "o.csv"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and \
        f"all {len(trained)} unlabelled images in it are images the model was trained on" in r.stderr, r.stderr
