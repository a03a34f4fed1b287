"""``python -m kdiff.data pack SOURCE --out FILE.h5`` and ``python -m kdiff.data info FILE.h5``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from .layout import FORMATS, SPLITS, read_info
from .packers import pack


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
