"""Every kind of bad file: embedded correctly or skipped with its reason; the run always completes."""
import io
import os
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from features.extract import extract
from features.input.images import decode
from features.storage.store import read_store
from tests.conftest import ROOT, TINY, make_images, run_cli


def _jpeg_bytes(img: Image.Image, **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, "JPEG", **kw)
    return b.getvalue()


def build_bad_folder(root):
    make_images(root, per_class=2)
    d = root / "red"
    (d / "zero.jpg").write_bytes(b"")
    good = _jpeg_bytes(Image.new("RGB", (64, 64), (200, 10, 10)))
    (d / "truncated.jpg").write_bytes(good[: len(good) // 2])
    Image.new("RGB", (20, 20), (250, 0, 0)).save(d / "png_named.jpg", "PNG")
    (d / "text.png").write_text("this is not an image")
    # A PNG header claiming 20000x20000 (400 MP > PIL's limit): refused before any pixel is decoded.
    import zlib
    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    chunk = lambda t, data: struct.pack(">I", len(data)) + t + data + struct.pack(">I", zlib.crc32(t + data))
    (d / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    Image.new("CMYK", (30, 30), (0, 255, 255, 0)).save(d / "cmyk.jpg", "JPEG")
    Image.fromarray((np.arange(32 * 32).reshape(32, 32) * 60).astype(np.uint16)).save(d / "gray16.png")
    pal = Image.new("P", (16, 16), 0)
    pal.putpalette([255, 0, 0] + [0, 0, 0] * 255)
    pal.info["transparency"] = 0
    pal.save(d / "palette_transparent.png", transparency=0)
    Image.new("LA", (16, 16), (100, 0)).save(d / "la.png")
    Image.new("RGBA", (16, 16), (255, 0, 0, 128)).save(d / "rgba.png")
    Image.new("RGB", (1, 1), (255, 0, 0)).save(d / "one_pixel.png")
    frames = [Image.new("RGB", (20, 20), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(d / "animated.gif", save_all=True, append_images=frames[1:])
    # EXIF orientation 6 (rotate 90 CW to view): stored 40 wide x 20 high, upright is 20 wide x 40 high.
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 20), (255, 0, 0)).save(d / "exif_rotated.jpg", exif=exif.tobytes())
    noperm = d / "noperm.png"
    Image.new("RGB", (8, 8)).save(noperm)
    os.chmod(noperm, 0)
    os.symlink("loop.png", d / "loop.png")  # a symlink to itself: ELOOP
    Image.new("RGB", (8, 8), (255, 0, 0)).save(d / "ünïcödé 😀.png")
    non_utf8 = os.fsencode(str(d)) + b"/bad-\xff\xfe.png"
    with open(non_utf8, "wb") as f:
        Image.new("RGB", (8, 8), (255, 0, 0)).save(f, "PNG")
    return root


EXPECT_SKIPPED = {"zero.jpg": "empty file", "truncated.jpg": "cannot decode|damaged JPEG",  # header cut / data cut "text.png": "not an image",
                  "bomb.png": "decompression bomb", "loop.png": "cannot read"}
EXPECT_EMBEDDED = ["png_named.jpg", "cmyk.jpg", "gray16.png", "palette_transparent.png", "la.png", "rgba.png",
                   "one_pixel.png", "animated.gif", "exif_rotated.jpg", "ünïcödé 😀.png"]


def test_every_bad_input_is_embedded_or_recorded(tmp_path, tiny_weights):
    root = build_bad_folder(tmp_path / "bad")
    extract(images=str(root), out=str(tmp_path / "s.h5"), backbone=TINY, weights=tiny_weights, progress=False,
            workers=1)
    st = read_store(tmp_path / "s.h5")
    skipped = {p.rsplit("/", 1)[-1]: why for p, why in st.skipped}
    for name, why in EXPECT_SKIPPED.items():
        assert any(w in skipped.get(name, "") for w in why.split("|")), (name, skipped.get(name))
    if os.geteuid() != 0:  # root reads any file whatever its mode
        assert "noperm.png" in skipped
    embedded = {p.rsplit("/", 1)[-1] for p in st.paths}
    for name in EXPECT_EMBEDDED:
        assert name in embedded, name
    assert any(p.startswith("red/bad-") for p in st.paths)  # non-UTF-8 name kept, escaped
    files = sum(len([f for f in fs if not f.startswith(".")]) for _, _, fs in os.walk(root))
    assert len(st) + len(st.skipped) == files  # every file is either embedded or recorded with its reason
    assert np.isfinite(st.features).all()


def test_decoding_is_correct_for_odd_modes(tmp_path):
    root = build_bad_folder(tmp_path / "bad") / "red"
    assert decode(str(root / "exif_rotated.jpg")).shape == (40, 20, 3)  # upright
    la = decode(str(root / "la.png"))
    assert la.shape == (16, 16, 3) and (la == 255).all()  # fully transparent -> white
    rgba = decode(str(root / "rgba.png"))[0, 0]
    assert rgba[0] == 255 and 120 < rgba[1] < 135  # half red over white
    g16 = decode(str(root / "gray16.png"))
    assert g16.max() > 100 and g16.max() < 255  # rescaled, not clipped to white
    assert tuple(decode(str(root / "animated.gif"))[0, 0]) == (255, 0, 0)  # first frame
    c = decode(str(root / "cmyk.jpg"))[0, 0]
    assert c[0] > 200 and c[1] < 60  # cyan-free, magenta+yellow = red
    with pytest.raises(ValueError, match="decompression bomb"):
        decode(str(root / "bomb.png"))


def test_strict_turns_skips_into_exit_1(tmp_path, tiny_weights):
    root = make_images(tmp_path / "imgs", per_class=2)
    (root / "red" / "zero.png").write_bytes(b"")
    args = [str(root), "--out", str(tmp_path / "s.h5"), "--backbone", TINY, "--weights", tiny_weights, "--no-progress"]
    r = run_cli("extract", *args)
    assert r.returncode == 0 and re.search(r"\b1 skipped", r.stdout) and "zero.png: empty file" in r.stderr
    r = run_cli("extract", *args, "--strict")
    assert r.returncode == 1


def test_manifest_problems(tmp_path, tiny_weights):
    root = make_images(tmp_path / "imgs", per_class=2)
    outside = tmp_path / "outside.png"
    Image.new("RGB", (8, 8)).save(outside)
    csv = root / "m.csv"
    csv.write_text("path,label\n"
                   "red/red_00.jpg,red\n"
                   "red/red_01.png,red\n"
                   "red/red_01.png,red\n"  # duplicate row
                   "blue/blue_00.jpg,blue\n"
                   "blue/blue_00.jpg,green\n"  # conflicting duplicate
                   "missing.png,red\n"
                   "../outside.png,red\n"
                   "green/green_00.jpg,purple\n")  # unknown label with --classes
    s = extract(images=str(csv), out=str(tmp_path / "s.h5"), backbone=TINY, weights=tiny_weights, progress=False,
                workers=0, classes=["blue", "green", "red"])
    reasons = " | ".join(f"{p}: {w}" for p, w in s.skipped)
    assert "duplicate row" in reasons and "conflicting duplicate row" in reasons
    assert "missing.png: cannot read" in reasons
    assert "climbs out of the manifest folder" in reasons and "--allow-outside" in reasons
    assert "unknown label 'purple'" in reasons
    assert s.rows == 3
    s2 = extract(images=str(csv), out=str(tmp_path / "s2.h5"), backbone=TINY, weights=tiny_weights, progress=False,
                 workers=0, classes=["blue", "green", "red"], allow_outside=True)
    assert s2.rows == 4


def test_an_unknown_manifest_column_is_refused_naming_it_and_the_close_one(tmp_path):
    """Issue #42: 'path,lable' was accepted as an unlabelled manifest; train-head then said 'no labelled images'."""
    root = make_images(tmp_path / "imgs", per_class=1)
    (root / "m.csv").write_text("path,lable\nred/red_00.jpg,red\n")
    r = run_cli("extract", str(root / "m.csv"), "--out", str(tmp_path / "s.h5"), "--backbone", TINY)
    assert r.returncode == 2 and r.stderr.strip() == (
        f"error: {root / 'm.csv'}: unknown column 'lable' in the header (did you mean 'label'?); the columns are "
        "path, label, group"), r.stderr
    assert not (tmp_path / "s.h5").exists()
    (root / "m.csv").write_text("path,label,group\nred/red_00.jpg,red,a\n")  # the known ones are accepted
    from features.input.sources import discover
    assert [it.label for it in discover(str(root / "m.csv")).items] == ["red"]


def test_a_folder_without_class_sub_folders_says_it_is_stored_unlabelled(tmp_path, tiny_weights):
    """Issue #42: `extract data/happy` (one class's folder) stored its images unlabelled without a word."""
    root = make_images(tmp_path / "imgs", per_class=2)
    args = ["--backbone", TINY, "--weights", tiny_weights, "--no-progress"]
    r = run_cli("extract", str(root / "red"), "--out", str(tmp_path / "flat.h5"), *args)
    assert r.returncode == 0 and "stored unlabelled: no class sub-folders or label column" in r.stdout, r.stdout
    r = run_cli("extract", str(root), "--out", str(tmp_path / "classes.h5"), *args[:-1])  # a bar asked for...
    assert r.returncode == 0 and "unlabelled" not in r.stdout and "6 images" in r.stdout, r.stdout
    assert "%|" not in r.stderr, r.stderr  # ...but stderr is no terminal: no bar in a log (issue #42)


def test_the_python_api_refuses_a_string_where_a_list_is_meant(tmp_path):
    """imgsent.train_head(stores='a.h5') said 'a: no such store' (it read the stores 'a', '.', 'h', '5');
    imgsent.extract(classes='happy,sad') said "'a' is listed twice"."""
    import imgsent
    from features.errors import UserError
    with pytest.raises(UserError, match=r"^stores='a.h5': expected a list of store paths; pass \['a.h5'\]$"):
        imgsent.train_head(stores="a.h5", out=str(tmp_path / "m"), params=imgsent.load_params(str(ROOT / "params.yaml")))
    with pytest.raises(UserError, match=r"^stores='a.h5': expected a list"):  # a Path too (evaluate, suggest: the same)
        imgsent.train_head(stores=Path("a.h5"), out=str(tmp_path / "m"),
                           params=imgsent.load_params(str(ROOT / "params.yaml")))
    with pytest.raises(UserError, match=r"^classes='happy, sad': expected a list of class names; pass \['happy', 'sad'\]$"):
        imgsent.extract(images=str(make_images(tmp_path / "imgs", per_class=1)), out=str(tmp_path / "s.h5"),
                        classes="happy, sad", progress=False)


def test_identical_images_under_two_labels_are_a_conflict(tmp_path, tiny_weights):
    root = make_images(tmp_path / "imgs", per_class=2)
    (root / "blue" / "dup.jpg").write_bytes((root / "red" / "red_00.jpg").read_bytes())
    s = extract(images=str(root), out=str(tmp_path / "s.h5"), backbone=TINY, weights=tiny_weights, progress=False,
                workers=0)
    assert len(s.conflicts) == 1 and "identical to" in s.conflicts[0][1] and "'red'" in s.conflicts[0][1]
    assert read_store(tmp_path / "s.h5").conflicts == s.conflicts


def test_jfif_is_a_jpeg_and_an_empty_class_folder_is_no_class(tmp_path, tiny_weights):
    """Issue #25: .jfif / .jpe are JPEGs (Chrome, Windows); a class folder created but not yet filled is
    dropped with a line instead of being averaged into macro-F1 as a class scored 0."""
    root = make_images(tmp_path / "imgs", per_class=2)
    Image.new("RGB", (32, 32), (200, 30, 30)).save(root / "red" / "saved_by_chrome.jfif", "JPEG")
    Image.new("RGB", (32, 32), (200, 30, 30)).save(root / "red" / "old.jpe", "JPEG")
    (root / "surprised").mkdir()
    extract(images=str(root), out=str(tmp_path / "s.h5"), backbone=TINY, weights=tiny_weights, progress=False)
    st = read_store(tmp_path / "s.h5")
    assert {"red/saved_by_chrome.jfif", "red/old.jpe"} <= set(st.paths)
    assert st.class_names == ["blue", "green", "red"]
    assert ("surprised/", "empty class folder: no images, so no class; fill it or remove it") in st.skipped


def test_every_image_skipped_is_an_error_not_an_empty_store(tmp_path, tiny_weights):
    root = tmp_path / "imgs"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(2):
            (root / c / f"{i}.png").write_text("not an image")
    r = run_cli("extract", str(root), "--out", str(tmp_path / "s.h5"), "--backbone", TINY, "--weights", tiny_weights,
                "--no-progress")
    assert r.returncode == 2 and not (tmp_path / "s.h5").exists()
    assert "none of 4 images could be embedded (4 x not an image PIL can read" in r.stderr
    assert len(r.stderr.strip().splitlines()) <= 6  # the skip lines, the summary, the error: no traceback


def test_every_file_skipped_before_embedding_is_an_error_too(tmp_path, tiny_weights):
    """Issue #33: six empty .jpg files (skipped while planning, never embedded) gave exit 0 and a 0-row store."""
    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "imgs" / c / f"{i}.jpg").write_bytes(b"")
    r = run_cli("extract", str(tmp_path / "imgs"), "--out", str(tmp_path / "s.h5"), "--backbone", TINY, "--weights",
                tiny_weights, "--no-progress")
    assert r.returncode == 2 and not (tmp_path / "s.h5").exists()
    assert r.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'imgs'}: none of 6 images could be embedded " \
                                                "(6 x empty file)"


def test_a_batch_size_is_sized_by_the_work_and_an_absurd_one_refused(tmp_path, tiny_weights):
    """Issue #33: `--batch-size 65536 --engine torch` on 18 images built the trace example at 65536 (9.9 GB: 'can't
    allocate memory' under a limit, 19.5 GB peak without). Now the batch is at most the images given, and a batch
    whose forward pass cannot fit in memory is refused before any work."""
    import resource
    import subprocess
    import sys
    from features.errors import UserError
    from features.models.backbones import load_backbone
    from features.models.embed import work_batch
    make_images(tmp_path / "imgs", per_class=6)

    def limit():  # 6 GiB of address space: the 65536-image example alone would need 9.9 GB
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))
    cmd = [sys.executable, "-c", "from pipeline.cli import main; main()", "extract", str(tmp_path / "imgs"), "--out",
           str(tmp_path / "s.h5"), "--backbone", TINY, "--weights", tiny_weights, "--batch-size", "65536",
           "--engine", "torch", "--no-progress"]
    r = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=limit, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0 and "18 images" in r.stdout, r.stderr
    bb = load_backbone(TINY, weights=tiny_weights)
    assert work_batch(bb, 65536, 18) == 18 and work_batch(bb, 32, 1000) == 32
    with pytest.raises(UserError, match=r"--batch-size 65536: one forward pass of 65536 images .* lower --batch-size"):
        work_batch(bb, 65536, 10 ** 9)


