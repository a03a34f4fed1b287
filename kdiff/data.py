"""Image datasets in one HDF5 layout: packers for the formats users have, and a torch Dataset.

Layout (one file per split)::

    images   uint8 (N, H, W, C), C in {1, 3}
    labels   int64 (N,)
    attrs    source: str, class_names: str array (empty when unlabeled), split: str, layout: int (= 1)

Both datasets carry Fletcher-32 checksums, so a damaged file is reported, not read as noise.
Packers: IDX (MNIST, Fashion-MNIST), CIFAR-10/100 python batches, image folders (class = subfolder),
numpy arrays (.npz / .npy) and scikit-learn's digits. Command line::

    python -m kdiff.data pack SOURCE --out FILE.h5 [--format idx|cifar|folder|npz|digits] [--split train|test]
    python -m kdiff.data info FILE.h5

Images enter models as ``x = u / 127.5 - 1`` in [-1, 1], channels first.
"""

from __future__ import annotations

import argparse
import gzip
import io
import os
import pickle
import struct
import sys
import tarfile
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from tqdm import tqdm

from ._util import check_float, check_int

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


# --------------------------------------------------------------------------------------------- the layout


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


# --------------------------------------------------------------------------------------------- packers


def _read_bytes(path: Path) -> bytes:
    """A file's bytes, gunzipped when it starts with the gzip magic 1f 8b."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise ValueError(f"{str(path)!r}: damaged gzip file: {e}") from e
    return raw


_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (LeCun et al., the MNIST format; plain or gzip): bytes 0 0 type ndim, ndim big-endian int32 dims,
    then the values in C order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no such IDX file {str(path)!r}")
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise ValueError(f"{str(path)!r}: not an IDX file (expected magic bytes 00 00 <type> <ndim>, got {raw[:4]!r})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{str(path)!r}: truncated IDX header ({len(raw)} bytes, expected {header})")
    dims = struct.unpack(f">{ndim}i", raw[4:header])
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    expected = header + int(np.prod(dims)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"{str(path)!r}: IDX header says shape {dims} ({expected} bytes), file has {len(raw)} bytes "
                         "(truncated or not an IDX file)")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _idx_labels_path(images_path: Path) -> Path:
    name = images_path.name.replace("images", "labels").replace("idx3", "idx1")
    stem = name[:-3] if name.endswith(".gz") else name
    for candidate in (images_path.with_name(stem), images_path.with_name(stem + ".gz")):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"source: no labels file {stem!r}[.gz] next to {str(images_path)!r}")


def _idx_images_path(folder: Path, split: str) -> Path:
    prefix = {"train": "train", "test": "t10k"}[split]
    found = sorted(p for p in folder.iterdir() if p.name.startswith(f"{prefix}-images") and "idx3" in p.name)
    if len(found) != 1:
        raise FileNotFoundError(f"source: expected one '{prefix}-images-idx3-ubyte[.gz]' in {str(folder)!r} for "
                                f"split {split!r}, found {[p.name for p in found]}")
    return found[0]


def pack_idx(source: str | os.PathLike, *, split: str = "train", class_names: Sequence[str] | None = None) -> Packed:
    """IDX images (N, H, W) and labels (N,): a folder (the split picks train-* or t10k-*) or an images file.

    Class names default to Fashion-MNIST's when the path mentions "fashion", else to the label values.
    """
    source = Path(source)
    images_path = _idx_images_path(source, _check_split(split)) if source.is_dir() else source
    images, labels = read_idx(images_path), read_idx(_idx_labels_path(images_path))
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{str(images_path)!r}: expected uint8 images (N, H, W), got {images.dtype} {images.shape}")
    if class_names is None:
        fashion = "fashion" in str(images_path.resolve()).lower()
        class_names = FASHION_MNIST_CLASSES if fashion else [str(k) for k in range(int(labels.max()) + 1)]
    return packed_arrays(images, labels, class_names=class_names, source=f"idx:{images_path}")


class _ArrayUnpickler(pickle.Unpickler):
    """Loads dicts, lists, strings and numpy arrays only: CIFAR batches are pickles, and a pickle can run code."""

    _allowed = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._allowed:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch")
        return super().find_class(module, name)


def _unpickle(raw: bytes, name: str) -> dict[str, object]:
    try:
        d = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise ValueError(f"{name}: not a CIFAR python batch: {e}") from e
    if not isinstance(d, dict):
        raise ValueError(f"{name}: expected a pickled dict, got {type(d).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


_CIFAR_FILES = {"batches.meta", "meta", "test_batch", "train", "test"} | {f"data_batch_{i}" for i in range(1, 6)}


def _cifar_files(source: Path) -> dict[str, bytes]:
    """The CIFAR batch files under ``source`` (a .tar.gz or a folder), by base name."""
    files: dict[str, bytes] = {}
    if source.is_file():
        try:
            with tarfile.open(source, "r:*") as tar:
                for m in tar.getmembers():
                    base = m.name.rsplit("/", 1)[-1]
                    if m.isfile() and base in _CIFAR_FILES:
                        files[base] = tar.extractfile(m).read()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise ValueError(f"source: {str(source)!r} is not a readable tar archive: {e}") from e
    elif source.is_dir():
        for root, _, names in os.walk(source):
            for base in set(names) & _CIFAR_FILES:
                files.setdefault(base, (Path(root) / base).read_bytes())
    else:
        raise FileNotFoundError(f"source: no such file or folder {str(source)!r}")
    return files


def pack_cifar(source: str | os.PathLike, *, split: str = "train",
               class_names: Sequence[str] | None = None) -> Packed:
    """CIFAR-10 or CIFAR-100 (fine labels) python batches, from the .tar.gz or its extracted folder.

    Each batch row is 3072 bytes: the 32x32 red plane, then green, then blue (Krizhevsky 2009).
    """
    source = Path(source)
    files = _cifar_files(source)
    _check_split(split)
    if "batches.meta" in files:
        meta_name, label_key, name_key = "batches.meta", "labels", "label_names"
        batches = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    elif "meta" in files:
        meta_name, label_key, name_key, batches = "meta", "fine_labels", "fine_label_names", [split]
    else:
        raise ValueError(f"source: no CIFAR 'batches.meta' or 'meta' file in {str(source)!r}")
    missing = [b for b in batches if b not in files]
    if missing:
        raise ValueError(f"source: CIFAR batches {missing} missing from {str(source)!r}")
    meta = _unpickle(files[meta_name], meta_name)
    if class_names is None:
        class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[name_key]]
    images, labels = [], []
    for b in batches:
        d = _unpickle(files[b], b)
        data = np.asarray(d["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3072:
            raise ValueError(f"{b}: expected 'data' of shape (N, 3072), got {data.shape}")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(d[label_key], dtype=np.int64))
    return packed_arrays(np.concatenate(images), np.concatenate(labels), class_names=class_names,
                         source=f"cifar:{source}")


_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _load_image(path: Path, channels: int, shape: tuple[int, int, int]) -> np.ndarray:
    try:
        with Image.open(path) as im:
            a = np.asarray(im.convert("L" if channels == 1 else "RGB"))
    except OSError as e:
        raise ValueError(f"{str(path)!r}: cannot read image: {e}") from e
    a = a.reshape(a.shape[:2] + (channels,))
    if a.shape != shape:
        raise ValueError(f"{str(path)!r}: expected an image of shape {shape[:2]} like the first one, got {a.shape[:2]}"
                         " (resize the folder to one size first)")
    return a


def pack_folder(source: str | os.PathLike, *, class_names: Sequence[str] | None = None) -> Packed:
    """An image folder: one subfolder per class (sorted names, label = position), or images directly (unlabeled).

    All images must share one size. Grayscale when every image is grayscale, else RGB (alpha dropped,
    palettes expanded).
    """
    source = Path(source)
    if not source.is_dir():
        raise FileNotFoundError(f"source: no such folder {str(source)!r}")
    classes = sorted(p for p in source.iterdir() if p.is_dir() and _image_files(p))
    loose = [p for p in source.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if classes and loose:
        raise ValueError(f"source: {str(source)!r} has both class subfolders and loose images ({loose[0].name}); "
                         "put every image in a class subfolder")
    files = [(f, k) for k, c in enumerate(classes) for f in _image_files(c)] or [(f, 0) for f in sorted(loose)]
    if not files:
        raise ValueError(f"source: no images ({', '.join(IMAGE_SUFFIXES)}) in {str(source)!r}")
    modes = []
    for f, _ in files:
        try:
            with Image.open(f) as im:
                modes.append((im.mode, im.size))
        except OSError as e:
            raise ValueError(f"{str(f)!r}: cannot read image: {e}") from e
    channels = 1 if all(m in _GRAY_MODES for m, _ in modes) else 3
    shape = (modes[0][1][1], modes[0][1][0], channels)
    if class_names is None:
        class_names = [c.name for c in classes]

    def chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for i in range(0, len(files), _WRITE_BATCH):
            part = files[i:i + _WRITE_BATCH]
            yield (np.stack([_load_image(f, channels, shape) for f, _ in part]),
                   np.array([k for _, k in part], dtype=np.int64))

    return Packed(len(files), shape, chunks(), tuple(class_names), f"folder:{source}")


def pack_npz(source: str | os.PathLike, *, class_names: Sequence[str] | None = None) -> Packed:
    """A .npy of images, or a .npz with 'images' (or 'x', 'arr_0'), optional 'labels' (or 'y', 'arr_1') and
    'class_names'. Images: uint8 (N, H, W), (N, H, W, C) or (N, C, H, W). Loaded without pickle."""
    source = Path(source)
    if not source.is_file():
        raise FileNotFoundError(f"source: no such file {str(source)!r}")
    try:
        loaded = np.load(source, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            arrays = {"images": loaded}
        else:
            with loaded:
                arrays = {k: loaded[k] for k in loaded.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"source: {str(source)!r} is not a readable .npy/.npz file: {e}") from e
    images = next((arrays[k] for k in ("images", "x", "arr_0") if k in arrays), None)
    if images is None:
        raise ValueError(f"source: no 'images', 'x' or 'arr_0' array in {str(source)!r} (found {sorted(arrays)})")
    labels = next((arrays[k] for k in ("labels", "y", "arr_1") if k in arrays), None)
    if class_names is None:
        if "class_names" in arrays:
            class_names = [str(c) for c in arrays["class_names"]]
        elif labels is not None and labels.size:
            class_names = [str(k) for k in range(int(labels.max()) + 1)]
        else:
            class_names = ()
    return packed_arrays(images, labels, class_names=class_names, source=f"npz:{source}")


def digits_arrays(*, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits as uint8 (N, 8, 8, 1) and labels (N,): u = floor(255 v / 16 + 1/2) for v in
    0..16, so 0 -> 0, 8 -> 128, 16 -> 255. Split "test" is the last 360 of the 1,797 images, "train" the first 1,437.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("the digits data ship with scikit-learn: pip install scikit-learn") from e
    d = load_digits()
    u = np.floor(d.images * (255.0 / 16.0) + 0.5).astype(np.uint8)[..., None]
    cut = len(u) - DIGITS_TEST_SIZE
    rows = slice(None, cut) if _check_split(split) == "train" else slice(cut, None)
    return u[rows], d.target[rows].astype(np.int64)


def pack_digits(*, split: str = "train", class_names: Sequence[str] | None = None) -> Packed:
    """scikit-learn's digits (8x8, 1,437 train / 360 test), scaled as in :func:`digits_arrays`."""
    images, labels = digits_arrays(split=split)
    names = class_names if class_names is not None else [str(k) for k in range(10)]
    return packed_arrays(images, labels, class_names=names,
                         source="sklearn.datasets.load_digits, u = floor(255 v / 16 + 1/2)")


