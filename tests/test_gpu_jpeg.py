"""JPEGs decoded on the GPU give the CPU recipe's network inputs byte for byte (issue #22): the exact uint8 resize,
the GPU batch assembly (run here with a CPU stand-in for nvJPEG that decodes as nvJPEG was measured to), the
per-run check that catches a decoder with other pixels, and, where a GPU is visible, nvJPEG itself."""
import numpy as np
import pytest
import simplejpeg
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_sample_image

from features.models import gpu_jpeg
from features.input.images import JpegBytes, decode_tensor
from features.models.backbones import Backbone
from features.models.embed import _gpu_jpeg_batches, _input_batches
from features.models.preprocess import Preprocess, luma, resize_crop
from features.models.resize_exact import resize_crop_exact, resize_exact

CUDA = torch.cuda.is_available()


def _pre(grayscale=False, interpolation="bicubic"):
    return Preprocess(size=24, resize=28, interpolation=interpolation, mean=(0.5,) * 3, std=(0.5,) * 3,
                      grayscale=grayscale)


@pytest.mark.parametrize("bicubic", [False, True])
def test_exact_resize_is_the_cpus_uint8_resize(bicubic):
    """Random sizes (down- and upscaling, 1 and 3 channels, slivers): F.interpolate's uint8 antialiased result to
    the last bit, and resize_crop's centre crop with it."""
    rng = np.random.default_rng(int(bicubic))
    for trial in range(60):
        h, w = int(rng.integers(1, 700)), int(rng.integers(1, 700))
        nh, nw = int(rng.integers(1, 300)), int(rng.integers(1, 300))
        x = torch.from_numpy(rng.integers(0, 256, (2, 1 + 2 * (trial % 2), h, w), dtype=np.uint8))
        want = F.interpolate(x.contiguous(memory_format=torch.channels_last), size=[nh, nw], antialias=True,
                             mode="bicubic" if bicubic else "bilinear", align_corners=False)
        assert torch.equal(resize_exact(x, nh, nw, bicubic), want.contiguous()), (h, w, nh, nw)
        want = resize_crop(x[:, :1], 256, 224, bicubic, False) if nh > 200 else resize_crop(x[:, :1], 40, 32, bicubic, False)
        size = (224, 256) if nh > 200 else (32, 40)
        assert torch.equal(resize_crop_exact(x[:, :1], size[1], size[0], bicubic), want.contiguous())


def _nvjpeg_stand_in(calls=None, refuse=()):
    """Decodes as nvJPEG does (libjpeg-turbo with fast chroma upsampling, equal on the GPU box); refuses a batch
    holding a JPEG of a size in `refuse` (nvJPEG fails a batch whole)."""
    def decode(datas, device):
        arrays = [simplejpeg.decode_jpeg(bytes(d.numpy()), colorspace="RGB", fastupsample=True) for d in datas]
        if calls is not None:
            calls.append(len(datas))
        if any(a.shape[0] in refuse for a in arrays):
            raise RuntimeError("Failed to decode jpeg stream")
        return [torch.from_numpy(a).permute(2, 0, 1).to(device) for a in arrays]
    return decode