def test_odd_files_names_and_outputs_are_one_line_each(tmp_path, tiny_weights):
    """Issue #25: a FIFO named like an image is skipped (it used to hang predict), a Windows-style manifest path
    says why it is not found, a stray space around a manifest name is forgiven, `--out .` and a file where the
    resumable chunks go are refused in one line, and a one-image class is told to add images (the old advice,
    'cv.folds at most 1', was itself refused)."""
    from features.errors import UserError
    from pipeline.data.folds import assign_folds
    root = make_images(tmp_path / "imgs", per_class=2)
    os.mkfifo(root / "red" / "pipe.png")
    with pytest.raises(ValueError, match="not a regular file"):
        decode(str(root / "red" / "pipe.png"))
    (root / "m.csv").write_text("path,label\nred\\red_00.jpg,red\n blue/blue_00.jpg ,blue\ngreen/green_00.jpg,green\n")
    extract(images=str(root / "m.csv"), out=str(tmp_path / "m.h5"), backbone=TINY, weights=tiny_weights,
            progress=False)
    st = read_store(tmp_path / "m.h5")
    assert sorted(st.paths) == ["blue/blue_00.jpg", "green/green_00.jpg"]
    assert any("Windows separators" in why for p, why in st.skipped if p == "red\\red_00.jpg")
    r = run_cli("train-head", str(tmp_path / "m.h5"), "--out", ".", "--params", str(ROOT / "params.yaml"),
                cwd=tmp_path)
    assert r.returncode == 2 and "--out .: names a folder that holds other things" in r.stderr
    (tmp_path / "p.h5.partial").write_text("mine")
    r = run_cli("extract", str(root), "--out", str(tmp_path / "p.h5"), "--backbone", TINY, "--weights", tiny_weights,
                "--no-progress")
    assert r.returncode == 2 and "a file is where extract keeps its resumable chunks" in r.stderr
    with pytest.raises(UserError, match="class 'b' has only 1 labelled image; cross-validation needs at least 2"):
        assign_folds(labels=np.array([0, 0, 0, 1]), groups=None, sha256=list("wxyz"), k=2, class_names=["a", "b"],
                     random_state=0)