def guess_format(source: str | os.PathLike) -> str:
    """The packer for ``source``: 'digits' by name; .npz/.npy; .tar.gz/.tgz/.tar (CIFAR); IDX files; else a folder."""
    if str(source) == "digits":
        return "digits"
    p = Path(source)
    if not p.exists():
        raise FileNotFoundError(f"source: no such file or folder {str(p)!r} (or pass 'digits')")
    name = p.name.lower()
    if name.endswith((".npz", ".npy")):
        return "npz"
    if name.endswith((".tar.gz", ".tgz", ".tar")):
        return "cifar"
    if p.is_file():
        if "idx" in name:
            return "idx"
        raise ValueError(f"source: cannot tell the format of {str(p)!r}; pass --format")
    top = {q.name for q in p.iterdir()}
    if top & {"batches.meta", "meta", "cifar-10-batches-py", "cifar-100-python"}:
        return "cifar"
    if any("idx3-ubyte" in n for n in top):
        return "idx"
    return "folder"


def pack(source: str | os.PathLike, out: str | os.PathLike, *, format: str | None = None, split: str = "train",
         class_names: Sequence[str] | None = None, progress: bool = False) -> Path:
    """Pack ``source`` into the HDF5 file ``out`` with the packer for ``format`` (guessed when None)."""
    format = format or guess_format(source)
    _check_split(split)
    if format == "idx":
        packed = pack_idx(source, split=split, class_names=class_names)
    elif format == "cifar":
        packed = pack_cifar(source, split=split, class_names=class_names)
    elif format == "folder":
        packed = pack_folder(source, class_names=class_names)
    elif format == "npz":
        packed = pack_npz(source, class_names=class_names)
    elif format == "digits":
        packed = pack_digits(split=split, class_names=class_names)
    else:
        raise ValueError(f"format: expected one of {FORMATS}, got {format!r}")
    return write_packed(out, packed, split=split, progress=progress)


