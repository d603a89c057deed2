"""The PyTorch port of the FER-2013 mini-Xception reproduces the reference port's zero-shot accuracy."""

import numpy as np
import pytest
import torch

from features.models.backbones import load_backbone
from features.models.preprocess import prepare
from features.models.fer import FER_CLASSES
from features.input.images import decode
from tests.conftest import SHARED

REFERENCE = {"emojione": 0.59, "twemoji": 0.45, "noto": 0.43}


@pytest.mark.skipif(not (SHARED / "emoji-faces7").exists(), reason="needs ../shared/data/emoji-faces7")
@pytest.mark.parametrize("style", sorted(REFERENCE))
def test_zero_shot_accuracy_matches_reference_port(style):
    bb = load_backbone("fer_mini_xception")
    paths = sorted((SHARED / "emoji-faces7" / style).glob("*/*.png"))
    y = np.array([FER_CLASSES.index(p.parent.name) for p in paths])
    x = torch.stack([prepare(decode(str(p)), bb.pre) for p in paths])  # (N, 1, 64, 64) uint8
    with torch.inference_mode():
        acc = float((bb.embedder(x)[:, 128:].argmax(1).numpy() == y).mean())  # its 7 log-probabilities
    assert abs(acc - REFERENCE[style]) <= 0.05, acc


def test_fer_features_are_pooled_128_plus_7_log_probs():
    bb = load_backbone("fer_mini_xception")
    assert bb.dim == 135 and bb.pre.grayscale and bb.pre.size == 64
    x = torch.randint(0, 256, (2, 1, 64, 64), dtype=torch.uint8)
    with torch.inference_mode():
        f = bb.embedder(x)
    assert torch.allclose(f[:, 128:].exp().sum(1), torch.ones(2), atol=1e-5)  # log-probabilities
    assert (f[:, :128] != 0).any()


def test_weights_ship_inside_the_package():
    from features.models.fer import WEIGHTS
    import hashlib
    shared = SHARED.parent / "weights" / "fer2013_mini_xception.hdf5"
    if not shared.is_file():
        pytest.skip("no ../shared/weights to compare with")
    assert hashlib.sha256(WEIGHTS.read_bytes()).digest() == hashlib.sha256(shared.read_bytes()).digest()
    assert (WEIGHTS.parent / "LICENSE-fer-MIT.txt").is_file()
