"""Score samples: FID against a chosen split (any image size), and the digit-classifier accuracy for 8x8 digits.

    python -m recipes.evaluate runs/edm-fashion/samples-heun-18/samples.h5 --reference data/fashion-test.h5
    python -m recipes.evaluate runs/edm-digits/samples.h5 --digits

FID uses the standard Inception-v3 features (``pip install -e ".[eval]"``), resized as clean-fid's "clean" mode;
reference statistics are cached next to the reference file.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from kdiff import data, metrics


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m recipes.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("samples", help="a kdiff HDF5 file of uint8 samples (recipes.sample writes one)")
    p.add_argument("--reference", default=None, help="a kdiff HDF5 file of real images (e.g. the test split)")
    p.add_argument("--digits", action="store_true", help="digit-classifier accuracy of class-conditional 8x8 samples")
    p.add_argument("--batch-size", type=int, default=50)
    args = p.parse_args(argv)
    if args.reference is None and not args.digits:
        print("error: --reference or --digits: expected at least one", file=sys.stderr)
        return 2
    result: dict[str, float] = {}
    try:
        if args.digits:
            images, labels, info = data.read_h5(args.samples)
            if not info.class_names and labels.size == 0:
                raise ValueError(f"samples: {args.samples!r} has no labels; --digits needs class-conditional samples")
            result["digits_accuracy"] = metrics.digits_accuracy(images, labels)
        if args.reference is not None:
            result["fid"] = metrics.fid(args.samples, args.reference, batch_size=args.batch_size, progress=True)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