# --------------------------------------------------------------------------------------------- the Dataset


def x_from_uint8(u: Tensor) -> Tensor:
    """x = u / 127.5 - 1: uint8 pixels to float32 in [-1, 1]. u: (..., C, H, W)."""
    if not isinstance(u, Tensor) or u.dtype != torch.uint8:
        raise TypeError(f"u: expected a uint8 tensor, got {getattr(u, 'dtype', type(u).__name__)}")
    return u.to(torch.float32) / 127.5 - 1.0


def uint8_from_x(x: Tensor) -> Tensor:
    """u = round(127.5 (x + 1)), clamped to [0, 255] (samples may overshoot [-1, 1]). x: (..., C, H, W)."""
    check_float(x, "x")
    return torch.round((x.to(torch.float32) + 1.0) * 127.5).clamp_(0, 255).to(torch.uint8)


def pad_to(x: Tensor, size: int, *, value: float = -1.0) -> Tensor:
    """Pad (..., C, H, W) to (..., C, size, size) with ``value`` (background -1 = black), centred, odd pixel last."""
    h, w = x.shape[-2:]
    if h > size or w > size:
        raise ValueError(f"size: expected >= the image size {h}x{w} to pad, got {size} (use fit='resize' to shrink)")
    top, left = (size - h) // 2, (size - w) // 2
    return F.pad(x, (left, size - w - left, top, size - h - top), value=value)


