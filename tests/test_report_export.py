"""Report (rendered headless as a person would see it), calibration, export parity."""
import json
import shutil
import subprocess

import numpy as np
import pytest
import torch

from features.errors import UserError
from features.extract import extract
from features.input.images import decode
from pipeline.stages.train import train_head
from pipeline.heads.head import softmax
from pipeline.inference.calibration import fit_temperature
from pipeline.analysis.metrics import expected_calibration_error
from tests.conftest import TINY, make_images, params


@pytest.fixture
def trained(tmp_path, tiny_weights):
    imgs = make_images(tmp_path / "imgs", per_class=8)
    (imgs / "red" / "<script>alert(1)<script>.png").write_bytes((imgs / "blue" / "blue_01.png").read_bytes())
    from PIL import Image
    for i in (1, 3, 5, 7):  # near-copies (one pixel changed): other bytes, so CV may put them in another fold
        a = np.asarray(Image.open(imgs / "blue" / f"blue_{i:02d}.png")).copy()
        a[0, 0] = 255 - a[0, 0]
        Image.fromarray(a).save(imgs / "blue" / f"near_{i:02d}.png")
    kw = dict(backbone=TINY, weights=tiny_weights, progress=False, workers=0)
    extract(images=str(imgs), out=str(tmp_path / "train.h5"), **kw)
    test = make_images(tmp_path / "test", per_class=3, seed=2)
    extract(images=str(test), out=str(tmp_path / "test.h5"), **kw)
    p = params(cv={"folds": 3}, head={"epochs": 20})
    train_head(stores=[str(tmp_path / "train.h5")], out=str(tmp_path / "model"), params=p, progress=lambda s: None)
    return tmp_path


