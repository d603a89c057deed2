"""The out-of-distribution check: images unlike the training set are labelled unsure however confident the head
is, training-like ones are not; ood.npz is validated like every other model file."""
import csv
import hashlib
import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from features.errors import UserError
from features.extract import extract
from pipeline.inference.ood import knn_distance
from pipeline.inference.predict import load_model
from pipeline.stages.train import train_head
from tests.conftest import TINY, make_images, params, run_cli


def test_knn_distance_leaves_each_row_out_of_its_own_neighbours():
    ref = np.eye(4, dtype=np.float32)
    assert np.allclose(knn_distance(ref, ref, k=1), 0.0)  # each row finds itself
    assert np.allclose(knn_distance(ref, ref, k=1, exclude=np.arange(4)), 1.0)  # orthogonal to every other
    q = np.array([[1, 1, 0, 0]], np.float32) / np.sqrt(2)
    assert np.allclose(knn_distance(q, ref, k=2), 1 - 1 / np.sqrt(2))


@pytest.fixture
def model(tmp_path, tiny_weights):
    imgs = make_images(tmp_path / "imgs", per_class=20)
    extract(images=str(imgs), out=str(tmp_path / "s.h5"), backbone=TINY, weights=tiny_weights, progress=False,
            workers=0)
    train_head(stores=[str(tmp_path / "s.h5")], out=str(tmp_path / "m"), params=params(cv={"folds": 3}),
               progress=lambda s: None)
    return tmp_path / "m"


def _strangers(folder):
    """Images nothing like colour blobs: noise, flat grey, black text on white, stripes."""
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3)).astype(np.uint8)).save(folder / f"noise{i}.png")
        Image.new("RGB", (40, 40), (60 * i, 60 * i, 60 * i)).save(folder / f"flat{i}.png")
        im = Image.new("RGB", (120, 40), "white")
        ImageDraw.Draw(im).text((4, 12), f"invoice {i} total", fill="black")
        im.save(folder / f"text{i}.png")
        a = np.zeros((40, 40, 3), np.uint8)
        a[:, :: 2 + i] = 255
        Image.fromarray(a).save(folder / f"stripes{i}.png")
    return folder


def test_strangers_are_unsure_and_lookalikes_are_not(model, tmp_path):
    m = load_model(model, device="cpu")
    like = m.predict([str(make_images(tmp_path / "new", per_class=6, seed=7))])
    far = m.predict([str(_strangers(tmp_path / "far"))])
    assert np.mean([lab == "unsure" for lab in like.labels]) <= 0.2
    assert np.mean([lab == "unsure" for lab in far.labels]) >= 0.8
    assert np.nanmin(far.ood_scores) > np.nanmedian(like.ood_scores)
    never = m.predict([str(tmp_path / "far")], ood_quantile=1.0)  # 1 = the check is off
    assert "unsure" not in never.labels


def test_predict_csv_has_the_score_and_the_cli_checks_the_quantile(model, tmp_path):
    _strangers(tmp_path / "far")
    r = run_cli("predict", str(model), str(tmp_path / "far"), "--out", str(tmp_path / "p.csv"), "--no-progress",
                check=True)
    assert "unlike the training images (labelled unsure)" in r.stdout
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    flagged = [r for r in rows if r["predicted"] == "unsure"]
    assert flagged  # the CSV carries the score that made them unsure: above the model's threshold
    m = load_model(model, device="cpu")
    assert all(float(r["ood_score"]) > m.predict([r["path"]]).ood_threshold for r in flagged)
    bad = run_cli("predict", str(model), str(tmp_path / "far"), "--out", str(tmp_path / "q.csv"),
                  "--ood-quantile", "0")
    assert bad.returncode == 2 and "--ood-quantile 0.0: must be within (0, 1]" in bad.stderr
    assert not (tmp_path / "q.csv").exists()