def resize_to(x: Tensor, size: int) -> Tensor:
    """Centre-crop (..., C, H, W) to a square, then resize to (..., C, size, size), bilinear with antialiasing."""
    h, w = x.shape[-2:]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    x = x[..., top:top + s, left:left + s]
    if s == size:
        return x
    batch = x.reshape(-1, *x.shape[-3:])
    y = F.interpolate(batch, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return y.reshape(*x.shape[:-2], size, size)


_MASK64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    """SplitMix64's output function (Steele, Lea & Flood 2014, "Fast splittable pseudorandom number generators")."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def hash_uniform(seed: int, epoch: int, index: int) -> float:
    """A uniform number in [0, 1) that is a pure function of (seed, epoch, index): the same in every
    DataLoader worker, process and resumed run, with no generator state to share or save."""
    z = _splitmix64(_splitmix64(_splitmix64(seed & _MASK64) ^ (epoch & _MASK64)) ^ (index & _MASK64))
    return (z >> 11) * 2.0**-53


class H5Dataset(Dataset):
    """The images of a kdiff HDF5 file as (x, label): x float32 (C, S, S) = u / 127.5 - 1 in [-1, 1], label int.

    Files with at most ``IN_MEMORY_MAX_BYTES`` of pixels are read into memory (``in_memory=None``); larger ones are
    read image by image, each process opening its own handle on first use (never in ``__init__``), so DataLoader
    workers are safe. ``size`` pads with the background -1 (``fit="pad"``, e.g. 28 -> 32) or centre-crops and
    resizes (``fit="resize"``). An image is flipped left-right when ``hash_uniform(seed, epoch, index) < flip_p``;
    call :meth:`set_epoch` before each epoch (its iterator copies the dataset into the workers; with
    ``persistent_workers=True`` the workers keep the epoch they started with).
    """

    def __init__(self, path: str | os.PathLike, *, size: int | None = None, fit: str = "pad", flip_p: float = 0.0,
                 seed: int = 0, in_memory: bool | None = None) -> None:
        self.info = read_info(path)
        self.path = self.info.path
        if size is not None:
            check_int(size, "size", low=1)
        if fit not in ("pad", "resize"):
            raise ValueError(f"fit: expected 'pad' or 'resize', got {fit!r}")
        if fit == "pad" and size is not None and size < max(self.info.image_shape[:2]):
            raise ValueError(f"size: expected >= the image size {self.info.image_shape[:2]} with fit='pad', got {size}")
        if isinstance(flip_p, bool) or not isinstance(flip_p, (int, float)) or not 0.0 <= flip_p <= 1.0:
            raise ValueError(f"flip_p: expected a probability in [0, 1], got {flip_p!r}")
        self.size, self.fit, self.flip_p, self.seed, self.epoch = size, fit, float(flip_p), check_int(seed, "seed"), 0
        nbytes = self.info.n * int(np.prod(self.info.image_shape))
        self.in_memory = nbytes <= IN_MEMORY_MAX_BYTES if in_memory is None else bool(in_memory)
        self._file: h5py.File | None = None
        self._pid: int | None = None
        if self.in_memory:
            self.images, self.labels, _ = read_h5(self.path)
        else:
            self.images = None
            with _open_h5(self.path) as f:
                self.labels = _read_rows(f, self.path, "labels", slice(None)).astype(np.int64)

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.info.class_names

    @property
    def num_classes(self) -> int:
        return len(self.info.class_names)

    def set_epoch(self, epoch: int) -> None:
        """Select the flips of epoch ``epoch`` (deterministic given ``seed``)."""
        self.epoch = check_int(epoch, "epoch", low=0)

    def __len__(self) -> int:
        return self.info.n

    def __getstate__(self) -> dict[str, object]:
        state = self.__dict__.copy()
        state["_file"], state["_pid"] = None, None  # a handle never crosses a process boundary
        return state

    def _pixels(self, index: int) -> np.ndarray:
        if self.images is not None:
            return self.images[index]
        if self._file is None or self._pid != os.getpid():
            self._file, self._pid = _open_h5(self.path), os.getpid()
        return _read_rows(self._file, self.path, "images", index)

    def _transform(self, u: np.ndarray, indices: Sequence[int]) -> Tensor:
        """uint8 (B, H, W, C) -> float32 (B, C, S, S): scale, pad or resize, flip."""
        x = x_from_uint8(torch.from_numpy(np.ascontiguousarray(u)).permute(0, 3, 1, 2))
        if self.size is not None:
            x = pad_to(x, self.size) if self.fit == "pad" else resize_to(x, self.size)
        if self.flip_p > 0.0:
            flip = torch.tensor([hash_uniform(self.seed, self.epoch, i) < self.flip_p for i in indices])
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x.contiguous()

    def _index(self, index: int) -> int:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index: expected in [-{len(self)}, {len(self)}), got {index}")
        return int(index) % len(self)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        index = self._index(index)
        return self._transform(self._pixels(index)[None], [index])[0], int(self.labels[index])

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Tensor, int]]:
        """Many items at once (the DataLoader calls this for a batch): one gather and one conversion."""
        indices = [self._index(i) for i in indices]
        if self.images is None:
            return [self[i] for i in indices]
        x = self._transform(self.images[indices], indices)
        return list(zip(x.unbind(0), self.labels[indices].tolist()))


# --------------------------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kdiff.data", description="Pack image data into kdiff's HDF5 "
                                     "layout (uint8 images N x H x W x C, int64 labels), or describe a packed file.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="pack SOURCE into an HDF5 file")
    p.add_argument("source", help="an IDX file or folder, a CIFAR .tar.gz or folder, an image folder (class = "
                   "subfolder), a .npz/.npy file, or 'digits' (scikit-learn's bundled digits)")
    p.add_argument("--out", required=True, help="the HDF5 file to write (atomically)")
    p.add_argument("--format", choices=FORMATS, default=None, help="default: guessed from SOURCE")
    p.add_argument("--split", choices=SPLITS, default="train",
                   help="which split to read (IDX, CIFAR, digits) and to record in the file")
    p.add_argument("--class-names", default=None, help="comma-separated names replacing the ones found")
    i = sub.add_parser("info", help="describe a packed HDF5 file")
    i.add_argument("file")
    args = parser.parse_args(argv)
    try:
        if args.command == "pack":
            names = args.class_names.split(",") if args.class_names is not None else None
            out = pack(args.source, args.out, format=args.format, split=args.split, class_names=names,
                       progress=True)
        else:
            out = args.file
        info = read_info(out)
    except (FileNotFoundError, ValueError, TypeError, ImportError) as e:
        parser.error(str(e))
    print(f"{info.path}: {info.n} images {info.image_shape[0]}x{info.image_shape[1]}x{info.image_shape[2]}, "
          f"split {info.split!r}, {len(info.class_names)} classes {list(info.class_names)}, source {info.source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
