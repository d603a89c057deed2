"""Stage one's decode path (issue #22): libjpeg-turbo through simplejpeg gives PIL's pixels (JPEG chroma upsampled
by replication, as nvJPEG does), damaged JPEGs are refused, decode threads keep order and a bounded window, and 'auto' resolves as documented."""
import io
import threading

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from sklearn.datasets import load_sample_image

from features.input import images
from features.models.preprocess import Preprocess, prepare
from features.models.embed import AUTO_GPU_MIN_IMAGES, resolve_device
from features.errors import UserError
from features.input.images import decode, decode_tensor
from features.input.prefetch import available_cores, ordered_map, resolve_workers


def _pil_reference(path) -> np.ndarray:
    """What PIL decodes, upright RGB (H, W, 3), except that the chroma of a subsampled colour JPEG is upsampled by
    replication (libjpeg-turbo's fastupsample, the recipe since version 5; PIL's libjpeg interpolates it)."""
    import simplejpeg
    with Image.open(path) as im:
        if im.format == "JPEG" and im.mode == "RGB":
            fast = Image.fromarray(simplejpeg.decode_jpeg(open(path, "rb").read(), colorspace="RGB", fastupsample=True))
            fast.info["exif"] = im.info.get("exif", b"")
            return np.array(ImageOps.exif_transpose(fast))
        return np.array(ImageOps.exif_transpose(im).convert("RGB"))


def test_only_subsampled_chroma_differs_from_pils_decode(tmp_path):
    """The recipe's one departure from PIL: with 4:4:4 chroma (nothing to upsample) the pixels are PIL's own."""
    im = _photo()
    im.save(tmp_path / "444.jpg", quality=90, subsampling=0)
    im.save(tmp_path / "420.jpg", quality=90)
    for name in ("444", "420"):
        with Image.open(tmp_path / f"{name}.jpg") as ref:
            same = np.array_equal(decode(str(tmp_path / f"{name}.jpg")), np.array(ref.convert("RGB")))
        assert same == (name == "444")


def _photo() -> Image.Image:
    return Image.fromarray(load_sample_image("china.jpg"))  # (427, 640) real photo


@pytest.mark.parametrize("variant", ["baseline", "progressive", "grey", "444", "exif_rotated", "cmyk"])
def test_jpeg_decodes_to_pils_pixels(tmp_path, variant):
    im, kw = _photo(), {"quality": 90}
    if variant == "progressive":
        kw["progressive"] = True
    elif variant == "grey":
        im = im.convert("L")
    elif variant == "444":
        kw["subsampling"] = 0
    elif variant == "exif_rotated":
        exif = im.getexif()
        exif[0x0112] = 6  # rotate 90 degrees clockwise to display
        kw["exif"] = exif
    elif variant == "cmyk":
        im = im.convert("CMYK")
    path = tmp_path / f"{variant}.jpg"
    im.save(path, "JPEG", **kw)
    got = decode(str(path))
    want = _pil_reference(path)
    assert got.shape == want.shape and np.array_equal(got, want)
    if variant == "exif_rotated":
        assert got.shape[:2] == (640, 427)  # upright


def test_the_fast_decoder_is_used_for_jpeg(tmp_path, monkeypatch):
    """The speed claim rests on JPEGs going through libjpeg-turbo, not PIL."""
    _photo().save(tmp_path / "a.jpg", quality=90)
    calls = []
    real = images.strict_jpeg
    monkeypatch.setattr(images, "strict_jpeg", lambda data, **kw: calls.append(len(data)) or real(data, **kw))
    decode_tensor(str(tmp_path / "a.jpg"))
    assert calls == [(tmp_path / "a.jpg").stat().st_size]


