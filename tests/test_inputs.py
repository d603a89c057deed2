"""Bad paths, manifests and images: refused before the long work with one line, or recorded per image with a
reason; memory per image bounded (aspect-ratio bombs)."""
import csv
import json
import os
import shutil
import stat
import subprocess
import sys

import pytest
from PIL import Image

from features.errors import UserError
from features.extract import extract
from features.input.sources import discover
from tests.conftest import ROOT, TINY, make_images, run_cli
from tests.test_faults import one_line_error, world  # noqa: F401 - the module-scoped fixture


# --------------------------------------------------------------------------- output paths, checked before work

def test_extract_out_that_is_not_a_store_is_refused_before_work(tmp_path, tiny_weights):
    images = make_images(tmp_path / "imgs", per_class=2)
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    kw = ["--backbone", TINY, "--weights", tiny_weights, "--no-progress"]
    one_line_error(run_cli("extract", str(images), "--out", str(notes), *kw), "notes.txt: exists and is not a feature store")
    assert notes.read_text() == "my notes"
    one_line_error(run_cli("extract", str(images), "--out", str(tmp_path), *kw), "is a folder")
    one_line_error(run_cli("extract", str(images), "--out", "/proc/imgsent-test.h5", *kw), "cannot write in /proc")
    one_line_error(run_cli("extract", str(images), "--out", str(notes / "s.h5"), *kw), "cannot write in")
    one_line_error(run_cli("train-head", "missing.h5", "--out", str(notes)),
                   "notes.txt: is a file, not a folder; pass a folder name for the model directory")
    assert notes.read_text() == "my notes"


def test_predict_paths(world, tmp_path):  # noqa: F811
    m = str(world / "model")
    one_line_error(run_cli("predict", m, str(tmp_path / "missing"), "--out", str(tmp_path / "p.csv")), "no such file")
    (tmp_path / "empty").mkdir()
    one_line_error(run_cli("predict", m, str(tmp_path / "empty"), "--out", str(tmp_path / "p.csv")), "holds no files")
    one_line_error(run_cli("predict", m, str(world / "test"), "--out", str(tmp_path)), "is a folder")
    one_line_error(run_cli("predict", m, str(world / "test"), "--batch-size", "0"), "--batch-size 0")
    one_line_error(run_cli("report", m, "--gallery", "-5", "--out", str(tmp_path / "r")), "--gallery -5")
    odd = tmp_path / "odd"
    odd.mkdir()
    Image.new("RGB", (20, 20), (200, 30, 30)).save(odd / "plain.png")
    with open(os.fsencode(str(odd)) + b"/bad-\xff.png", "wb") as f:
        Image.new("RGB", (20, 20), (200, 30, 30)).save(f, "PNG")
    (odd / "vector.svg").write_text("<svg/>")
    r = run_cli("predict", m, str(odd), "--out", str(tmp_path / "p.csv"), "--no-progress")
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(open(tmp_path / "p.csv", encoding="utf-8")))
    assert len(rows) == 3 and any("bad-\\xff.png" in row["path"] and row["predicted"] for row in rows)
    assert [row["error"] for row in rows if row["path"].endswith(".svg")][0].startswith("unsupported file type .svg")


# --------------------------------------------------------------------------- manifests

def _manifest(root, text, encoding="utf-8"):
    p = root / "m.csv"
    p.write_bytes(text.encode(encoding))
    return p


def test_manifest_encoding_and_quoting_errors_are_one_line(tmp_path):
    root = make_images(tmp_path / "imgs", per_class=2)
    with pytest.raises(UserError, match=r"m.csv: not UTF-8 text \(byte 0xe9 on line 3\); re-save"):
        discover(_manifest(root, "path,label\nred/red_00.jpg,red\nred/caf\u00e9.jpg,red\n", "latin-1"))
    with pytest.raises(UserError, match=r"m.csv: line \d+: unexpected end of data .*fix the quoting"):
        discover(_manifest(root, 'path,label\n"red/red_00.jpg,red\nblue/blue_00.jpg,blue\n'))


