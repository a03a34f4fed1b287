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

Modules: :mod:`~kdiff.data.layout` (the file format: writing and reading), :mod:`~kdiff.data.packers`
(sources to :class:`Packed`), :mod:`~kdiff.data.dataset` (pixels to model inputs, :class:`H5Dataset`),
:mod:`~kdiff.data.cli` (the command line). Every public name is importable from ``kdiff.data``.
"""

from .cli import main
from .dataset import H5Dataset, hash_uniform, pad_to, resize_to, uint8_from_x, x_from_uint8
from .layout import (
    DIGITS_TEST_SIZE,
    FASHION_MNIST_CLASSES,
    FORMATS,
    IMAGE_SUFFIXES,
    IN_MEMORY_MAX_BYTES,
    LAYOUT,
    SPLITS,
    H5Info,
    Packed,
    as_images,
    iter_h5,
    packed_arrays,
    read_h5,
    read_info,
    write_h5,
    write_packed,
)
from .packers import (
    digits_arrays,
    guess_format,
    pack,
    pack_cifar,
    pack_digits,
    pack_folder,
    pack_idx,
    pack_npz,
    read_idx,
)

__all__ = [
    "LAYOUT", "SPLITS", "FORMATS", "IMAGE_SUFFIXES", "FASHION_MNIST_CLASSES", "IN_MEMORY_MAX_BYTES",
    "DIGITS_TEST_SIZE", "Packed", "H5Info", "as_images", "packed_arrays", "write_packed", "write_h5", "read_info",
    "read_h5", "iter_h5", "read_idx", "pack_idx", "pack_cifar", "pack_folder", "pack_npz", "digits_arrays",
    "pack_digits", "guess_format", "pack", "x_from_uint8", "uint8_from_x", "pad_to", "resize_to", "hash_uniform",
    "H5Dataset", "main",
]