def test_outputs_through_a_symlink_and_inside_the_image_folder(tmp_path, tiny_weights):
    """Issue #25: an --out that is a symlink (to a bigger disk) is written at its target and stays a link; a
    model or report written next to the class folders is not a new class on the next extract."""
    root = make_images(tmp_path / "imgs", per_class=3)
    big = tmp_path / "bigdisk"
    big.mkdir()
    (tmp_path / "s.h5").symlink_to(big / "s.h5")
    extract(images=str(root), out=str(tmp_path / "s.h5"), backbone=TINY, weights=tiny_weights, progress=False)
    assert (tmp_path / "s.h5").is_symlink() and (big / "s.h5").is_file()
    run_cli("train-head", str(tmp_path / "s.h5"), "--out", str(root / "model"), "--params", str(ROOT / "params.yaml"),
            check=True)
    run_cli("report", str(root / "model"), "--out", str(root / "report"), check=True)
    extract(images=str(root), out=str(tmp_path / "t.h5"), backbone=TINY, weights=tiny_weights, progress=False)
    st = read_store(tmp_path / "t.h5")
    assert st.class_names == ["blue", "green", "red"]
    assert {p for p, why in st.skipped if "imgsent output folder" in why} == {"model/", "report/"}


def test_a_killed_runs_temp_file_is_removed_by_the_next_run(tmp_path, tiny_weights):
    """Issue #25: SIGKILL while the store is written leaves `.s.h5.tmp-PID`; the next run cleans it (a live
    process's temp file is left alone)."""
    import subprocess
    import sys
    root = make_images(tmp_path / "imgs", per_class=2)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".s.h5.tmp-{int(dead.stdout)}"
    stale.write_bytes(b"half a store")
    live = tmp_path / f".s.h5.tmp-{os.getppid()}"
    live.write_bytes(b"someone else's")
    extract(images=str(root), out=str(tmp_path / "s.h5"), backbone=TINY, weights=tiny_weights, progress=False)
    assert not stale.exists() and live.exists()


