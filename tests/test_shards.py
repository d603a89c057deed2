"""Sharded extraction (--num-shards/--shard-index + assemble) equals a single-process run."""
import numpy as np

from features.extract import extract, shard_path
from features.shards import assemble_shards
from features.storage.store import read_store
from tests.conftest import TINY, make_images


def test_shards_then_assemble_equal_single_process(tmp_path, tiny_weights):
    images = make_images(tmp_path / "imgs", per_class=6)
    (images / "red" / "zero.png").write_bytes(b"")
    kw = dict(images=str(images), backbone=TINY, weights=tiny_weights, progress=False, workers=0)
    extract(out=str(tmp_path / "single.h5"), **kw)
    out = tmp_path / "sharded.h5"
    sizes = [extract(out=str(out), num_shards=2, shard_index=i, **kw).rows for i in range(2)]
    assert all(shard_path(out, i, 2).exists() for i in range(2)) and sum(sizes) == 18 and min(sizes) > 0
    assemble_shards(out=str(out), num_shards=2)
    a, b = read_store(tmp_path / "single.h5"), read_store(out)
    assert a.paths == b.paths and a.sha256 == b.sha256 and list(a.labels) == list(b.labels)
    assert sorted(a.skipped) == sorted(b.skipped) and any("zero.png" in p for p, _ in b.skipped)
    np.testing.assert_allclose(a.features, b.features, rtol=1e-3, atol=1e-5)
    assert b.shard is None and b.fingerprint == a.fingerprint


def test_shards_from_two_folders_are_refused_naming_the_shard(tmp_path, tiny_weights):
    """Issue #33: shard 0 from one folder and shard 1 from another (same classes) assembled with exit 0 into a store
    rooted at the first folder, half its rows naming files that do not exist there."""
    import pytest
    from features.errors import UserError
    kw = dict(backbone=TINY, weights=tiny_weights, progress=False, workers=0, num_shards=2)
    out = tmp_path / "s.h5"
    extract(images=str(make_images(tmp_path / "one", per_class=4)), out=str(out), shard_index=0, **kw)
    extract(images=str(make_images(tmp_path / "two", per_class=4, seed=3)), out=str(out), shard_index=1, **kw)
    with pytest.raises(UserError, match=f"{shard_path(out, 1, 2)}: extracted from {tmp_path / 'two'}, not "
                                        f"{tmp_path / 'one'}"):
        assemble_shards(out=str(out), num_shards=2)
    assert not out.exists()


def test_a_shard_of_other_classes_is_refused_naming_both_class_lists(tmp_path, tiny_weights):
    """The same backbone, other classes: the line said 'another backbone or class list (identical)'."""
    import shutil
    import pytest
    from features.errors import UserError
    kw = dict(backbone=TINY, weights=tiny_weights, progress=False, workers=0, num_shards=2)
    images = make_images(tmp_path / "imgs", per_class=4)
    out = tmp_path / "s.h5"
    extract(images=str(images), out=str(out), shard_index=0, **kw)
    shutil.rmtree(images / "green")
    extract(images=str(images), out=str(out), shard_index=1, **kw)
    with pytest.raises(UserError, match=rf"{shard_path(out, 1, 2)}: classes \['blue', 'red'\] differ from "
                                        rf"{shard_path(out, 0, 2)}'s \['blue', 'green', 'red'\]"):
        assemble_shards(out=str(out), num_shards=2)
    assert not out.exists()