def test_manifest_rows_refused_with_reasons_never_silently(tmp_path):
    root = make_images(tmp_path / "imgs", per_class=2)
    absolute = str((root / "green" / "green_00.jpg").resolve())
    src = discover(_manifest(root, "path,label\n"
                                   "red/red_00.jpg,red\n"
                                   "blue/blue_00.jpg,blue,extra\n"  # an unquoted comma: not a new class
                                   "blue/blue_01.png,\n"  # empty label: not silently unlabelled
                                   f"{absolute},green\n"  # absolute paths are explicit: accepted
                                   "../outside.png,red\n"))
    assert [i.label for i in src.items] == ["red", "green"] and src.class_names == ["green", "red"]
    why = dict(src.problems)
    assert "has 3 fields, the header has 2" in why["blue/blue_00.jpg"]
    assert why["blue/blue_01.png"].startswith("empty label (line 4)")
    assert "climbs out of the manifest folder" in why["../outside.png"]
    with pytest.raises(UserError, match=r"no usable images: 1 refused \(1 x relative path climbs out"):
        discover(_manifest(root, "path,label\n../outside.png,red\n"))


def test_a_class_without_a_usable_image_is_no_class_and_a_classes_typo_is_said(tmp_path):
    """A manifest read with --classes kept a class no row had: train-head then averaged its F1 of 0 into every macro
    score (0.52 where the two real classes scored 0.80); a class whose every row was refused stayed too."""
    root = make_images(tmp_path / "imgs", per_class=2)
    (root / "blue" / "x.svg").write_text("<svg/>")
    src = discover(_manifest(root, "path,label\nred/red_00.jpg,red\ngreen/green_00.jpg,green\nblue/x.svg,blue\n"),
                   classes=["red", "green", "blue", "angry"])
    assert src.class_names == ["red", "green"] and src.unused_classes == ["blue", "angry"]
    assert "unsupported file type .svg" in dict(src.problems)["blue/x.svg"]
    src = discover(_manifest(root, "path,label\nred/red_00.jpg,red\ngreen/green_00.jpg,green\nblue/x.svg,blue\n"))
    assert src.class_names == ["green", "red"] and src.unused_classes == []  # its refused row says why
    src = discover(root, classes=["red", "gren"])  # a typo: green's images are refused as an unknown label
    assert src.class_names == ["red"] and src.unused_classes == ["gren"]
    assert "unknown label 'green'" in dict(src.problems)["green/green_00.jpg"]


def test_unsupported_files_in_class_folders_are_recorded(tmp_path, tiny_weights):
    root = make_images(tmp_path / "imgs", per_class=2)
    (root / "red" / "logo.svg").write_text("<svg/>")
    (root / "red" / "notes.txt").write_text("hi")
    s = extract(images=str(root), out=str(tmp_path / "s.h5"), backbone=TINY, weights=tiny_weights, progress=False,
                workers=0)
    why = dict(s.skipped)
    assert why["red/logo.svg"].startswith("unsupported file type .svg") and "red/notes.txt" in why
    assert s.rows == 6


def _deep_folder(top, depth_chars: int = 4200):
    """A chain of 200-character folder names whose full path exceeds PATH_MAX (4096), made with relative mkdirs
    (an absolute path that long cannot be passed to the kernel). Returns the deepest folder's path as a string."""
    here = os.getcwd()
    path = str(top)
    try:
        os.chdir(top)
        while len(path) < depth_chars:
            os.mkdir("d" * 200)
            os.chdir("d" * 200)
            path += "/" + "d" * 200
        Image.new("RGB", (40, 40), (9, 9, 9)).save("deep.png")
    finally:
        os.chdir(here)
    return path


