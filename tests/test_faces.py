"""Face mode (--faces largest|all) on real photos of people that ship in installed packages (tests/faces_data.py):
detection, one row per face with its crop box, no-face images recorded, per-image aggregation in predict,
fusion with a whole-image store, incremental re-runs and resume, the report's boxes, export's refusal."""
from __future__ import annotations

import base64
import csv
import io
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import TINY, params, run_cli
from faces_data import ASTRONAUT_FACE, astronaut, canvas, grace, head, iou, no_face
from features.errors import UserError
from features.extract import Interrupted, extract
from features.models.faces import NO_FACE, FaceSpec, detect, expand, face_boxes
from features.storage.store import read_store

FER = "fer_mini_xception"


def _save(a: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)
    return path


def two_faces() -> tuple[np.ndarray, list[tuple]]:
    """The astronaut's and Grace Hopper's heads side by side; the expected crop of each, left to right."""
    im, rects = canvas([(head("astronaut"), 50, 50, 1.0), (head("grace"), 550, 100, 1.0)])
    spec = FaceSpec.make("all")
    want = []
    for name, (x, y, _, _) in zip(("astronaut", "grace"), rects):
        fx, fy, fw, fh = detect(head(name), spec)[0]  # the face within the pasted patch (scale 1)
        want.append(expand((fx + x, fy + y, fw, fh), spec.margin, im.shape[1], im.shape[0]))
    return im, want


@pytest.fixture(scope="module")
def people(tmp_path_factory) -> Path:
    """Two classes (whose face it is) of photo-sized canvases, a two-face canvas, and a photo with no one in it."""
    root = tmp_path_factory.mktemp("people") / "imgs"
    rng = np.random.default_rng(0)
    backgrounds = [None, no_face("china.jpg"), no_face("flower.jpg")]
    for name in ("astronaut", "grace"):
        for i in range(6):
            im, _ = canvas([(head(name), int(rng.integers(0, 500)), int(rng.integers(0, 150)),
                             float(rng.uniform(0.8, 1.0)))], background=backgrounds[i % 3])
            _save(im, root / name / f"{name}_{i}.png")
    _save(two_faces()[0], root / "astronaut" / "two.png")
    _save(no_face("china.jpg"), root / "grace" / "china.png")
    old = time.time() - 3600  # not 'racy' (modified just before a pass), so a no-op re-run hashes nothing
    for f in root.rglob("*.png"):
        os.utime(f, (old, old))
    return root


def test_astronaut_face_found_where_checked_by_eye_and_no_face_in_photos_without_people():
    spec = FaceSpec.make("largest")
    boxes = detect(astronaut(), spec)
    assert len(boxes) == 1 and iou(boxes[0], ASTRONAUT_FACE) >= 0.5
    assert len(detect(grace(), spec)) == 1
    for name in ("china.jpg", "flower.jpg"):
        assert detect(no_face(name), spec) == [] and face_boxes(no_face(name), spec) == []
    # the crop is the face plus a margin, clipped to the image; the whole-image fallback is the whole image
    (crop,) = face_boxes(astronaut(), spec)
    assert iou(crop, expand(boxes[0], spec.margin, 512, 512)) == 1.0 and crop[2] > boxes[0][2]
    whole = FaceSpec.make("largest", "whole")
    assert face_boxes(no_face("china.jpg"), whole) == [(0, 0, 640, 427)]
    with pytest.raises(UserError, match="--faces sideways"):
        FaceSpec.make("sideways")
    with pytest.raises(UserError, match="--faces-fallback"):
        FaceSpec.make("all", "guess")


