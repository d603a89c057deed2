"""Report (rendered headless as a person would see it), calibration, export parity."""
import json
import shutil
import subprocess

import numpy as np
import pytest
import torch

from features.extract import extract
from features.images import decode
from pipeline.cv import train_head
from pipeline.head import fit_temperature, softmax
from pipeline.metrics import expected_calibration_error
from pipeline.params import Params
from tests.conftest import TINY, make_images


@pytest.fixture
def trained(tmp_path, tiny_weights):
    imgs = make_images(tmp_path / "imgs", per_class=8)
    (imgs / "red" / "<script>alert(1)<script>.png").write_bytes((imgs / "blue" / "blue_01.png").read_bytes())
    kw = dict(backbone=TINY, weights=tiny_weights, progress=False, workers=0)
    extract(images=str(imgs), out=str(tmp_path / "train.h5"), **kw)
    test = make_images(tmp_path / "test", per_class=3, seed=2)
    extract(images=str(test), out=str(tmp_path / "test.h5"), **kw)
    import dataclasses
    p = Params()
    p = dataclasses.replace(p, cv=dataclasses.replace(p.cv, folds=3), head=dataclasses.replace(p.head, epochs=20))
    train_head(stores=[str(tmp_path / "train.h5")], out=str(tmp_path / "model"), params=p, progress=lambda s: None)
    return tmp_path


def test_report_html_is_self_contained_and_escaped(trained):
    from pipeline.report import build_report
    out = trained / "report"
    res = build_report(model_dir=str(trained / "model"), out=str(out), test_stores=[str(trained / "test.h5")],
                       progress=lambda s: None)
    page = (out / "index.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;script&gt;.png" in page
    assert "http://" not in page and "https://" not in page  # opens offline
    assert "id=gallery-cv" in page and "id=confusion-cv" in page and "95% CI" in page
    assert (out / "confusion.png").stat().st_size > 1000 and (out / "confusion_cv.csv").exists()
    assert res["test"]["n"] == 9 and 0 <= res["cv"]["macro_f1_ci95"][0] <= res["cv"]["macro_f1"] <= res["cv"]["macro_f1_ci95"][1]
    # the mislabelled copy of a blue image is the likeliest label error / a near-duplicate across folds
    assert "Near-duplicates in different folds" in page


@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")), reason="no headless Chromium")
def test_report_renders_in_headless_chromium(trained):
    from PIL import Image
    from pipeline.report import build_report
    out = trained / "report"
    build_report(model_dir=str(trained / "model"), out=str(out), progress=lambda s: None)
    shot = trained / "shot.png"
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--no-first-run", f"--user-data-dir={trained / 'chrome'}",
                    f"--screenshot={shot}", "--window-size=1200,2400", f"file://{out / 'index.html'}"],
                   check=True, capture_output=True, timeout=120)
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[0] >= 2000 and (img < 250).any(axis=2).mean() > 0.02  # not a blank page
    blue = (img[..., 2] > 150) & (img[..., 0] < 120)  # the Blues confusion matrix and blue thumbnails rendered
    assert blue.sum() > 500


def test_temperature_scaling_lowers_ece_on_overconfident_logits():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 2000)
    logits = rng.normal(size=(2000, 3))
    logits[np.arange(2000), y] += 1.0
    logits *= 4  # overconfident
    t = fit_temperature(logits, y)
    assert t > 1.5
    assert expected_calibration_error(softmax(logits, t), y) < expected_calibration_error(softmax(logits), y) / 2


def test_torchscript_export_matches_predict(trained):
    from pipeline import load_model
    from pipeline.export import export, load_exported
    dst = export(model_dir=str(trained / "model"), fmt="torchscript", out=str(trained / "m.pt"))
    m, meta = load_exported(str(dst))
    assert meta["class_names"] == ["blue", "green", "red"]
    paths = sorted(str(p) for p in (trained / "test").rglob("*.*"))
    pred = load_model(trained / "model", device="cpu").predict(paths)
    with torch.no_grad():
        out = torch.cat([m(torch.from_numpy(decode(p))[None]) for p in paths]).numpy()
    np.testing.assert_allclose(out, pred.probs, atol=1e-4)
    with torch.no_grad():
        assert m(torch.randint(0, 256, (2, 37, 91, 3), dtype=torch.uint8)).shape == (2, 3)


def test_onnx_export_matches_predict(trained):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    import onnx
    from pipeline import load_model
    from pipeline.export import export
    dst = export(model_dir=str(trained / "model"), fmt="onnx", out=str(trained / "m.onnx"))
    meta = json.loads({p.key: p.value for p in onnx.load(str(dst)).metadata_props}["imgsent"])
    assert meta["class_names"] == ["blue", "green", "red"]
    paths = sorted(str(p) for p in (trained / "test").rglob("*.*"))
    pred = load_model(trained / "model", device="cpu").predict(paths)
    s = ort.InferenceSession(str(dst))
    out = np.concatenate([s.run(None, {"images": decode(p)[None]})[0] for p in paths])
    np.testing.assert_allclose(out, pred.probs, atol=1e-4)
    assert s.run(None, {"images": np.zeros((2, 51, 77, 3), np.uint8)})[0].shape == (2, 3)