def test_every_file_under_the_root_is_a_row_or_a_skip(tmp_path, tiny_weights):
    """Extract's summary accounts for every file: a linked sub-folder is read, a link loop and a folder beyond
    PATH_MAX are reported, and rows + skipped = files seen: an image under two labels (a label conflict) is a row
    of each, and listed."""
    root = make_images(tmp_path / "imgs", per_class=2)  # red/, green/, blue/: 6 images
    shutil.copy(root / "red" / "red_00.jpg", root / "blue" / "copy.jpg")  # the same bytes under blue too
    shutil.copy(root / "red" / "red_00.jpg", root / "loose.jpg")  # ...and unlabelled beside the class folders
    elsewhere = make_images(tmp_path / "elsewhere", per_class=3)
    os.symlink(elsewhere / "red", root / "red" / "more")  # 3 more red images, through a folder link
    os.symlink(root / "green", root / "green" / "loop")  # a loop back to its own class folder
    _deep_folder(root / "blue")
    s = extract(images=str(root), out=str(tmp_path / "s.h5"), backbone=TINY, weights=tiny_weights, progress=False,
                workers=0)
    why = dict(s.skipped)
    assert s.rows == 6 + 3 + 2
    assert "already read" in why["green/loop/"]
    assert any("File name too long" in r for r in why.values()), why
    assert dict(s.conflicts) == {"red/red_00.jpg": "identical to blue/copy.jpg which is labelled 'blue', this one 'red'",
                                 "loose.jpg": "identical to blue/copy.jpg which is labelled 'blue', this one unlabelled"}
    assert s.rows + len(s.skipped) == s.seen
    assert f"; {s.seen} files seen" in s.line()


# --------------------------------------------------------------------------- memory per image

@pytest.mark.parametrize("size", [(60000, 2), (2, 60000)])
def test_aspect_ratio_bombs_have_bounded_memory(tmp_path, size):
    path = tmp_path / f"bomb_{size[0]}x{size[1]}.png"
    Image.new("RGB", size, (200, 30, 30)).save(path)
    code = f"""
import json, resource, sys
sys.path.insert(0, {str(ROOT)!r})
from features.models.preprocess import Preprocess, prepare
from features.input.images import decode
pre = Preprocess(size=224, resize=256, interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3)
prepare(decode({str(ROOT / "data/demo/test/happy/1f600.png")!r}), pre)  # warm up
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
x = prepare(decode({str(path)!r}), pre)
print(json.dumps({{"shape": list(x.shape), "grew_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024}}))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["shape"] == [3, 224, 224] and res["grew_mb"] < 100, res  # unbounded: ~7 GB


def test_train_head_never_replaces_a_folder_it_did_not_make(world, tmp_path):  # noqa: F811
    d = tmp_path / "photos"
    d.mkdir()
    (d / "holiday.jpg").write_bytes(b"precious")
    one_line_error(run_cli("train-head", str(world / "s.h5"), "--out", str(d), "--params", str(ROOT / "params.yaml")),
                   "exists and is not a model directory")
    assert [p.name for p in d.iterdir()] == ["holiday.jpg"] and (d / "holiday.jpg").read_bytes() == b"precious"


def test_evaluate_maps_a_store_with_fewer_classes_by_name(world, tmp_path, tiny_weights):  # noqa: F811
    test = make_images(tmp_path / "two", per_class=3, seed=9)
    for f in (test / "blue").iterdir():
        f.unlink()
    (test / "blue").rmdir()  # this store's classes are [green, red]: its label 0 is the model's 1
    run_cli("extract", str(test), "--out", str(tmp_path / "two.h5"), "--backbone", TINY, "--weights", tiny_weights,
            "--no-progress", check=True)
    run_cli("evaluate", str(world / "model"), str(tmp_path / "two.h5"), "--out", str(tmp_path / "e"), check=True)
    rows = list(csv.DictReader(open(tmp_path / "e" / "predictions.csv")))
    assert len(rows) == 6 and all(r["label"] == r["path"].split("/")[0] for r in rows)
    per_class = json.loads((tmp_path / "e" / "details.json").read_text())["per_class"]
    assert [per_class[c]["support"] for c in ("blue", "green", "red")] == [0, 3, 3]


def _full_device(path):
    """A character device that fails every write with ENOSPC: mknod'd /dev/full where we may, else a link to it."""
    try:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 7))
    except PermissionError:
        os.symlink("/dev/full", path)
    return path


