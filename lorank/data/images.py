"""Image folders packed in a tar archive (CIFAR-10 as JPEGs), decoded once and cached.

The archive holds `<split>/<class>/<name>.jpg` (an optional leading directory is
allowed). Classes are numbered in sorted order of their names. A subset keeps the
first `max_per_class` files of each class in sorted file-name order, so it is the
same on every machine. Decoded arrays are cached as uint8 npz files under
`$LORANK_CACHE` (default `~/.cache/lorank`).

`load_images(source, split, ...)` reads any of the three sources an SSL config names:
"folder_tar" (such an archive, by default the CIFAR-10 one), "tfds" (CIFAR-10, CIFAR-100,
STL-10 with its "unlabelled" split, ... prepared as array_record in a data_dir; never
downloads) and "npz" (a file of `images` uint8 [N, H, W, C] and `labels`).

`data_root()` is where shared data files live (`$LORANK_DATA`, else `../shared/data`
beside the repository); `cifar10_archive` and `load_cifar10` find and read the
CIFAR-10 JPEG archive there; `pool_flatten` turns images into the low-dimensional
vectors the theory simulators use.
"""

from __future__ import annotations

import gzip
import io
import os
import pathlib
import tarfile
import zlib

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
CIFAR10_ARCHIVE = "cifar10-jpeg.tar.gz"
REPO = pathlib.Path(__file__).resolve().parents[2]


def data_root() -> pathlib.Path:
    """`$LORANK_DATA`, else `shared/data` beside the repository."""
    return pathlib.Path(os.environ.get("LORANK_DATA", REPO.parent / "shared" / "data"))


def cifar10_archive(path: str | os.PathLike = "") -> pathlib.Path:
    """The CIFAR-10 JPEG archive: `path` if given, else `data_root() / CIFAR10_ARCHIVE`."""
    return pathlib.Path(path) if path else data_root() / CIFAR10_ARCHIVE


def load_cifar10(path: str | os.PathLike = "", split: str = "train",
                 max_per_class: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images float32 [N, 32, 32, 3] in [0, 1], labels int32 [N]) of a CIFAR-10 split or subset
    (`load_image_folder_tar` of `cifar10_archive(path)`)."""
    images, labels = load_image_folder_tar(cifar10_archive(path), split, max_per_class)
    return images.astype(np.float32) / 255.0, labels


def pool_flatten(images: np.ndarray, pool: int, grayscale: bool) -> np.ndarray:
    """[N, H, W, C] -> [N, (H / pool) * (W / pool) * channels] by average pooling (channels 1 if
    `grayscale`: the mean over C)."""
    n, h, w, ch = images.shape
    if h % pool or w % pool:
        raise ValueError(f"pool={pool} must divide the image size {h}x{w}")
    x = images.reshape(n, h // pool, pool, w // pool, pool, ch).mean(axis=(2, 4))
    if grayscale:
        x = x.mean(axis=-1, keepdims=True)
    return x.reshape(n, -1)


def downsample(images: np.ndarray, factor: int) -> np.ndarray:
    """[N, H, W, C] -> [N, H / factor, W / factor, C] by average pooling (factor 1: unchanged)."""
    if not isinstance(factor, int) or factor < 1:
        raise ValueError(f"downsample factor={factor!r} must be a positive integer")
    if factor == 1:
        return images
    n, h, w, ch = images.shape
    if h % factor or w % factor:
        raise ValueError(f"downsample factor={factor} must divide the image size {h}x{w}")
    return images.reshape(n, h // factor, factor, w // factor, factor, ch).mean(axis=(2, 4))


def cache_dir() -> pathlib.Path:
    """`$LORANK_CACHE` or `~/.cache/lorank`."""
    return pathlib.Path(os.environ.get("LORANK_CACHE", pathlib.Path.home() / ".cache" / "lorank"))


def load_image_folder_tar(path: str | os.PathLike, split: str, max_per_class: int | None = None,
                          *, image_size: tuple[int, int] = (32, 32),
                          cache: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Loads one split of a class-per-folder image archive.

    Args:
      path: the .tar / .tar.gz archive.
      split: top-level folder, e.g. "train" or "test".
      max_per_class: keep at most this many images per class (None: all).
      image_size: expected (height, width); every image must have it.
      cache: read and write the npz cache.

    Returns:
      (images uint8 [N, H, W, 3], labels int32 [N]) ordered by class, then file name.

    Raises:
      FileNotFoundError: the archive does not exist (named in the message).
      ValueError: a corrupt archive or image (named), an unknown split, a bad size.
    """
    path = pathlib.Path(path)
    if max_per_class is not None and max_per_class < 1:
        raise ValueError(f"max_per_class={max_per_class} must be >= 1 or None")
    if not path.is_file():
        raise FileNotFoundError(f"image archive {path} not found")
    cached = _cache_path(path, split, max_per_class, image_size)
    if cache and cached.is_file():
        try:
            with np.load(cached) as z:
                return z["images"], z["labels"]
        except (OSError, ValueError, KeyError, zlib.error):
            cached.unlink(missing_ok=True)  # a broken cache is rebuilt from the archive
    members = _read_split(path, split)
    classes = sorted(members)
    images, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(members[name])
        for fname in files[:max_per_class]:
            images.append(_decode(members[name][fname], f"{path}:{split}/{name}/{fname}",
                                  image_size))
            labels.append(label)
    out = (np.stack(images).astype(np.uint8), np.asarray(labels, dtype=np.int32))
    if cache:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".tmp.npz")
        np.savez(tmp, images=out[0], labels=out[1], classes=np.asarray(classes))
        tmp.replace(cached)
    return out