def test_two_face_canvas_gives_two_rows_with_their_boxes(tmp_path):
    im, want = two_faces()
    _save(im, tmp_path / "imgs" / "people" / "two.png")
    _save(no_face("flower.jpg"), tmp_path / "imgs" / "people" / "flower.png")
    extract(images=str(tmp_path / "imgs"), out=str(tmp_path / "all.h5"), backbone=FER, faces="all", progress=False)
    s = read_store(tmp_path / "all.h5")
    assert s.paths == ["people/two.png", "people/two.png"] and s.face_index.tolist() == [0, 1]
    for got, exp in zip(s.face_boxes.tolist(), want):
        assert iou(tuple(got), exp) >= 0.5, (got, exp)
    assert s.skipped == [("people/flower.png", NO_FACE)]  # recorded with its reason, never silently dropped
    assert s.sha256[0] == s.sha256[1] and not np.allclose(s.features[0], s.features[1])
    assert s.fingerprint["faces"]["mode"] == "all" and s.fingerprint["faces"]["detector"] == "mtcnn"
    # largest: one row, Grace's (the larger face); fallback whole: the flower photo embedded whole
    extract(images=str(tmp_path / "imgs"), out=str(tmp_path / "largest.h5"), backbone=FER, faces="largest",
            faces_fallback="whole", progress=False)
    s = read_store(tmp_path / "largest.h5")
    assert s.paths == ["people/flower.png", "people/two.png"] and s.skipped == []
    assert s.face_boxes[0].tolist() == [0, 0, 640, 427] and iou(tuple(s.face_boxes[1]), want[1]) >= 0.5
    # a store cut another way is another fingerprint: refused, never mixed
    with pytest.raises(UserError, match=r"made with other settings \(--faces all != largest\)"):
        extract(images=str(tmp_path / "imgs"), out=str(tmp_path / "all.h5"), backbone=FER, faces="largest",
                progress=False)


def test_images_at_the_face_limit_are_said_not_silently_cut(tmp_path, monkeypatch):
    """Issue #25: `--faces all` keeps at most max_faces crops per image (the largest); a crowd photo lost its
    other faces without a word. With the limit at 1, the two-face canvas keeps one row and the summary says so."""
    import dataclasses
    make = FaceSpec.make.__func__
    monkeypatch.setattr(FaceSpec, "make", classmethod(lambda cls, *a: dataclasses.replace(make(cls, *a), max_faces=1)))
    _save(two_faces()[0], tmp_path / "imgs" / "people" / "two.png")
    s = extract(images=str(tmp_path / "imgs"), out=str(tmp_path / "all.h5"), backbone=FER, faces="all",
                progress=False)
    assert s.face_rows == 1 and s.face_capped == 1
    assert "1 images reached the limit of 1 faces: their 1 largest were kept" in s.line()


def test_face_rows_survive_interruption_and_rerun_like_whole_images(tmp_path, people, monkeypatch, ctrl_c_after):
    out = tmp_path / "s.h5"
    ctrl_c_after(5)
    with pytest.raises(Interrupted):
        extract(images=str(people), out=str(out), backbone=FER, faces="all", commit_every=2, progress=False,
                batch_size=2)
    resumed = extract(images=str(people), out=str(out), backbone=FER, faces="all", progress=False)
    assert resumed.reused >= 4 and resumed.reused + resumed.extracted == 13  # committed images not embedded again
    fresh = extract(images=str(people), out=str(tmp_path / "fresh.h5"), backbone=FER, faces="all", progress=False)
    a, b = read_store(out), read_store(tmp_path / "fresh.h5")
    assert a.paths == b.paths and a.face_index.tolist() == b.face_index.tolist()
    assert np.array_equal(a.face_boxes, b.face_boxes) and np.allclose(a.features, b.features, atol=1e-5)
    assert fresh.face_rows == len(a) and a.paths.count("astronaut/two.png") == 2
    assert ("grace/china.png", NO_FACE) in a.skipped
    # no-op: nothing embedded, store not rewritten; one new image: only it is embedded
    mtime = out.stat().st_mtime_ns
    import features.extract as fx

    def no_network(*a, **k):
        raise AssertionError("a no-op re-run built the network or searched an image for faces again")
    with monkeypatch.context() as m:
        for name in ("load_backbone", "cached_engine", "iter_face_embeddings"):
            m.setattr(fx, name, no_network)
        again = extract(images=str(people), out=str(out), backbone=FER, faces="all", progress=False)
    assert again.extracted == 0 and again.unchanged and out.stat().st_mtime_ns == mtime
    assert ("grace/china.png", NO_FACE) in again.skipped and len(read_store(out).noface) == 1
    more = tmp_path / "more"
    shutil.copytree(people, more)
    _save(head("grace"), more / "grace" / "new.png")
    shutil.copy(out, tmp_path / "m.h5")
    plus = extract(images=str(more), out=str(tmp_path / "m.h5"), backbone=FER, faces="all", progress=False)
    assert plus.extracted == 1 and plus.reused == len(set(a.paths)) and plus.face_rows == len(a) + 1