@pytest.mark.parametrize("target", ["pipe", "full_device"])
def test_out_at_a_pipe_or_device_is_refused_at_once(world, tmp_path, tiny_weights, target):  # noqa: F811
    """`--out` a FIFO (or a link to /proc/self/fd/1 with stdout a pipe) used to hang predict; a full device gave
    `unexpected MemoryError`. Each is one line before any work, for every command, within the timeout."""
    if target == "pipe":  # through a link, as /proc/self/fd/1 is
        os.mkfifo(tmp_path / "fifo")
        out = tmp_path / "p.csv"
        os.symlink(tmp_path / "fifo", out)
    else:
        out = _full_device(tmp_path / "full")
    for o in (out,):
        for args in (["predict", str(world / "model"), str(world / "test"), "--no-progress"],
                     ["extract", str(world / "imgs"), "--backbone", TINY, "--weights", tiny_weights, "--no-progress"],
                     ["train-head", str(world / "s.h5"), "--params", str(ROOT / "params.yaml")],
                     ["export", str(world / "model"), "--format", "torchscript"]):
            r = subprocess.run([sys.executable, "-m", "pipeline.cli", *args, "--out", str(o)], capture_output=True,
                               text=True, timeout=120, cwd=ROOT)
            one_line_error(r, str(o), "pipe, device or socket")


def test_predict_on_a_folder_with_a_fifo_named_like_an_image_does_not_hang(world, tmp_path):  # noqa: F811
    """Issue #25: predict opened a FIFO named x.png and waited forever for a writer."""
    folder = make_images(tmp_path / "imgs", per_class=1)
    os.mkfifo(folder / "red" / "x.png")
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "predict", str(world / "model"), str(folder),
                        "--out", str(tmp_path / "p.csv"), "--no-progress"], capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    rows = {row["path"]: row for row in csv.DictReader(open(tmp_path / "p.csv"))}
    assert rows[str(folder / "red" / "x.png")]["error"].startswith("not a regular file")
    assert sum(1 for row in rows.values() if not row["error"]) == 3


