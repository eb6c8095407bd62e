"""load_image_folder_tar: decoding, subsets, labels, caching and clear errors."""

import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from lorank.data.images import class_names, load_image_folder_tar

COLORS = {"cat": (200, 30, 30), "ant": (20, 180, 40)}


def _jpeg(color, size=(32, 32)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _write_tar(path, files):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def archive(tmp_path, monkeypatch):
    monkeypatch.setenv("LORANK_CACHE", str(tmp_path / "cache"))
    files = {}
    for split, count in (("train", 3), ("test", 1)):
        for cls, color in COLORS.items():
            for i in reversed(range(count)):  # stored out of order on purpose
                files[f"root/{split}/{cls}/{i:04d}.jpg"] = _jpeg(color)
    return _write_tar(tmp_path / "imgs.tar.gz", files)


def test_decodes_labels_in_sorted_class_order(archive):
    images, labels = load_image_folder_tar(archive, "train")
    assert images.shape == (6, 32, 32, 3) and images.dtype == np.uint8
    assert labels.dtype == np.int32
    np.testing.assert_array_equal(labels, [0, 0, 0, 1, 1, 1])  # ant, then cat
    assert class_names(archive, "train") == ["ant", "cat"]
    np.testing.assert_allclose(images[labels == 0].mean(axis=(0, 1, 2)), COLORS["ant"], atol=3)
    np.testing.assert_allclose(images[labels == 1].mean(axis=(0, 1, 2)), COLORS["cat"], atol=3)


def test_subset_and_split(archive):
    images, labels = load_image_folder_tar(archive, "train", max_per_class=2)
    assert images.shape[0] == 4
    np.testing.assert_array_equal(labels, [0, 0, 1, 1])
    assert load_image_folder_tar(archive, "test")[0].shape == (2, 32, 32, 3)


def test_second_load_comes_from_the_cache(archive, tmp_path):
    first = load_image_folder_tar(archive, "train", max_per_class=2)
    (cached,) = (tmp_path / "cache").glob("*.npz")
    marked = first[0].copy()
    marked[0, 0, 0] = (1, 2, 3)
    np.savez(cached, images=marked, labels=first[1])
    again = load_image_folder_tar(archive, "train", max_per_class=2)
    np.testing.assert_array_equal(again[0][0, 0, 0], (1, 2, 3))  # read from the cache
    fresh = load_image_folder_tar(archive, "train", max_per_class=2, cache=False)
    np.testing.assert_array_equal(fresh[0], first[0])
    cached.write_bytes(b"broken")  # a broken cache is rebuilt
    np.testing.assert_array_equal(load_image_folder_tar(archive, "train", max_per_class=2)[0],
                                  first[0])


def test_missing_and_corrupt_files_are_named(tmp_path, monkeypatch):
    monkeypatch.setenv("LORANK_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="nope.tar.gz"):
        load_image_folder_tar(tmp_path / "nope.tar.gz", "train")
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"\x1f\x8b\x08\x00 definitely not a tar")
    with pytest.raises(ValueError, match="corrupt image archive .*junk.tar.gz"):
        load_image_folder_tar(junk, "train")
    bad = _write_tar(tmp_path / "bad.tar.gz", {"train/cat/0001.jpg": b"not a jpeg"})
    with pytest.raises(ValueError, match=r"corrupt image .*bad.tar.gz:train/cat/0001.jpg"):
        load_image_folder_tar(bad, "train")
    big = _write_tar(tmp_path / "big.tar.gz", {"train/cat/0001.jpg": _jpeg((1, 2, 3), (40, 40))})
    with pytest.raises(ValueError, match="is 40x40, expected 32x32"):
        load_image_folder_tar(big, "train")


def test_unknown_split_and_bad_subset(archive):
    with pytest.raises(ValueError, match=r"split 'val' not found .* \['test', 'train'\]"):
        load_image_folder_tar(archive, "val")
    with pytest.raises(ValueError, match="max_per_class=0"):
        load_image_folder_tar(archive, "train", max_per_class=0)


def test_real_cifar_subset(shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("LORANK_CACHE", str(tmp_path / "cache"))
    path = shared_data / "cifar10-jpeg.tar.gz"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    images, labels = load_image_folder_tar(path, "test", max_per_class=2)
    assert images.shape == (20, 32, 32, 3)
    np.testing.assert_array_equal(np.bincount(labels), 2 * np.ones(10))
    assert 30 < images.mean() < 220
