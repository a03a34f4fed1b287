"""Packers: the formats users have (IDX, CIFAR python batches, image folders, numpy arrays, scikit-learn's
digits) as :class:`~kdiff.data.layout.Packed` sources, and :func:`pack`, which writes one to an HDF5 file."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import tarfile
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from .layout import (
    _WRITE_BATCH,
    DIGITS_TEST_SIZE,
    FASHION_MNIST_CLASSES,
    FORMATS,
    IMAGE_SUFFIXES,
    Packed,
    _check_split,
    packed_arrays,
    write_packed,
)


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


_WIDE_GRAY_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")  # 16-bit greyscale (PNG opens as "I;16" or "I")


def _to_8bit(im: Image.Image, path: Path) -> np.ndarray:
    """A 16-bit greyscale image as uint8 by ``round(v / 257)`` (0..65535 -> 0..255): ``convert("L")`` would clip
    every value above 255 to white, so 64 grey levels would pack as {0, 255}."""
    v = np.asarray(im).astype(np.int64)
    if v.size and (v.min() < 0 or v.max() > 65535):
        raise ValueError(f"{str(path)!r}: expected 16-bit greyscale values in [0, 65535], got range "
                         f"[{v.min()}, {v.max()}]")
    return ((v * 2 + 257) // 514).astype(np.uint8)  # round(v / 257), halves up, in integers


def _load_image(path: Path, channels: int, shape: tuple[int, int, int]) -> np.ndarray:
    try:
        with Image.open(path) as im:
            if channels == 1 and im.mode in _WIDE_GRAY_MODES:
                a = _to_8bit(im, path)
            elif channels == 3 and im.mode in _WIDE_GRAY_MODES:
                a = np.repeat(_to_8bit(im, path)[..., None], 3, axis=-1)
            else:
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
    palettes expanded); 16-bit greyscale is scaled to 8 bits by ``round(v / 257)``. A class subfolder without
    images is an error (dropping it would relabel every later class), and so are ``class_names`` that do not
    name each class folder exactly once.
    """
    source = Path(source)
    if not source.is_dir():
        raise FileNotFoundError(f"source: no such folder {str(source)!r}")
    subfolders = sorted(p for p in source.iterdir() if p.is_dir())
    classes = [p for p in subfolders if _image_files(p)]
    if classes and len(classes) != len(subfolders):
        empty = [p.name for p in subfolders if p not in classes]
        raise ValueError(f"source: class folder(s) {empty} in {str(source)!r} hold no images "
                         f"({', '.join(IMAGE_SUFFIXES)}); labels are positions among the sorted class folders, so "
                         "remove the empty folders or add images")
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
    elif classes and len(class_names) != len(classes):
        raise ValueError(f"class_names: expected {len(classes)} names (one per class folder: "
                         f"{[c.name for c in classes]}), got {len(class_names)}: {list(class_names)}")

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
