"""The kdiff HDF5 layout: its constants, writing a packed source atomically, and reading files back.

Layout (one file per split)::

    images   uint8 (N, H, W, C), C in {1, 3}
    labels   int64 (N,)
    attrs    source: str, class_names: str array (empty when unlabeled), split: str, layout: int (= 1)

Both datasets carry Fletcher-32 checksums, so a damaged file is reported, not read as noise.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from .._util import check_int

LAYOUT = 1
SPLITS = ("train", "test")
FORMATS = ("idx", "cifar", "folder", "npz", "digits")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
IN_MEMORY_MAX_BYTES = 1 << 30  # H5Dataset reads files up to this many image bytes into memory
DIGITS_TEST_SIZE = 360  # the last 360 of scikit-learn's 1,797 digits (36 +- 2 per class) form the test split
_CHUNK_BYTES = 1 << 16  # HDF5 chunk size target: random reads touch one small chunk
_WRITE_BATCH = 4096  # images per write, and per progress-bar step


@dataclass(frozen=True)
class Packed:
    """A source ready to write: ``n`` images of shape (H, W, C), delivered as (images, labels) chunks."""

    n: int
    image_shape: tuple[int, int, int]
    chunks: Iterable[tuple[np.ndarray, np.ndarray]]
    class_names: tuple[str, ...]
    source: str


@dataclass(frozen=True)
class H5Info:
    """What a kdiff HDF5 file holds, without its pixels."""

    path: Path
    n: int
    image_shape: tuple[int, int, int]
    source: str
    class_names: tuple[str, ...]
    split: str


def as_images(images: np.ndarray, name: str = "images") -> np.ndarray:
    """uint8 images as (N, H, W, C): (N, H, W) gains C = 1; (N, C, H, W) with C in {1, 3} is moved to the end."""
    if not isinstance(images, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array, got {type(images).__name__}")
    if images.dtype != np.uint8:
        if images.dtype.kind not in "iu":
            raise TypeError(f"{name}: expected uint8 pixels in [0, 255], got dtype {images.dtype} "
                            "(scale floats yourself: the range cannot be guessed)")
        if images.size and (images.min() < 0 or images.max() > 255):
            raise ValueError(f"{name}: expected integer pixels in [0, 255], got range "
                             f"[{images.min()}, {images.max()}]")
        images = images.astype(np.uint8)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise ValueError(f"{name}: expected shape (N, H, W), (N, H, W, C) or (N, C, H, W), got {images.shape}")
    if images.shape[-1] not in (1, 3) and images.shape[1] in (1, 3):
        images = images.transpose(0, 2, 3, 1)
    if images.shape[-1] not in (1, 3):
        raise ValueError(f"{name}: expected 1 or 3 channels, got shape {images.shape}")
    return np.ascontiguousarray(images)


def _as_labels(labels: np.ndarray | None, n: int, n_classes: int, name: str = "labels") -> np.ndarray:
    if labels is None:
        return np.zeros(n, dtype=np.int64)
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected integer labels, got dtype {labels.dtype}")
    if labels.shape != (n,):
        raise ValueError(f"{name}: expected shape ({n},) (one per image), got {labels.shape}")
    if n and labels.min() < 0:
        raise ValueError(f"{name}: expected labels >= 0, got min {labels.min()}")
    if n and n_classes and labels.max() >= n_classes:
        raise ValueError(f"{name}: expected labels < {n_classes} (the number of class names), got max {labels.max()}")
    return labels.astype(np.int64)


def _in_batches(images: np.ndarray, labels: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for i in range(0, len(images), _WRITE_BATCH):
        yield images[i:i + _WRITE_BATCH], labels[i:i + _WRITE_BATCH]


def packed_arrays(images: np.ndarray, labels: np.ndarray | None = None, *, class_names: Sequence[str] = (),
                  source: str = "arrays") -> Packed:
    """In-memory arrays as a :class:`Packed` source; labels default to 0 (unlabeled, no class names)."""
    images = as_images(images)
    class_names = tuple(str(c) for c in class_names)
    labels = _as_labels(labels, len(images), len(class_names))
    return Packed(len(images), images.shape[1:], _in_batches(images, labels), class_names, source)


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    return split


def _chunk_rows(n: int, row_bytes: int) -> int:
    return max(1, min(n, _CHUNK_BYTES // max(row_bytes, 1)))


def _check_chunk_labels(y: np.ndarray, packed: Packed) -> None:
    """Labels are >= 0, and below ``len(class_names)`` when the source names its classes."""
    if not len(y):
        return
    k = len(packed.class_names)
    if y.min() < 0 or (k and y.max() >= k):
        expected = f"[0, {k - 1}] (one per class name: {list(packed.class_names)})" if k else "values >= 0"
        raise ValueError(f"class_names: {packed.source} has labels in [{y.min()}, {y.max()}], expected {expected}")


def write_packed(path: str | os.PathLike, packed: Packed, *, split: str, progress: bool = False) -> Path:
    """Write ``packed`` to ``path`` in the kdiff layout, atomically (a temporary file, renamed when complete)."""
    _check_split(split)
    if packed.n < 1:
        raise ValueError(f"{packed.source}: no images found")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    h, w, c = packed.image_shape
    try:
        with h5py.File(tmp, "w") as f:
            images = f.create_dataset("images", shape=(packed.n, h, w, c), dtype=np.uint8, fletcher32=True,
                                      chunks=(_chunk_rows(packed.n, h * w * c), h, w, c))
            labels = f.create_dataset("labels", shape=(packed.n,), dtype=np.int64, fletcher32=True,
                                      chunks=(_chunk_rows(packed.n, 8),))
            f.attrs["layout"] = LAYOUT
            f.attrs["source"] = packed.source
            f.attrs["split"] = split
            f.attrs.create("class_names", data=list(packed.class_names), dtype=h5py.string_dtype())
            i = 0
            with tqdm(total=packed.n, unit="img", desc=f"pack {out.name}", disable=not progress) as bar:
                for x, y in packed.chunks:
                    if x.shape[1:] != (h, w, c) or len(y) != len(x) or i + len(x) > packed.n:
                        raise ValueError(f"{packed.source}: chunk of shape {x.shape} with {len(y)} labels does not "
                                         f"fit {packed.n} images of shape {(h, w, c)} at row {i}")
                    _check_chunk_labels(y, packed)
                    images[i:i + len(x)] = x
                    labels[i:i + len(x)] = y
                    i += len(x)
                    bar.update(len(x))
            if i != packed.n:
                raise ValueError(f"{packed.source}: expected {packed.n} images, got {i}")
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def write_h5(path: str | os.PathLike, images: np.ndarray, labels: np.ndarray | None = None, *, split: str,
             source: str, class_names: Sequence[str] = (), progress: bool = False) -> Path:
    """Write uint8 ``images`` (N, H, W[, C]) and int ``labels`` (N,) to ``path`` in the kdiff layout, atomically."""
    return write_packed(path, packed_arrays(images, labels, class_names=class_names, source=source),
                        split=split, progress=progress)


def _open_h5(path: str | os.PathLike, name: str = "path") -> h5py.File:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{name}: no such file {str(p)!r}; make one with "
                                f"`python -m kdiff.data pack SOURCE --out {p.name}`")
    if p.is_dir():
        raise ValueError(f"{name}: expected an HDF5 file, got the folder {str(p)!r}")
    try:
        return h5py.File(p, "r")
    except OSError as e:
        raise ValueError(f"{name}: {str(p)!r} is not a readable HDF5 file (truncated or corrupt?): {e}") from e


def _info(f: h5py.File, path: Path) -> H5Info:
    try:
        missing = [k for k in ("images", "labels") if not isinstance(f.get(k), h5py.Dataset)]
        if missing:
            raise ValueError(f"{str(path)!r}: missing dataset(s) {missing} (found {sorted(f.keys())}); expected the "
                             "kdiff layout: images uint8 (N, H, W, C), labels int64 (N,)")
        images, labels = f["images"], f["labels"]
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(f"{str(path)!r}: expected dataset 'images' uint8 (N, H, W, C) with C in (1, 3), "
                             f"got {images.dtype} {images.shape}")
        if labels.dtype.kind not in "iu" or labels.shape != images.shape[:1]:
            raise ValueError(f"{str(path)!r}: expected dataset 'labels' integer ({images.shape[0]},), "
                             f"got {labels.dtype} {labels.shape}")
        names = f.attrs.get("class_names", ())
        names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in np.atleast_1d(names))
        return H5Info(path, images.shape[0], tuple(images.shape[1:]), str(f.attrs.get("source", "")),
                      names, str(f.attrs.get("split", "")))
    except (OSError, KeyError, RuntimeError) as e:
        raise ValueError(f"{str(path)!r}: damaged HDF5 file (truncated or corrupt?): {e}") from e


def read_info(path: str | os.PathLike) -> H5Info:
    """The metadata of a kdiff HDF5 file, checked (clear errors for wrong paths, damage, missing datasets)."""
    with _open_h5(path) as f:
        return _info(f, Path(path))


def _read_rows(f: h5py.File, path: Path, key: str, rows: slice | int) -> np.ndarray:
    try:
        return f[key][rows]
    except (OSError, KeyError, RuntimeError) as e:
        raise ValueError(f"{str(path)!r}: cannot read '{key}'[{rows}]: damaged HDF5 file "
                         f"(checksum or truncation): {e}") from e


def read_h5(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, H5Info]:
    """All of a kdiff HDF5 file: images uint8 (N, H, W, C), labels int64 (N,), and its :class:`H5Info`."""
    with _open_h5(path) as f:
        info = _info(f, Path(path))
        images = _read_rows(f, info.path, "images", slice(None))
        labels = _read_rows(f, info.path, "labels", slice(None)).astype(np.int64)
    return images, labels, info


def iter_h5(path: str | os.PathLike, *, batch_size: int = 1024) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(images uint8 (b, H, W, C), labels int64 (b,)) batches of a kdiff HDF5 file, read one batch at a time."""
    check_int(batch_size, "batch_size", low=1)
    with _open_h5(path) as f:
        info = _info(f, Path(path))
        for i in range(0, info.n, batch_size):
            rows = slice(i, min(i + batch_size, info.n))
            yield _read_rows(f, info.path, "images", rows), _read_rows(f, info.path, "labels", rows).astype(np.int64)