def test_non_utf8_names_rerun_train_and_conflict_cleanly(tmp_path, tiny_weights):
    """Issue #25: file and class-folder names from an old zip (Latin-1 bytes): a re-run with nothing changed
    removes and re-hashes nothing, train-head and predict work, and a label conflict naming them is one line."""
    root = os.fsencode(str(tmp_path / "imgs"))
    rng = np.random.default_rng(0)
    for cls, rgb in ((b"caf\xe9", (30, 30, 200)), (b"plain", (200, 30, 30))):
        os.makedirs(root + b"/" + cls)
        for i in range(6):
            a = rng.integers(0, 256, (40, 40, 3)) * 0.3 + np.array(rgb) * 0.7
            name = root + b"/" + cls + f"/x{i}\xe9.png".encode("latin-1")
            Image.fromarray(a.astype(np.uint8)).save(name)
            os.utime(name, (1e9, 1e9))  # long before the first pass: a re-run may trust their stats
    imgs, out = str(tmp_path / "imgs"), str(tmp_path / "s.h5")
    kw = dict(backbone=TINY, weights=tiny_weights, progress=False)
    first = extract(images=imgs, out=out, **kw)
    again = extract(images=imgs, out=out, **kw)
    assert first.rows == again.rows == 12 and again.removed == 0 and again.hashed == 0 and again.unchanged
    assert read_store(out).class_names == ["caf\\xe9", "plain"]
    run_cli("train-head", out, "--out", str(tmp_path / "m"), "--params", str(ROOT / "params.yaml"), check=True)
    run_cli("predict", str(tmp_path / "m"), imgs, "--out", str(tmp_path / "p.csv"), "--no-progress", check=True)
    with open(root + b"/plain/x0\xe9.png", "rb") as f:  # the same bytes under the other class: a conflict
        data = f.read()
    with open(root + b"/caf\xe9/dup\xe9.png", "wb") as f:
        f.write(data)
    r = run_cli("extract", imgs, "--out", out, "--backbone", TINY, "--weights", tiny_weights, "--no-progress")
    assert r.returncode == 0 and "1 label conflicts" in r.stdout and "unexpected" not in r.stderr
    assert not os.path.exists(out + ".partial")