def class_names(path: str | os.PathLike, split: str) -> list[str]:
    """Sorted class names of a split (label i is the i-th name)."""
    return sorted(_read_split(pathlib.Path(path), split))


def _cache_path(path: pathlib.Path, split: str, max_per_class: int | None,
                size: tuple[int, int]) -> pathlib.Path:
    stat = path.stat()
    stem = path.name.split(".")[0]
    tag = f"{stem}-{stat.st_size}-{int(stat.st_mtime)}-{split}-{max_per_class or 'all'}"
    return cache_dir() / f"{tag}-{size[0]}x{size[1]}.npz"


def _read_split(path: pathlib.Path, split: str) -> dict[str, dict[str, bytes]]:
    """{class: {file name: encoded bytes}} for one split, in one streaming pass."""
    found: dict[str, dict[str, bytes]] = {}
    splits: set[str] = set()
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                if not member.isfile() or not member.name.lower().endswith(IMAGE_SUFFIXES):
                    continue
                parts = pathlib.PurePosixPath(member.name).parts
                if len(parts) < 3:
                    continue
                member_split, cls, fname = parts[-3], parts[-2], parts[-1]
                splits.add(member_split)
                if member_split != split:
                    continue
                found.setdefault(cls, {})[fname] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError, zlib.error, gzip.BadGzipFile) as e:
        raise ValueError(f"corrupt image archive {path}: {e}") from e
    if not found:
        raise ValueError(f"split {split!r} not found in {path}; it holds {sorted(splits)}")
    return found


def _decode(data: bytes, where: str, size: tuple[int, int]) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as img:
            arr = np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"corrupt image {where}: {e}") from e
    if arr.shape[:2] != tuple(size):
        raise ValueError(f"image {where} is {arr.shape[1]}x{arr.shape[0]}, expected "
                         f"{size[1]}x{size[0]}")
    return arr


IMAGE_SOURCES = ("folder_tar", "tfds", "npz")


def load_images(source: str, split: str, *, path: str | os.PathLike = "", tfds_name: str = "cifar10",
                data_dir: str | os.PathLike = "~/tensorflow_datasets", max_per_class: int | None = None,
                max_images: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images float32 [N, H, W, C] in [0, 1], labels int32 [N]) of one split of an image source.

    Args:
      source: "folder_tar" (`path`, default the CIFAR-10 archive), "tfds" (`tfds_name` prepared in
        `data_dir`; unlabeled splits get label -1) or "npz" (`path`, arrays `images` and `labels`).
      split: e.g. "train", "test" (tfds STL-10 also "unlabelled").
      max_per_class: folder_tar: the first this many images of each class (sorted file names).
      max_images: tfds / npz: the first this many records.
    Raises:
      ValueError: an unknown source, or images that are not [N, H, W, C] uint8 / in [0, 1].
      FileNotFoundError: a missing archive, file or unprepared tfds dataset (named).
    """
    if source not in IMAGE_SOURCES:
        raise ValueError(f"unknown image source {source!r}; expected one of {IMAGE_SOURCES}")
    if source == "folder_tar":
        images, labels = load_image_folder_tar(cifar10_archive(path), split, max_per_class)
    elif source == "npz":
        file = pathlib.Path(path).expanduser()
        if not file.is_file():
            raise FileNotFoundError(f"image file {file} not found")
        with np.load(file) as z:
            if "images" not in z or "labels" not in z:
                raise ValueError(f"{file} must hold arrays 'images' and 'labels', has {sorted(z.files)}")
            images, labels = z["images"][:max_images], z["labels"][:max_images].astype(np.int32)
    else:
        from lorank.data.tfds_text import open_tfds_source

        records = open_tfds_source(tfds_name, split, data_dir)
        count = len(records) if max_images is None else min(max_images, len(records))
        items = [records[i] for i in range(count)]
        images = np.stack([np.asarray(r["image"]) for r in items])
        labels = np.asarray([int(r.get("label", -1)) for r in items], np.int32)
    if images.ndim != 4:
        raise ValueError(f"images must be [N, H, W, C], got shape {images.shape} from {source} {split}")
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 255.0, labels
    return images.astype(np.float32), labels
