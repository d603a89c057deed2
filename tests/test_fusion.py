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