def test_a_damaged_or_missing_ood_file_is_one_line(model, tmp_path):
    (model / "ood.npz").write_bytes(b"garbage")
    with pytest.raises(UserError, match="ood.npz: does not belong with model.json"):
        load_model(model, device="cpu")
    r = run_cli("predict", str(model), str(make_images(tmp_path / "x", per_class=1)), "--out", str(tmp_path / "p.csv"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "ood.npz: does not belong" in r.stderr
    (model / "ood.npz").write_bytes(b"PK\x03\x04garbage")  # a broken archive that matches its checksum: a
    meta = json.loads((model / "model.json").read_text())  # hand-edited model.json
    meta["ood"]["sha256"] = hashlib.sha256((model / "ood.npz").read_bytes()).hexdigest()
    (model / "model.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="ood.npz: unreadable; re-run imgsent train-head"):
        load_model(model, device="cpu")
    (model / "ood.npz").unlink()
    with pytest.raises(UserError, match="ood.npz: missing"):
        load_model(model, device="cpu")


def test_a_model_from_before_the_check_still_predicts(model, tmp_path):
    meta = json.loads((model / "model.json").read_text())
    meta["ood"] = None
    (model / "model.json").write_text(json.dumps(meta))
    (model / "ood.npz").unlink()
    p = load_model(model, device="cpu").predict([str(make_images(tmp_path / "new", per_class=2, seed=3))])
    assert p.ood_scores is None and "unsure" not in p.labels


@pytest.mark.parametrize("shape,k", [((300, 4096), 10), ((64, 3001), 10), ((20, 700), 10), ((9, 129), 3), ((4, 12), 10)])
def test_top_k_equals_a_full_partition(shape, k):
    """The chunked top-k gives the same k largest values per row as np.partition, ties and -inf included."""
    from pipeline.inference.ood import top_k
    rng = np.random.default_rng(0)
    sim = rng.normal(size=shape).astype(np.float32)
    sim[0] = 1.0  # a row of ties
    sim[1, : shape[1] // 2] = -np.inf
    k = min(k, shape[1])
    ours = np.sort(top_k(sim, k), 1)
    assert ours.shape == (shape[0], k)
    assert np.array_equal(ours, np.sort(np.partition(sim, shape[1] - k, axis=1)[:, shape[1] - k:], 1))


def test_threshold_holds_on_small_training_sets_and_says_how_it_was_set():
    """Issue #25: from 18 leave-one-out scores the 0.99 quantile is just their maximum, and a model of 18 images
    flagged no photo. Under 1/(1 - q) scores a normal tail stands in; under MIN_JUDGE there is no threshold."""
    from pipeline.inference.ood import MIN_JUDGE, threshold
    rng = np.random.default_rng(0)
    big = np.sort(rng.normal(0.3, 0.05, 5000))
    thr, note = threshold(big, 0.99)
    assert note == "" and thr == pytest.approx(np.quantile(big, 0.99))
    small = np.sort(rng.normal(0.3, 0.05, 40))
    thr, note = threshold(small, 0.99)
    assert "estimated, not counted" in note and "only" in note and thr == pytest.approx(small.mean() + 2.3263 * small.std(ddof=1), rel=1e-3)
    assert abs(thr - np.quantile(big, 0.99)) < abs(small.max() - np.quantile(big, 0.99)) + 0.02
    thr, note = threshold(small[:MIN_JUDGE - 1], 0.99)
    assert thr == float("inf") and "too few to tell what is unlike them" in note


def test_a_tiny_model_does_not_flag_and_says_why(tmp_path, tiny_weights):
    imgs = make_images(tmp_path / "imgs", per_class=5)  # 15 training images
    extract(images=str(imgs), out=str(tmp_path / "s.h5"), backbone=TINY, weights=tiny_weights, progress=False)
    train_head(stores=[str(tmp_path / "s.h5")], out=str(tmp_path / "m"), params=params(cv={"folds": 3}),
               progress=lambda s: None)
    _strangers(tmp_path / "far")
    r = run_cli("predict", str(tmp_path / "m"), str(tmp_path / "far"), "--out", str(tmp_path / "p.csv"),
                "--no-progress", check=True)
    assert "no image marked unsure: 15 training images are too few" in r.stdout


def test_a_small_model_still_tells_photos_from_emoji(tmp_path):
    """Issue #33: a model of 18 or 51 emoji flagged none of 7 photos: scored in the head's standardised space, the
    spread of a few dozen images in every dimension made every image look far, and the threshold rose beyond
    reach. Scored on the raw features of the real backbone, 20 emoji are enough: photos are unsure, unseen emoji
    of the same design are not."""
    from PIL import Image
    from skimage import data
    from sklearn.datasets import load_sample_images
    from tests.conftest import SHARED
    noto = SHARED / "emoji-faces7" / "noto"
    if not noto.is_dir():
        pytest.skip("needs ../shared/data")
    with open(tmp_path / "train.csv", "w") as f:
        f.write("path,label\n" + "".join(f"{p},{c}\n" for c in ("happy", "sad", "fear")
                                         for p in sorted((noto / c).glob("*.png"))[:7]))
    (tmp_path / "photos").mkdir()
    for i, im in enumerate([data.astronaut(), data.chelsea(), data.coffee(), *load_sample_images().images]):
        Image.fromarray(im).save(tmp_path / "photos" / f"{i}.jpg")
    extract(images=str(tmp_path / "train.csv"), out=str(tmp_path / "s.h5"), progress=False, allow_outside=True)
    train_head(stores=[str(tmp_path / "s.h5")], out=str(tmp_path / "m"), params=params(cv={"folds": 3}),
               progress=lambda s: None)
    m = load_model(tmp_path / "m", device="cpu")
    photos = m.predict([str(tmp_path / "photos")], source="none")
    unseen = m.predict([str(p) for p in sorted((noto / "happy").glob("*.png"))[7:]], source="none")
    assert photos.labels == ["unsure"] * 5 and photos.ood_note.startswith("'unsure' judged from only 20 training images"), photos.ood_scores
    assert np.mean([lab == "unsure" for lab in unseen.labels]) <= 0.25, unseen.ood_scores