def test_counts_in_summaries_agree_with_their_nouns():
    """Issue #42: '1 images'."""
    from features.plan import Summary
    assert Summary(out="s.h5", rows=1).line().startswith("s.h5: 1 image (")
    assert Summary(out="s.h5", rows=2).line().startswith("s.h5: 2 images (")


def test_classes_are_stripped_and_an_empty_or_repeated_one_refused(tmp_path, tiny_weights):
    """--classes 'blue, red' kept ' red' as a class no folder matched; 'blue,blue' wrote a store whose reader then
    called it damaged; '' meant no filter. Names are stripped; an empty or repeated one is one line, no store."""
    images = make_images(tmp_path / "imgs", per_class=2)
    out = tmp_path / "s.h5"
    r = run_cli("extract", str(images), "--out", str(out), "--backbone", TINY, "--weights", tiny_weights,
                "--no-progress", "--classes", "blue, red", check=True)
    assert read_store(out).class_names == ["blue", "red"] and "4 images" in r.stdout, r.stdout
    for given, why in (("blue,blue", "'blue' is listed twice"), ("", "an empty class name"),
                       ("blue,,red", "an empty class name")):
        r = run_cli("extract", str(images), "--out", str(tmp_path / "t.h5"), "--backbone", TINY, "--weights",
                    tiny_weights, "--no-progress", "--classes", given)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and f"--classes {given!r}: {why}" in r.stderr, r.stderr
        assert not (tmp_path / "t.h5").exists()