def _damaged(tmp_path, how: str):
    raw = io.BytesIO()
    _photo().save(raw, "JPEG", quality=90)
    raw = raw.getvalue()
    n = len(raw)
    if how == "zero_tail":  # a half-finished download
        data = raw[: int(n * 0.6)] + bytes(n - int(n * 0.6))
    elif how == "garbled":  # 2 KB of garbage inside the entropy-coded data
        rng = np.random.default_rng(0)
        data = raw[: n // 2] + rng.integers(0, 256, 2048, dtype=np.uint8).tobytes() + raw[n // 2 + 2048:]
    elif how == "cut_with_end_marker":  # cut short, then an EOI marker appended: libjpeg only warns
        data = raw[: int(n * 0.6)] + b"\xff\xd9"
    else:  # cut short
        data = raw[: int(n * 0.6)]
    path = tmp_path / f"{how}.jpg"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("how", ["zero_tail", "garbled", "truncated", "cut_with_end_marker"])
def test_damaged_jpegs_are_refused_not_filled_in(tmp_path, how):
    with pytest.raises(ValueError, match="damaged JPEG"):
        decode(str(_damaged(tmp_path, how)))


def test_stray_bytes_between_markers_are_harmless(tmp_path):
    """Some cameras leave bytes between the entropy data and the end marker; libjpeg warns, no pixel is lost."""
    raw = io.BytesIO()
    _photo().save(raw, "JPEG", quality=90)
    path = tmp_path / "stray.jpg"
    path.write_bytes(raw.getvalue()[:-2] + b"\x00\x01\x02\xff\xd9")
    (tmp_path / "whole.jpg").write_bytes(raw.getvalue())
    assert np.array_equal(decode(str(path)), _pil_reference(tmp_path / "whole.jpg"))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_matches_pil(tmp_path, orientation):
    im = _photo().crop((0, 0, 300, 200))  # not square, so a missed transpose changes the shape
    exif = im.getexif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}.jpg"
    im.save(path, "JPEG", quality=90, exif=exif)
    assert np.array_equal(decode(str(path)), _pil_reference(path))


def test_float_tiff_in_unit_range_is_not_black(tmp_path):
    rgb = load_sample_image("flower.jpg")
    grey = np.asarray(Image.fromarray(rgb).convert("L"), np.float32) / 255.0  # (H, W) in [0, 1]
    Image.fromarray(grey, "F").save(tmp_path / "f.tif")
    got = decode(str(tmp_path / "f.tif"))[..., 0].astype(np.float64)
    want = grey.astype(np.float64) * 255
    assert np.abs(got - want).max() <= 1.0


def test_resize_is_uint8_and_close_to_the_float_resize():
    """Version 4's uint8 antialiased resize stays within 3 levels of version 3's float one (a rounding change,
    not a different filter): on this photo 85% of values are equal and 5 of 150,528 differ by 3."""
    pre = Preprocess(size=224, resize=256, interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3)
    rgb = np.array(load_sample_image("china.jpg"))
    x = prepare(rgb, pre)
    assert x.dtype == torch.uint8 and x.shape == (3, 224, 224)
    t = torch.from_numpy(rgb).permute(2, 0, 1)[None].float()
    f = torch.nn.functional.interpolate(t, size=[256, 383], mode="bicubic", antialias=True).round().clamp(0, 255)
    top, left = (256 - 224) // 2, (383 - 224) // 2
    ref = f[0, :, top:top + 224, left:left + 224]
    diff = (x.float() - ref).abs()
    assert diff.max() <= 3 and float((diff > 0).float().mean()) < 0.25


def test_ordered_map_keeps_order_and_runs_its_workers_at_once():
    """Results in input order whatever order they finish in; `workers` items run at once (the first four meet at a
    barrier only four simultaneous calls can pass), never more."""
    barrier = threading.Barrier(4, timeout=60)
    live, peak, lock = [0], [0], threading.Lock()

    def fn(i):
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        if i < 4:
            barrier.wait()  # with fewer than 4 workers running at once: BrokenBarrierError
        with lock:
            live[0] -= 1
        return i * i

    assert list(ordered_map(fn, range(200), workers=4, window=8)) == [i * i for i in range(200)]
    assert peak[0] <= 4


def test_ordered_map_pulls_at_most_the_window_ahead_of_its_consumer():
    """Decoding never runs away from a slow consumer: however the threads are scheduled, at most `window` items
    are taken from the input beyond those already handed out (issue #33: the old test slept, then counted)."""
    pulled = [0]

    def items():
        for i in range(10_000):
            pulled[0] += 1
            yield i

    gen = ordered_map(lambda i: i, items(), workers=2, window=16)
    for consumed, v in enumerate(gen, 1):
        assert v == consumed - 1 and pulled[0] - consumed <= 16
        if consumed == 300:
            break
    gen.close()


