"""Several stores joined by image content: column blocks in order, refusal on different images, --intersect."""
import os

import numpy as np
import pytest
import timm
import torch

from features.errors import UserError
from features.extract import extract
from pipeline.data.rows import open_rows
from tests.conftest import ROOT, TINY, make_images, run_cli


def test_join_refuse_intersect_and_predict(tmp_path, tiny_weights):
    imgs = make_images(tmp_path / "imgs", per_class=6)
    other = tmp_path / "other.pt"
    torch.manual_seed(3)
    torch.save(timm.create_model(TINY, num_classes=0).state_dict(), other)
    kw = dict(images=str(imgs), backbone=TINY, progress=False, workers=0)
    extract(out=str(tmp_path / "a.h5"), weights=tiny_weights, **kw)
    os.remove(imgs / "red" / "red_00.jpg")
    extract(out=str(tmp_path / "b.h5"), weights=str(other), **kw)
    with pytest.raises(UserError, match=r"stores hold different images .*18.*17.*--intersect"):
        open_rows([str(tmp_path / "a.h5"), str(tmp_path / "b.h5")])
    d = open_rows([str(tmp_path / "a.h5"), str(tmp_path / "b.h5")], intersect=True)
    a = open_rows([str(tmp_path / "a.h5")])
    others = make_images(tmp_path / "others", per_class=2, seed=9)  # the same classes, other images
    extract(out=str(tmp_path / "c.h5"), **{**kw, "images": str(others)}, weights=str(other))
    with pytest.raises(UserError, match=r"^stores share no image \(.*a.h5: 18, .*c.h5: 6\): fusion joins"):
        open_rows([str(tmp_path / "a.h5"), str(tmp_path / "c.h5")], intersect=True)  # it said 'no labelled images'
    assert len(d.paths) == 17 and d.features.shape[1] == 2 * a.features.shape[1]
    i, j = d.paths.index("blue/blue_03.png"), a.paths.index("blue/blue_03.png")
    np.testing.assert_array_equal(d.features[i, : a.features.shape[1]], a.features[j])
    assert [f["weights_sha256"] for f in d.fingerprints][0] != d.fingerprints[1]["weights_sha256"]
    r = run_cli("train-head", str(tmp_path / "a.h5"), str(tmp_path / "b.h5"), "--intersect", "--out",
                str(tmp_path / "m"), "--params", str(ROOT / "params.yaml"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    pred = run_cli("predict", str(tmp_path / "m"), str(imgs / "green"), "--out", str(tmp_path / "p.csv"), check=True)
    assert "6 images, 0 failed" in pred.stdout
    # evaluate needs one store per backbone, in training order
    r = run_cli("evaluate", str(tmp_path / "m"), str(tmp_path / "b.h5"), str(tmp_path / "a.h5"), "--out",
                str(tmp_path / "e"))
    assert r.returncode == 2 and "do not match the model" in r.stderr


def test_a_store_fused_with_itself_or_its_copy_is_refused_naming_it(tmp_path, tiny_weights):
    """The same store twice, or a copy of it (the same backbone, weights and preprocessing: identical features),
    would fit a head on duplicated columns; a store of other weights fuses as before."""
    imgs = make_images(tmp_path / "imgs", per_class=3)
    kw = dict(images=str(imgs), backbone=TINY, progress=False, workers=0)
    extract(out=str(tmp_path / "a.h5"), weights=tiny_weights, **kw)
    extract(out=str(tmp_path / "copy.h5"), weights=tiny_weights, **kw)
    a, copy = str(tmp_path / "a.h5"), str(tmp_path / "copy.h5")
    with pytest.raises(UserError, match=r"a\.h5: given twice: fusing them adds nothing; pass each backbone's store"):
        open_rows([a, a])
    with pytest.raises(UserError, match=rf"copy\.h5: the same features as {a} \(backbone {TINY}, the same weights"):
        open_rows([a, copy])
    r = run_cli("train-head", a, copy, "--out", str(tmp_path / "m"), "--params", str(ROOT / "params.yaml"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "the same features as" in r.stderr, r.stderr
    assert not (tmp_path / "m").exists()