def test_predict_aggregates_faces_per_image_and_export_refuses(tmp_path, people):
    from pipeline.inference.predict import load_model
    from pipeline.inference.predictions import faces_csv
    from pipeline.stages.train import train_head
    store = tmp_path / "fer.h5"
    extract(images=str(people), out=str(store), backbone=FER, faces="all", progress=False)
    train_head(stores=[str(store)], out=str(tmp_path / "m"), progress=lambda *_: None,
               params=params(cv={"folds": 2}, head={"epochs": 30}))
    with open(tmp_path / "m" / "oof_predictions.csv", newline="") as f:
        oof = list(csv.DictReader(f))
    assert [r["face"] for r in oof if r["path"] == "astronaut/two.png"] == ["0", "1"]
    # train-head scores face rows, and each image by the mean of its faces' probabilities (predict's verdict)
    import json
    m = json.loads((tmp_path / "m" / "details.json").read_text())
    by_image: dict[str, list] = {}
    for r in oof:
        by_image.setdefault(r["path"], []).append((r["label"], [float(r["p_astronaut"]), float(r["p_grace"])]))
    right = [v[0][0] == ("astronaut", "grace")[int(np.argmax(np.mean([q for _, q in v], 0)))] for v in by_image.values()]
    assert m["n_faces"] == len(oof) == len(read_store(store)) and m["n_images"] == len(by_image) == len(oof) - 1
    assert m["per_image"]["n"] == len(by_image) and m["per_image"]["accuracy"] == pytest.approx(np.mean(right))
    model = load_model(tmp_path / "m", device="cpu")
    p = model.predict([str(people / "astronaut" / "two.png"), str(people / "grace" / "china.png")])
    assert p.errors == ["", NO_FACE] and p.labels[1] == "" and np.isnan(p.probs[1]).all() and p.face_note == ""
    import dataclasses  # issue #33: an image at the face limit was cut silently in predict (extract said so)
    model.faces = dataclasses.replace(model.faces, max_faces=2)
    assert model.predict([str(people / "astronaut" / "two.png")]).face_note == \
        "1 image reached the limit of 2 faces: any others in them were not classified"
    assert p.faces.image.tolist() == [0, 0] and p.faces.face.tolist() == [0, 1]
    assert np.allclose(p.probs[0], p.faces.probs.mean(0), atol=1e-6)
    cached, fresh = model.predict([str(store)]), model.predict([str(people)])  # the store's features: the same faces
    at = {q: i for i, q in enumerate(fresh.paths)}
    both = [at[q] for q in cached.paths]
    assert len(both) == len(cached.paths) == len(set(read_store(store).paths)) and cached.faces.boxes.shape[1] == 4
    np.testing.assert_allclose(cached.probs, fresh.probs[both], atol=1e-5)
    assert cached.labels == [fresh.labels[i] for i in both]
    assert np.allclose(p.ood_scores[0], p.faces.ood_scores.mean(), atol=1e-5)
    im, want = two_faces()
    assert all(iou(tuple(b), w) >= 0.5 for b, w in zip(p.faces.boxes.tolist(), want))
    out = tmp_path / "pred.csv"
    r = run_cli("predict", str(tmp_path / "m"), str(people / "astronaut" / "two.png"), str(people / "grace" / "china.png"),
                "--out", str(out), "--no-progress", check=True)
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    with open(faces_csv(out), newline="") as f:
        faces = list(csv.DictReader(f))
    assert [r["faces"] for r in rows] == ["2", "0"] and rows[1]["error"] == NO_FACE
    assert len(faces) == 2 and [int(faces[1][k]) for k in "xywh"] == p.faces.boxes[1].tolist()
    mean = np.mean([[float(f[k]) for k in ("p_astronaut", "p_grace")] for f in faces], axis=0)
    assert np.allclose(mean, [float(rows[0][k]) for k in ("p_astronaut", "p_grace")], atol=2e-6)
    # suggest ranks images, not faces: the two-face canvas is one candidate. The same pixels in other bytes: images
    # the model was not trained on (suggest skips those it was, evaluate leaves them out)
    from PIL import PngImagePlugin
    from pipeline.stages.suggest import suggest
    note = PngImagePlugin.PngInfo()
    note.add_text("copy", "held out")
    for name in ("astronaut/two.png", "grace/grace_0.png", "astronaut/astronaut_1.png"):
        Image.open(people / name).save(_save(np.zeros((1, 1, 3), np.uint8), tmp_path / "unlabelled" /
                                             name.replace("/", "_")), pnginfo=note)
    extract(images=str(tmp_path / "unlabelled"), out=str(tmp_path / "u.h5"), backbone=FER, faces="all", progress=False)
    assert len(read_store(tmp_path / "u.h5")) == 4
    picked = suggest(model_dir=str(tmp_path / "m"), stores=[str(tmp_path / "u.h5")], out=str(tmp_path / "s.csv"),
                     n=5, max_similarity=1.0, progress=lambda s: None)
    assert sorted(picked) == ["astronaut_astronaut_1.png", "astronaut_two.png", "grace_grace_0.png"]
    # a store of whole images is not what a face model was trained on: refused, naming why
    from pipeline.stages.evaluate import evaluate
    extract(images=str(people), out=str(tmp_path / "whole.h5"), backbone=FER, progress=False)
    with pytest.raises(UserError, match=r"whole.h5: features do not match the model \(--faces off != all\)"):
        evaluate(model_dir=str(tmp_path / "m"), stores=[str(tmp_path / "whole.h5")], out=str(tmp_path / "ev"))
    with pytest.raises(UserError, match=r"fer.h5: all 13 labelled images in it are images the model was trained on"):
        evaluate(model_dir=str(tmp_path / "m"), stores=[str(store)], out=str(tmp_path / "ev"))  # faces count once
    for f in people.rglob("*.png"):
        (tmp_path / "again" / f.parent.name).mkdir(parents=True, exist_ok=True)
        Image.open(f).save(tmp_path / "again" / f.parent.name / f.name, pnginfo=note)
    extract(images=str(tmp_path / "again"), out=str(tmp_path / "again.h5"), backbone=FER, faces="all", progress=False)
    ev = evaluate(model_dir=str(tmp_path / "m"), stores=[str(tmp_path / "again.h5")], out=str(tmp_path / "ev"),
                  progress=lambda s: None)
    assert ev["test"]["n"] == len(oof) and ev["per_image"]["n"] == len(by_image)
    # the report reads each row's crop box back from the out-of-fold CSV and draws it on the thumbnails
    from pipeline.inference.modeldir import load_model_dir
    from pipeline.stages.report import _oof_split, build_report
    split = _oof_split(tmp_path / "m", load_model_dir(tmp_path / "m")[1])
    two_rows = [i for i, q in enumerate(split.paths) if q == "astronaut/two.png"]
    assert split.face[two_rows].tolist() == [0, 1] and all(iou(tuple(split.boxes[i]), w) >= 0.5
                                                             for i, w in zip(two_rows, want))
    build_report(model_dir=str(tmp_path / "m"), out=str(tmp_path / "report"), progress=lambda *_: None)
    page = (tmp_path / "report" / "index.html").read_text()
    assert "Suspected label errors" in page and f"· {len(by_image)} images</p>" in page and "Rows are face crops" in page
    r = run_cli("export", str(tmp_path / "m"), "--format", "onnx", "--out", str(tmp_path / "m.onnx"))
    assert r.returncode == 2 and "face detector" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "m.onnx").exists()