def test_ordered_map_raises_the_workers_error():
    def boom(i):
        if i == 5:
            raise RuntimeError("bad item")
        return i
    with pytest.raises(RuntimeError, match="bad item"):
        list(ordered_map(boom, range(20), workers=3, window=4))


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_batches_assembled_in_the_decode_threads_hold_each_image_in_order(tmp_path, layout):
    """Every row the forward sees is its own image's pixels (prepare's), in path order, whatever the batch size,
    the number of threads, the engine's layout and where the undecodable files fall (first, inside a chunk,
    last); failed images are reported by index and never reach the forward."""
    from features.models.backbones import Backbone
    from features.models.embed import _input_batches, iter_embeddings
    from features.models.engine import input_layout
    pre = Preprocess(size=8, resize=10, interpolation="bilinear", mean=(0.5,) * 3, std=(0.5,) * 3)
    bb = Backbone(name="pixels", embedder=None, pre=pre, dim=3 * 8 * 8, weights_sha256="")
    rng = np.random.default_rng(0)
    paths, bad = [], {0, 5, 6, 12, 16}
    for i in range(17):
        path = tmp_path / f"{i}.png"
        if i in bad:
            path.write_bytes(b"not an image")
        else:
            Image.fromarray(rng.integers(0, 256, (9 + i, 14, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    expected = {i: prepare(decode_tensor(p), pre).flatten().float() for i, p in enumerate(paths) if i not in bad}

    class Flatten:  # "features" = the input pixels, so each row shows which image filled it
        def __init__(self):
            self.layout = layout  # what the engine reads (onnxruntime: NCHW, torch: channels_last)

        def __call__(self, x):
            return x.contiguous().reshape(len(x), -1).float()  # (b, C*S*S) in NCHW order

    # the decode threads write the batches in the engine's layout, so the forward converts nothing
    assert all(x.is_contiguous(memory_format=layout) for x, _ in _input_batches(bb, paths, 4, 2, pinned=False,
                                                                                  layout=input_layout(Flatten())))

    for batch_size in (1, 4, 7, 32):
        for workers in (0, 1, 3):
            got, errors = {}, {}
            for idx, feats, errs in iter_embeddings(bb, paths, batch_size=batch_size, workers=workers,
                                                    progress=False, model=Flatten()):
                got.update({i: torch.from_numpy(f) for i, f in zip(idx, feats)})
                errors.update(errs)
            assert set(errors) == bad and all("not an image" in e for e in errors.values())
            assert list(got) == sorted(expected)
            assert all(torch.equal(got[i], expected[i]) for i in expected), (batch_size, workers)


def test_workers_auto_means_the_cores_and_bad_values_are_one_line():
    assert resolve_workers("auto") == available_cores() and resolve_workers(None) == available_cores()
    assert resolve_workers("3") == 3 and resolve_workers(0) == 0
    for bad in (-1, "many"):
        with pytest.raises(UserError, match="--workers"):
            resolve_workers(bad)


def test_auto_device_uses_a_gpu_only_for_jobs_that_pay_its_start(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto", images=AUTO_GPU_MIN_IMAGES - 1) == "cpu"
    assert resolve_device("auto", images=AUTO_GPU_MIN_IMAGES) == "cuda"
    assert resolve_device("cpu", images=10 ** 6) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto", images=10 ** 6) == "cpu"
    with pytest.raises(UserError, match="no CUDA GPU"):
        resolve_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_and_cpu_stores_hold_the_same_features(tmp_path, tiny_weights):
    from features.extract import extract
    from features.storage.store import read_store
    from tests.conftest import TINY, make_images
    imgs = make_images(tmp_path / "imgs", per_class=4)
    for dev in ("cpu", "cuda"):
        extract(images=str(imgs), out=str(tmp_path / f"{dev}.h5"), backbone=TINY, weights=tiny_weights,
                progress=False, device=dev)
    a, b = (read_store(tmp_path / f"{d}.h5") for d in ("cpu", "cuda"))
    assert a.fingerprint == b.fingerprint and a.sha256 == b.sha256
    cos = torch.nn.functional.cosine_similarity(torch.from_numpy(a.features), torch.from_numpy(b.features))
    assert float(cos.min()) >= 0.9999


def test_extract_says_its_stages_to_a_person_at_a_terminal(tmp_path, tiny_weights, capsys, monkeypatch):
    """Issue #24: the seconds before the progress bar (imports, the backbone, hashing) are not silent at a
    terminal; logs and pipes get only the summary."""
    import sys
    from features.extract import extract
    from tests.conftest import TINY, make_images
    imgs = make_images(tmp_path / "imgs", per_class=2)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    extract(images=str(imgs), out=str(tmp_path / "s.h5"), backbone=TINY, weights=tiny_weights, progress=True,
            workers=1)
    err = capsys.readouterr().err
    assert "6 images found; on cpu, 1 decode threads" in err and f"loading {TINY}" in err
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    extract(images=str(imgs), out=str(tmp_path / "t.h5"), backbone=TINY, weights=tiny_weights, progress=True,
            workers=1)
    assert "images found" not in capsys.readouterr().err