def test_report_html_is_self_contained_and_escaped(trained, monkeypatch):
    import csv
    import re
    from pipeline.stages.report import build_report
    out = trained / "report"
    monkeypatch.chdir(trained / "imgs")  # another working directory than train-head's: same page
    res = build_report(model_dir="../model", out=str(out), test_stores=[str(trained / "test.h5")],
                       progress=lambda s: None)
    page = (out / "index.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;script&gt;.png" in page
    assert "http://" not in page and "https://" not in page  # opens offline
    assert "id=gallery-cv" in page and "id=confusion-cv" in page and "95% CI" in page
    assert page.count("data:image/jpeg;base64,") >= 1 and "image unavailable" not in page  # thumbnails found
    # issue #32: the page loaded its figures from sibling PNGs; now every image is inside it, so it opens alone
    srcs = re.findall(r"src='([^']*)'", page)
    assert len(srcs) >= 6 and all(s.startswith("data:image/") for s in srcs), [s[:40] for s in srcs]
    assert (out / "confusion.png").stat().st_size > 1000 and (out / "confusion_cv.csv").exists()
    matrix = list(csv.reader(open(out / "confusion_matrix_cv.csv")))  # the matrix itself, not a row per image
    assert matrix[0] == ["actual \\ predicted", "blue", "green", "red"] and [r[0] for r in matrix[1:]] == matrix[0][1:]
    assert sum(int(v) for r in matrix[1:] for v in r[1:]) == len(list(csv.DictReader(open(out / "confusion_cv.csv"))))
    assert res["test"]["n"] == 9 and 0 <= res["cv"]["macro_f1_ci95"][0] <= res["cv"]["macro_f1"] <= res["cv"]["macro_f1_ci95"][1]
    # every planted near-copy that CV put in another fold than its original is listed as a near-duplicate
    fold = {r["path"]: r["fold"] for r in csv.DictReader(open(trained / "model" / "oof_predictions.csv"))}
    listed = re.search(r"<ol id=near-duplicates>(.*?)</ol>", page, re.S)
    across = [i for i in (1, 3, 5, 7) if fold[f"blue/blue_{i:02d}.png"] != fold[f"blue/near_{i:02d}.png"]]
    assert across, "the seed put every near-copy in its original's fold: plant more"
    for i in across:
        assert f"blue/blue_{i:02d}.png" in listed.group(1) and f"blue/near_{i:02d}.png" in listed.group(1)
    assert res["near_duplicates_across_folds"] >= len(across)
    assert "cannot see crops of one photo" in page and page.count("<li>", page.index("id=closest-pairs")) >= 5
    # the insight outputs: label issues, learning curve, feature map, each a CSV beside the page
    assert next(csv.reader(open(out / "label_issues.csv"))) == ["path", "label", "suggested", "score"]
    curve = list(csv.DictReader(open(out / "learning_curve.csv")))
    assert [int(r["per_class"]) for r in curve] == sorted(int(r["per_class"]) for r in curve) and len(curve) >= 2
    emb = list(csv.DictReader(open(out / "embedding_2d.csv")))
    assert sorted(r["path"] for r in emb) == sorted(fold) and "alt='learning curve'" in page and "alt='embedding map'" in page


def test_report_says_when_a_section_is_skipped(trained):
    from pipeline.stages.report import build_report
    (trained / "train.h5").rename(trained / "moved.h5")
    build_report(model_dir=str(trained / "model"), out=str(trained / "r"), progress=lambda s: None)
    page = (trained / "r" / "index.html").read_text()
    assert "Skipped: the training store cannot be read" in page and "moved" not in page


@pytest.mark.parametrize("damage", [b"PK\x03\x04garbage", b"\x93NUMPY", "npz", "shape"])
def test_a_damaged_out_of_fold_logits_file_is_one_line_naming_it(trained, damage):
    """oof_logits.npy is read without a checksum: a broken zip, a truncated header, an .npz archive in its place
    ('unexpected BadZipFile' / AttributeError before) or another shape is refused in one line naming it."""
    from pipeline.stages.report import build_report
    f = trained / "model" / "oof_logits.npy"
    if damage == "npz":
        np.savez(f.with_suffix(".npz"), logits=np.load(f))
        f.with_suffix(".npz").rename(f)
    elif damage == "shape":
        np.save(f, np.load(f)[:-1])
    else:
        f.write_bytes(damage)
    with pytest.raises(UserError, match=r"oof_logits.npy: damaged, or not the \d+ rows x 3 classes"):
        build_report(model_dir=str(trained / "model"), out=str(trained / "r"), progress=lambda s: None)
    assert not (trained / "r").exists()


@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")), reason="no headless Chromium")
def test_report_renders_in_headless_chromium(trained):
    from PIL import Image
    from pipeline.stages.report import build_report
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


def _photos(d) -> list[str]:
    """Photo-sized JPEGs (1200x900, 900x1200, a 3.5:1 panorama) from scikit-learn's sample photos: predict decodes
    them fully, as a user of the exported model does."""
    from PIL import Image
    from sklearn.datasets import load_sample_image
    out = []
    for name, size in (("china.jpg", (1200, 900)), ("flower.jpg", (900, 1200)), ("china.jpg", (1400, 400))):
        p = d / f"photo_{size[0]}x{size[1]}.jpg"
        Image.fromarray(load_sample_image(name)).resize(size).save(p, quality=90)
        out.append(str(p))
    return out


def test_torchscript_export_matches_predict(trained):
    from pipeline import load_model
    from pipeline.stages.export import export, load_exported
    dst = export(model_dir=str(trained / "model"), fmt="torchscript", out=str(trained / "m.pt"))
    m, meta = load_exported(str(dst))
    assert meta["class_names"] == ["blue", "green", "red"] and meta["adaptation"].startswith("none: each image")
    paths = sorted(str(p) for p in (trained / "test").rglob("*.*")) + _photos(trained)
    pred = load_model(trained / "model", device="cpu").predict(paths, source="none")  # the exported model's contract
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
    from pipeline.stages.export import export
    dst = export(model_dir=str(trained / "model"), fmt="onnx", out=str(trained / "m.onnx"))
    meta = json.loads({p.key: p.value for p in onnx.load(str(dst)).metadata_props}["imgsent"])
    assert meta["class_names"] == ["blue", "green", "red"]
    paths = sorted(str(p) for p in (trained / "test").rglob("*.*")) + _photos(trained)
    pred = load_model(trained / "model", device="cpu").predict(paths, source="none")
    s = ort.InferenceSession(str(dst))
    out = np.concatenate([s.run(None, {"images": decode(p)[None]})[0] for p in paths])
    # onnxruntime's uint8 antialiased Resize rounds a few pixels (~0.2%) one level away from torch's
    np.testing.assert_allclose(out, pred.probs, atol=1e-3)
    assert s.run(None, {"images": np.zeros((2, 51, 77, 3), np.uint8)})[0].shape == (2, 3)


def test_predict_on_a_store_is_predict_on_its_images_without_the_backbone(trained, tmp_path, monkeypatch,
                                                                          tiny_weights):
    """Images extracted once are predicted from their cached features (the store, one per backbone), each group
    of the store a source as predict adapts a manifest's groups, else the whole store as its folder."""
    from pipeline import load_model
    from pipeline.inference.predict import Predictor
    from tests.conftest import run_cli
    model = trained / "affine_model"
    train_head(stores=[str(trained / "train.h5")], out=str(model), progress=lambda s: None,
               params=params(cv={"folds": 3, "repeats": 1}, head={"epochs": 20, "adapt": "affine"}))
    fresh = load_model(model, device="cpu").predict([str(trained / "test")])
    fresh_alone = load_model(model, device="cpu").predict([str(trained / "test")], source="none")
    m = load_model(model, device="cpu")
    monkeypatch.setattr(Predictor, "embed", lambda *a, **k: pytest.fail("a store's images were embedded again"))
    cached = m.predict([str(trained / "test.h5")])
    assert cached.paths == fresh.paths and cached.labels == fresh.labels and set(cached.adapted) == {"affine"}
    np.testing.assert_allclose(cached.probs, fresh.probs, atol=1e-6)
    np.testing.assert_allclose(cached.ood_scores, fresh.ood_scores, atol=1e-6)
    assert set(cached.sources) == {str(trained / "test.h5")}
    alone = m.predict([str(trained / "test.h5")], source="none")
    np.testing.assert_allclose(alone.probs, fresh_alone.probs, atol=1e-6)
    assert np.abs(alone.probs - cached.probs).max() > 1e-3  # the store was adapted as one source
    grouped = tmp_path / "grouped.csv"  # two groups: two sources, as predict adapts a manifest's groups
    grouped.write_text("path,group\n" + "".join(f"{p},{'a' if i % 3 else 'b'}\n" for i, p in enumerate(fresh.paths)))
    extract(images=str(grouped), out=str(tmp_path / "grouped.h5"), backbone=TINY, weights=tiny_weights,
            progress=False, workers=0, allow_outside=True)
    cached = m.predict([str(tmp_path / "grouped.h5")])
    monkeypatch.undo()
    fresh = load_model(model, device="cpu").predict([str(grouped)])
    assert sorted(cached.paths) == sorted(fresh.paths) and set(cached.sources) == set(fresh.sources) == {"a", "b"}
    order = [fresh.paths.index(q) for q in cached.paths]
    np.testing.assert_allclose(cached.probs, fresh.probs[order], atol=1e-6)
    assert cached.sources == [fresh.sources[i] for i in order] and cached.adapted == [fresh.adapted[i] for i in order]
    assert set(cached.adapted) == {"affine", "no (3 images < 5)"}  # group b: 3 images
    r = run_cli("predict", str(model), str(trained / "test.h5"), str(trained / "test"))
    assert r.returncode == 2 and "a feature store among images; pass either images" in r.stderr, r.stderr
    r = run_cli("predict", str(model), str(trained / "train.h5"), "--out", str(tmp_path / "p.csv"))
    assert r.returncode == 0 and "images, 0 failed" in r.stdout, r.stderr


def test_an_export_adapted_to_a_folder_predicts_as_predict_does_on_that_folder(trained, tmp_path):
    """Issue #41: `export --adapt-to FOLDER` bakes that source's shift into the file; each image of the folder then
    gets what `predict MODEL FOLDER` gives it (the folder adapted as one source), and the metadata names the
    source and the transform. Without it the file predicts each image alone (test above)."""
    from pipeline import load_model
    from pipeline.stages.export import export, load_exported
    from tests.conftest import run_cli
    model = trained / "affine_model"
    train_head(stores=[str(trained / "train.h5")], out=str(model), progress=lambda s: None,
               params=params(cv={"folds": 3, "repeats": 1}, head={"epochs": 20, "adapt": "affine"}))
    folder = trained / "test"  # 9 images of another draw: one source
    dst = export(model_dir=str(model), fmt="torchscript", out=str(tmp_path / "a.pt"), adapt_to=str(folder))
    m, meta = load_exported(str(dst))
    assert meta["adapted_to"] == str(folder) and meta["adaptation"].startswith(f"affine: the shift of {folder} (9 ")
    pred = load_model(model, device="cpu").predict([str(folder)])  # predict's default: the folder is one source
    assert set(pred.adapted) == {"affine"}
    with torch.no_grad():
        out = torch.cat([m(torch.from_numpy(decode(p))[None]) for p in pred.paths]).numpy()
    np.testing.assert_allclose(out, pred.probs, atol=1e-4)
    plain = load_model(model, device="cpu").predict([str(folder)], source="none")
    assert np.abs(plain.probs - pred.probs).max() > 1e-3  # the shift is real: baking it in changed the output
    r = run_cli("export", str(trained / "model"), "--out", str(tmp_path / "b.pt"), "--adapt-to", str(folder / "red"))
    few = len(list((folder / "red").iterdir()))
    assert r.returncode == 2 and (f"{few} images could be read, too few to adapt" in r.stderr or
                                  "the model's transform is none" in r.stderr), r.stderr
    # A manifest's group is a source too (predict adapts each group): --adapt-group picks the one to bake in
    manifest = tmp_path / "sources.csv"
    manifest.write_text("path,group\n" + "".join(f"{p},new\n" for p in pred.paths) +
                        "".join(f"{p},old\n" for p in sorted((trained / "imgs" / "red").glob("red_*"))))
    with pytest.raises(UserError, match=r"2 sources \(groups new, old\); pick the one .* with --adapt-group"):
        export(model_dir=str(model), fmt="torchscript", out=str(tmp_path / "c.pt"), adapt_to=str(manifest))
    dst = export(model_dir=str(model), fmt="torchscript", out=str(tmp_path / "c.pt"), adapt_to=str(manifest),
                 adapt_group="new")
    m, meta = load_exported(str(dst))
    assert meta["adapted_group"] == "new" and f"the shift of group new of {manifest} (9 images)" in meta["adaptation"]
    both = load_model(model, device="cpu").predict([str(manifest)])
    new = [i for i, source in enumerate(both.sources) if source == "new"]
    with torch.no_grad():
        out = torch.cat([m(torch.from_numpy(decode(both.paths[i]))[None]) for i in new]).numpy()
    np.testing.assert_allclose(out, both.probs[new], atol=1e-4)
    np.testing.assert_allclose(out, pred.probs, atol=1e-4)  # the group's images, as their folder: the same shift