def test_face_store_fuses_with_a_whole_image_store(tmp_path, people, tiny_weights):
    from pipeline.data.rows import open_rows
    extract(images=str(people), out=str(tmp_path / "fer.h5"), backbone=FER, faces="all", progress=False)
    extract(images=str(people), out=str(tmp_path / "tiny.h5"), backbone=TINY, weights=tiny_weights, progress=False)
    stores = [str(tmp_path / "tiny.h5"), str(tmp_path / "fer.h5")]
    with pytest.raises(UserError, match="faces-fallback whole, or --intersect"):
        open_rows(stores)  # china.png has no face: the stores hold different images
    rows = open_rows(stores, intersect=True)
    fer, tiny = read_store(tmp_path / "fer.h5"), read_store(tmp_path / "tiny.h5")
    assert rows.paths == fer.paths and rows.face_index.tolist() == fer.face_index.tolist()
    two = [i for i, p in enumerate(rows.paths) if p == "astronaut/two.png"]
    d = tiny.dim
    assert len(two) == 2 and np.array_equal(rows.features[two[0], :d], rows.features[two[1], :d])  # broadcast
    assert np.allclose(rows.features[two[0], :d], tiny.features[tiny.paths.index("astronaut/two.png")])
    assert np.allclose(rows.features[two, d:], fer.features[two])