def test_predict_prints_labels_without_out_and_writes_csv_to_stdout_with_dash(world, tmp_path):  # noqa: F811
    """Issue #32: the default --out silently replaced an earlier predictions.csv, one photo printed no label and
    '1 images ... (0.1 img/s)', and --out - was refused. Now: no --out prints a label per image and writes no
    file; --out - is the CSV on stdout (summary on stderr); one image is '1 image', without a rate."""
    m, one = str(world / "model"), str(sorted((world / "test" / "red").iterdir())[0])
    r = run_cli("predict", m, one, "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"{one}: red (confidence {r.stdout.split('confidence ')[1][:4]})", r.stdout
    assert "predict: 1 image, 0 failed" in r.stderr and "img/s" not in r.stderr and "1 images" not in r.stderr
    assert "too small to adapt (1 image < 5)" in r.stderr and not list(tmp_path.iterdir())
    r = run_cli("predict", m, str(world / "test"), "--out", "-", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(r.stdout.splitlines()))
    assert len(rows) == 9 and {row["source"] for row in rows} == {str(world / "test")} and not list(tmp_path.iterdir())
    assert "predict: 9 images" in r.stderr


def test_face_mode_csvs_are_published_together(tmp_path):
    """Issue #25: with the main CSV's write failing, the per-face CSV used to be replaced already."""
    import numpy as np
    from pipeline.inference.predictions import FaceRows, Predictions, faces_csv, write_prediction_csv

    def preds(label: str, error: object = "") -> Predictions:
        fr = FaceRows(image=np.array([0, 0]), face=np.array([0, 1]), boxes=np.zeros((2, 4), int),
                      probs=np.full((2, 2), 0.5), labels=[label, label])
        return Predictions(paths=["a.jpg"], labels=[label], probs=np.full((1, 2), 0.5), errors=[error],
                           class_names=["x", "y"], faces=fr)

    out = tmp_path / "p.csv"
    write_prediction_csv(out, preds("x"))
    before = (out.read_text(), faces_csv(out).read_text())

    class Unwritable:
        def __str__(self):
            raise OSError(27, "File too large")

    with pytest.raises(Exception):
        write_prediction_csv(out, preds("y", error=Unwritable()))
    assert (out.read_text(), faces_csv(out).read_text()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.csv", "p.faces.csv"]  # no temp or lock left


def test_a_12_bit_jpeg_and_a_url_in_a_manifest_are_named_as_such(tmp_path):
    """Issue #33: a 12-bit JPEG was 'not an image PIL can read (wrong extension or corrupt file)'; a manifest row
    holding a URL became 'https:/example.com/...: cannot read' (a slash eaten, nothing said about URLs)."""
    import io
    from features.input.images import decode
    b = io.BytesIO()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(b, "JPEG")
    data = bytearray(b.getvalue())
    data[data.index(b"\xff\xc0") + 4] = 12  # the frame header's sample precision
    (tmp_path / "deep.jpg").write_bytes(data)
    with pytest.raises(ValueError, match=r"a 12-bit JPEG \(imgsent decodes 8-bit JPEGs\); convert it"):
        decode(str(tmp_path / "deep.jpg"))
    make_images(tmp_path / "imgs", per_class=2)
    (tmp_path / "m.csv").write_text("path,label\nimgs/red/red_00.jpg,red\nhttps://example.com/a.png,red\n"
                                    "imgs/blue/blue_00.jpg,blue\n")
    why = dict(discover(tmp_path / "m.csv").problems)
    assert why["https://example.com/a.png"].startswith("a URL (line 3); imgsent reads local files only and never "
                                                        "downloads")


def test_files_named_are_one_source_and_the_readme_says_so(tmp_path):
    """Issue #42: predict adapts the image files named on the command line together, as one source, where the
    README said only 'each folder you pass'."""
    from pipeline.inference.predictions import FILES_NAMED, expand_paths
    root = make_images(tmp_path / "imgs", per_class=2)
    files = [str(root / "red" / "red_00.jpg"), str(root / "blue" / "blue_01.png")]
    paths, _, sources = expand_paths([*files, str(root / "green")])
    assert sources == [FILES_NAMED, FILES_NAMED, str(root / "green"), str(root / "green")], sources
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert "each folder you pass; the image files you name, together as one source" in readme


def test_an_image_reached_twice_is_refused_before_any_work(tmp_path, monkeypatch):
    """A folder passed twice, a folder inside another, a file named and found in a folder: each image would be
    predicted twice and weigh twice in its source's adaptation. One line naming the image and both arguments."""
    from pipeline.inference.predictions import FILES_NAMED, expand_paths
    root = make_images(tmp_path / "imgs", per_class=2)
    red, one = str(root / "red"), str(root / "red" / "red_00.jpg")
    assert len(expand_paths([red, str(root / "blue")])[0]) == 4  # distinct folders are fine
    (tmp_path / "m.csv").write_text("path,group\nimgs/red/red_00.jpg,a\nimgs/red/red_00.jpg,b\n")
    monkeypatch.chdir(tmp_path)  # a manifest's repeated row is an error row of its own, never read twice
    paths, errors, _ = expand_paths(["m.csv"])
    assert len(paths) == 2 and list(errors) == [1] and errors[1].startswith("duplicate row"), errors
    for args, first, second, more in (([red, red], red, red, ", and 1 other image too"),
                                      ([str(root), red], str(root), red, ", and 1 other image too"),
                                      ([red, str(root / "blue" / ".." / "red" / "red_00.jpg")], red, FILES_NAMED, ";"),
                                      ([one, red], FILES_NAMED, red, ";")):
        with pytest.raises(UserError) as e:
            expand_paths(args)
        msg = str(e.value)
        assert "\n" not in msg and f"given twice (from {first} and from {second}){more}" in msg, (args, msg)