def _folder(tmp_path) -> list[str]:
    """Every kind of file the GPU path must route: JPEG flavours it decodes, ones it leaves to the CPU, other
    formats, and files that fail."""
    photo = Image.fromarray(load_sample_image("china.jpg")).crop((0, 0, 300, 200))
    files = {"420.jpg": {}, "422.jpg": {"subsampling": 1}, "444.jpg": {"subsampling": 0},
             "progressive.jpg": {"progressive": True}, "q50.jpg": {"quality": 50}}
    for name, kw in files.items():
        photo.save(tmp_path / name, **{"quality": 90, **kw})
    for o in range(1, 9):
        exif = photo.getexif()
        exif[0x0112] = o
        photo.crop((0, 0, 301, 173)).save(tmp_path / f"orient{o}.jpg", quality=90, exif=exif)
    photo.convert("L").save(tmp_path / "grey.jpg", quality=90)
    photo.convert("CMYK").save(tmp_path / "cmyk.jpg", quality=90)
    photo.save(tmp_path / "photo.png")
    raw = (tmp_path / "420.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(raw[: len(raw) // 2] + b"\xff\xd9")  # nvJPEG decodes this without a word
    (tmp_path / "text.jpg").write_bytes(b"not a picture")
    photo.resize((640, 480)).save(tmp_path / "big.jpg", quality=90)
    return sorted(str(p) for p in tmp_path.iterdir())


def _same_batches(got, want) -> None:
    assert [r for _, r in got] == [r for _, r in want]
    for (x, r), (y, _) in zip(got, want):
        ok = [k for k, why in enumerate(r) if not why]
        assert torch.equal(x[ok].cpu(), y[ok])


@pytest.mark.parametrize("batch_size,grayscale,limits", [(1, False, False), (4, False, True), (32, True, False)])
def test_gpu_batches_hold_the_cpu_recipes_inputs(tmp_path, monkeypatch, batch_size, grayscale, limits):
    paths = _folder(tmp_path)
    calls = []
    monkeypatch.setattr(gpu_jpeg, "nvjpeg", _nvjpeg_stand_in(calls))
    if limits:  # decode calls and resize groups split by the memory bounds
        monkeypatch.setattr(gpu_jpeg, "MAX_BATCH_PIXELS", 100_000)
        monkeypatch.setattr(gpu_jpeg, "RESIZE_PIXELS", 30_000)
    bb = Backbone(name="pixels", embedder=None, pre=_pre(grayscale), dim=0, weights_sha256="")
    want = list(_input_batches(bb, paths, batch_size, 2, pinned=False, layout=torch.channels_last))
    _same_batches(list(_gpu_jpeg_batches(bb, paths, batch_size, 2, device="cpu", layout=torch.channels_last)), want)
    reasons = sum((r for _, r in want), [])
    assert sum(bool(r) for r in reasons) == 2 and any("damaged JPEG" in r for r in reasons)
    eligible = sum(isinstance(decode_tensor(p, defer_jpeg=True), JpegBytes) for p in paths if "cut" not in p
                   and "text" not in p)
    assert eligible == 14 and sum(calls) == eligible  # progressive, CMYK and PNG stay on the CPU
    if limits:
        assert max(calls) < min(batch_size, eligible)


def test_a_batch_the_gpu_refuses_is_decoded_one_by_one_then_on_the_cpu(tmp_path, monkeypatch):
    paths = _folder(tmp_path)
    calls = []
    monkeypatch.setattr(gpu_jpeg, "nvjpeg", _nvjpeg_stand_in(calls, refuse=(480, 173)))  # big.jpg, orient*.jpg
    bb = Backbone(name="pixels", embedder=None, pre=_pre(), dim=0, weights_sha256="")
    want = list(_input_batches(bb, paths, 8, 2, pinned=False, layout=torch.channels_last))
    _same_batches(list(_gpu_jpeg_batches(bb, paths, 8, 2, device="cpu", layout=torch.channels_last)), want)
    assert 1 in calls  # the refused batch was retried image by image


@pytest.mark.parametrize("fault", ["other pixels", "no decoder", "fails mid-run"])
def test_a_gpu_that_cannot_give_the_cpus_bytes_leaves_the_run_to_the_cpu(tmp_path, monkeypatch, capsys, fault):
    """A decoder with other pixels (libjpeg-turbo interpolating chroma, as PIL does), a torchvision without
    nvJPEG, or a GPU failure after the first batches (out of memory): one line, and every batch from there on
    holds the CPU recipe's inputs."""
    paths = _folder(tmp_path)
    bb = Backbone(name="pixels", embedder=None, pre=_pre(), dim=0, weights_sha256="")
    calls = []
    if fault == "other pixels":
        monkeypatch.setattr(gpu_jpeg, "nvjpeg", lambda datas, device: [torch.from_numpy(simplejpeg.decode_jpeg(
            bytes(d.numpy()), colorspace="RGB", fastupsample=False)).permute(2, 0, 1) for d in datas])
    elif fault == "no decoder":
        def missing(datas, device):
            raise ImportError("cannot import name 'decode_jpeg' from 'torchvision.io'")
        monkeypatch.setattr(gpu_jpeg, "nvjpeg", missing)
    else:
        stand_in = _nvjpeg_stand_in(calls)

        def flaky(datas, device):
            if len(calls) >= 2:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory")
            return stand_in(datas, device)
        monkeypatch.setattr(gpu_jpeg, "nvjpeg", flaky)
    want = list(_input_batches(bb, paths, 4, 2, pinned=False, layout=torch.channels_last))
    _same_batches(list(_gpu_jpeg_batches(bb, paths, 4, 2, device="cpu", layout=torch.channels_last)), want)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "decoding on the CPU instead" in err, err
    assert {"other pixels": "other pixels than the CPU's", "no decoder": "(ImportError",
            "fails mid-run": "(OutOfMemoryError"}[fault] in err
    if fault == "fails mid-run":
        assert len(calls) == 2  # two batches decoded on the "GPU" before the failure


def test_a_kind_first_met_in_a_later_batch_is_checked_too(tmp_path, monkeypatch, capsys):
    """Issue #33: only the first batch's first 16 JPEGs were compared with the CPU recipe, so a decoder that erred
    on 4:2:2 alone went unseen when the run met its first 4:2:2 later. Every kind is checked when first met."""
    photo = Image.fromarray(load_sample_image("china.jpg")).crop((0, 0, 300, 200))
    for i in range(12):
        photo.save(tmp_path / f"a{i:02d}.jpg", quality=90)  # 4:2:0: the first three batches of 4
    photo.save(tmp_path / "z422.jpg", quality=90, subsampling=1)  # 4:2:2: the fourth batch
    paths = sorted(str(p) for p in tmp_path.iterdir())
    stand_in = _nvjpeg_stand_in()

    def wrong_on_422(datas, device):  # right on 4:2:0, interpolated chroma (PIL's pixels) on 4:2:2
        out = stand_in(datas, device)
        for k, d in enumerate(datas):
            if simplejpeg.decode_jpeg_header(bytes(d.numpy()))[3] == "422":
                out[k] = torch.from_numpy(simplejpeg.decode_jpeg(bytes(d.numpy()), colorspace="RGB",
                                                                 fastupsample=False)).permute(2, 0, 1)
        return out
    monkeypatch.setattr(gpu_jpeg, "nvjpeg", wrong_on_422)
    bb = Backbone(name="pixels", embedder=None, pre=_pre(), dim=0, weights_sha256="")
    want = list(_input_batches(bb, paths, 4, 2, pinned=False, layout=torch.channels_last))
    _same_batches(list(_gpu_jpeg_batches(bb, paths, 4, 2, device="cpu", layout=torch.channels_last)), want)
    err = capsys.readouterr().err
    assert "other pixels than the CPU's on 1 of 1 images checked (422)" in err, err
    assert [j.kind for j in map(lambda q: decode_tensor(q, defer_jpeg=True), paths)][-2:] == ["420", "422"]


def test_the_check_needs_no_jpeg_and_says_nothing_when_bytes_agree(tmp_path, monkeypatch, capsys):
    paths = _folder(tmp_path)
    monkeypatch.setattr(gpu_jpeg, "nvjpeg", _nvjpeg_stand_in())
    bb = Backbone(name="pixels", embedder=None, pre=_pre(), dim=0, weights_sha256="")
    for some in (paths, [p for p in paths if not p.endswith(".jpg")]):
        want = list(_input_batches(bb, some, 4, 2, pinned=False, layout=torch.channels_last))
        _same_batches(list(_gpu_jpeg_batches(bb, some, 4, 2, device="cpu", layout=torch.channels_last)), want)
    assert capsys.readouterr().err == ""


def test_luma_before_the_exact_resize_is_resize_crops_grayscale():
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 3, 90, 70), dtype=np.uint8))
    assert torch.equal(resize_crop_exact(luma(x), 28, 24, True), resize_crop(x, 28, 24, True, True).contiguous())


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_nvjpeg_on_this_gpu_gives_the_cpu_recipes_inputs(tmp_path, capsys):
    paths = _folder(tmp_path)
    bb = Backbone(name="pixels", embedder=None, pre=_pre(), dim=0, weights_sha256="")
    want = list(_input_batches(bb, paths, 8, 2, pinned=False, layout=torch.channels_last))
    got = list(_gpu_jpeg_batches(bb, paths, 8, 2, device="cuda", layout=torch.channels_last))
    assert capsys.readouterr().err == ""  # the first batch's check passed: the GPU decoded
    assert all(x.is_cuda for x, _ in got)
    _same_batches(got, want)