def test_report_draws_the_crop_box_on_thumbnails(tmp_path):
    from pipeline.analysis.html import thumb as _thumb
    _save(np.full((200, 300, 3), 255, np.uint8), tmp_path / "white.png")
    uri = _thumb(str(tmp_path), "white.png", size=96, box=(100, 50, 100, 100))
    im = np.array(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB")).astype(int)
    red = (im[..., 0] > 180) & (im[..., 1] < 120) & (im[..., 2] < 120)  # (64, 96)
    ys, xs = np.nonzero(red)
    assert red.sum() > 20 and 28 <= xs.min() <= 36 and 60 <= xs.max() <= 68 and ys.min() >= 12
    plain = _thumb(str(tmp_path), "white.png", size=96)
    im = np.array(Image.open(io.BytesIO(base64.b64decode(plain.split(",", 1)[1]))).convert("RGB")).astype(int)
    assert not ((im[..., 0] > 180) & (im[..., 1] < 120)).any()


def test_params_take_an_unquoted_off_and_refuse_unknown_modes():
    import yaml
    from pipeline.params import parse_params
    from conftest import ROOT
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["extract"]["faces"] = yaml.safe_load("x: off")["x"]  # YAML 1.1: False
    assert parse_params(raw).extract.faces == "off"
    raw["extract"]["faces"] = "biggest"
    with pytest.raises(UserError, match="extract.faces='biggest': allowed values are off, largest, all"):
        parse_params(raw)


def test_face_mode_shards_assemble_to_the_single_store(tmp_path, people):
    from features.extract import shard_path
    from features.shards import assemble_shards
    out = tmp_path / "s.h5"
    for i in range(2):
        extract(images=str(people), out=str(out), backbone=FER, faces="all", num_shards=2, shard_index=i,
                progress=False)
    summary = assemble_shards(out=str(out), num_shards=2)
    extract(images=str(people), out=str(tmp_path / "one.h5"), backbone=FER, faces="all", progress=False)
    a, b = read_store(out), read_store(tmp_path / "one.h5")
    assert [len(read_store(shard_path(out, i, 2))) for i in range(2)] != [0, 0]
    assert a.paths == b.paths and a.face_index.tolist() == b.face_index.tolist() and a.sha256 == b.sha256
    assert np.array_equal(a.face_boxes, b.face_boxes) and np.allclose(a.features, b.features, atol=1e-5)
    assert summary.face_rows == len(b) and summary.rows == len(set(b.paths)) and a.skipped == b.skipped
