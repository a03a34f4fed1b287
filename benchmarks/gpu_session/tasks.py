"""The session's own work, run inside child processes by :mod:`benchmarks.gpu_session.worker`.

Each task takes JSON-able keyword arguments and returns a JSON-able dict; an optional ``"md"`` entry is the markdown
shown in the record. Only kdiff's public API is used here; recipes and benchmarks are driven through their CLIs.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import statistics
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .record import latest_checkpoint

TRAIN_REFERENCE_N = 10_000  # training images kept for the real-data FID (train vs test at 10k)


def _versions() -> dict[str, str]:
    import platform

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "numba", "numpy", "PIL"):
        try:
            out[name] = __import__(name).__version__
        except Exception as e:  # a missing optional package is data
            out[name] = f"unavailable ({type(e).__name__})"
    return out


def _nvidia_smi() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                               "--format=csv,noheader"], capture_output=True, text=True, timeout=15).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"unavailable ({type(e).__name__})"


def _time_cuda(fn, reps: int) -> float:
    """Median seconds of ``fn()`` between CUDA events, after two warm-up calls."""
    fn()
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def _time_host(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def environment(*, smoke: bool) -> dict[str, Any]:
    """Device, driver, versions; copy bandwidth (bytes read + written) and bf16 matmul throughput, measured."""
    cuda = torch.cuda.is_available()
    out: dict[str, Any] = {"versions": _versions(), "cpu_count": os.cpu_count(), "cuda": cuda}
    if cuda:
        props = torch.cuda.get_device_properties(0)
        out.update(device=torch.cuda.get_device_name(0), capability=f"{props.major}.{props.minor}",
                   memory_gib=round(props.total_memory / 2**30, 1), sms=props.multi_processor_count,
                   cuda_runtime=torch.version.cuda, nvidia_smi=_nvidia_smi())
        device, timer = torch.device("cuda"), _time_cuda
    else:
        out["device"] = "CPU"
        device, timer = torch.device("cpu"), _time_host
    n = 2**28 if cuda and not smoke else 2**22  # 1 GiB of float32 on a GPU
    buffers = [torch.ones(n, device=device), torch.empty(n, device=device)]
    seconds = timer(lambda: buffers[1].copy_(buffers[0]), 20)
    out["copy_gb_s"] = 2 * n * 4 / seconds / 1e9
    buffers.clear()
    m = 8192 if cuda and not smoke else 256
    a = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    b = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    seconds = timer(lambda: a @ b, 20)
    out["matmul_bf16_tflop_s"] = 2 * m**3 / seconds / 1e12
    out["matmul_size"] = m
    rows = [("device", out["device"]), ("nvidia-smi", out.get("nvidia_smi", "-")),
            ("versions", ", ".join(f"{k} {v}" for k, v in out["versions"].items())),
            ("CPU cores", str(out["cpu_count"])),
            ("copy bandwidth (read + write)", f"{out['copy_gb_s']:.1f} GB/s ({n * 4 / 2**20:.0f} MiB copied)"),
            (f"bf16 matmul {m}^3", f"{out['matmul_bf16_tflop_s']:.1f} TFLOP/s")]
    out["md"] = "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    return out


# --------------------------------------------------------------------------------------------- data


def _write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file (gzip): 0 0 0x08 ndim, big-endian int32 dims, uint8 values."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def toy_idx(folder: str) -> dict[str, Any]:
    """An IDX folder laid out like Fashion-MNIST's, made of the bundled digits (8x8 padded to 12x12): smoke data."""
    from kdiff import data

    folder_path = Path(folder)
    folder_path.mkdir(parents=True, exist_ok=True)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = data.digits_arrays(split=split)
        padded = np.pad(images[..., 0], ((0, 0), (2, 2), (2, 2)))  # (N, 12, 12)
        _write_idx(folder_path / f"{prefix}-images-idx3-ubyte.gz", padded)
        _write_idx(folder_path / f"{prefix}-labels-idx1-ubyte.gz", labels.astype(np.uint8))
    return {"folder": str(folder_path)}


def pack_data(*, source: str | None, work: str) -> dict[str, Any]:
    """Fashion-MNIST IDX files -> kdiff HDF5 train and test splits, plus the first 10k training images (for the
    real-data FID), all under ``work/data``. ``source`` None: the toy IDX folder of :func:`toy_idx` (smoke runs)."""
    from kdiff import data

    out = Path(work) / "data"
    out.mkdir(parents=True, exist_ok=True)
    if source is None:
        source = toy_idx(str(out / "toy-idx"))["folder"]
    paths = {}
    for split in ("train", "test"):
        packed = data.pack_idx(source, split=split, class_names=data.FASHION_MNIST_CLASSES)
        paths[split] = str(data.write_packed(out / f"fashion-{split}.h5", packed, split=split))
    images, labels, _ = data.read_h5(paths["train"])
    paths["train_10k"] = str(data.write_h5(out / "fashion-train-10k.h5", images[:TRAIN_REFERENCE_N],
                                           labels[:TRAIN_REFERENCE_N], split="train",
                                           source=f"the first {TRAIN_REFERENCE_N} of {paths['train']}"))
    info = {k: data.read_info(p) for k, p in paths.items()}
    md = "\n".join(f"- `{p}`: {info[k].n:,} images {info[k].image_shape}" for k, p in paths.items())
    return {"paths": paths, "counts": {k: i.n for k, i in info.items()}, "md": md}


# --------------------------------------------------------------------------------------------- the trained model


def _scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """TensorBoard scalars (step, value) by tag, from every event file under ``tb_dir``."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return {}
    out: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(tb_dir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def export_ema(*, run_dir: str, out: str, max_mib: float = 16.0) -> dict[str, Any]:
    """The newest checkpoint's EMA weights in float16 (with its config and any other small records) -> ``out``,
    which ``python -m recipes.sample`` can read; plus the training curve read from TensorBoard."""
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"run_dir: no ckpt-*.pt in {run_dir!r}: training saved nothing")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    def half(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.half() if v.is_floating_point() else v for k, v in weights.items()}

    big = {"model", "optimizer", "sampler", "generator", "rng"}  # training state, not needed to sample
    small = {k: v for k, v in state.items() if k not in big}
    small["ema"] = half(state["ema"])
    if state.get("extra_models"):  # a recipe's further models: their EMA (or weights) only, in float16 too
        small["extra_models"] = {name: {"ema": half(m["ema"]) if m.get("ema") is not None else None,
                                        "model": half(m["model"]) if m.get("ema") is None else None}
                                 for name, m in state["extra_models"].items()}
    out_path = Path(out)
    torch.save(small, out_path)
    mib = out_path.stat().st_size / 2**20
    params = sum(v.numel() for v in state["ema"].values() if v.is_floating_point())
    result: dict[str, Any] = {"checkpoint": str(ckpt), "step": int(state.get("step", -1)), "ema_file": str(out_path),
                              "ema_mib": round(mib, 2), "ema_values": params}
    scalars = _scalars(Path(run_dir) / "tb")
    curve = scalars.get("train/loss", [])
    rate = [v for _, v in scalars.get("train/images_per_s", [])]
    if curve:
        result["loss_curve"] = curve[-50:]
        result["final_loss"] = curve[-1][1]
    if rate:
        result["images_per_s_median"] = statistics.median(rate[1:] if len(rate) > 1 else rate)
        result["images_per_s_last"] = rate[-1]
    grids = sorted((Path(run_dir) / "samples").glob("*.png"))
    if grids:
        shutil.copy(grids[-1], out_path.with_name("edm-training-grid.png"))
    lines = [f"- checkpoint `{ckpt.name}`: step {result['step']:,}",
             f"- EMA weights in float16: `{out_path.name}`, {mib:.1f} MiB ({params:,} values)"]
    if "final_loss" in result:
        lines.append(f"- last logged training loss {result['final_loss']:.4f}")
    if rate:
        lines.append(f"- training throughput (TensorBoard `train/images_per_s`): median "
                     f"{result['images_per_s_median']:,.0f} img/s, last {result['images_per_s_last']:,.0f} img/s")
    if mib > max_mib:
        raise ValueError(f"out: expected at most {max_mib} MiB of EMA weights, got {mib:.1f} MiB")
    result["md"] = "\n".join(lines)
    return result


# --------------------------------------------------------------------------------------------- FID


def _state(work: str) -> dict[str, Any]:
    path = Path(work) / "state.json"
    if not path.is_file():
        raise FileNotFoundError(f"work: no {path} (run --stage train first, in this checkout)")
    return json.loads(path.read_text())


def _net(inception: str | None):
    from kdiff import metrics

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return metrics.load_inception(inception, device=device)


def _centre_crop(images: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Undo the recipe's centred padding: (N, S, S, C) -> (N, h, w, C), as ``kdiff.data.pad_to`` placed them."""
    h, w = shape
    s_h, s_w = images.shape[1:3]
    if (s_h, s_w) == (h, w):
        return images
    top, left = (s_h - h) // 2, (s_w - w) // 2
    return np.ascontiguousarray(images[:, top:top + h, left:left + w])


def inception(*, inception: str | None) -> dict[str, Any]:
    """Load the network (any stored float dtype, run in float32) and check its features on two blank images."""
    from kdiff import metrics

    path = metrics.inception_path(inception)
    t0 = time.perf_counter()
    raw = torch.jit.load(str(path), map_location="cpu")
    stored = sorted({str(p.dtype).removeprefix("torch.") for p in raw.parameters()})
    net = _net(inception)
    seconds = time.perf_counter() - t0
    f = metrics.inception_features(np.zeros((2, 28, 28), np.uint8), net=net, workers=1)
    if f.shape != (2, 2048) or not np.isfinite(f).all():
        raise ValueError(f"features: expected finite (2, 2048), got {f.shape} finite={np.isfinite(f).all()}")
    label = " (Inception weights stored in fp16)" if "float16" in stored else ""
    md = (f"- `{path}`: {path.stat().st_size / 2**20:.1f} MiB, parameters stored as {', '.join(stored)}{label}, "
          f"run in float32 on {'cuda' if torch.cuda.is_available() else 'cpu'}; loaded in {seconds:.1f} s")
    return {"path": str(path), "stored_dtypes": stored, "load_seconds": seconds, "md": md}


def _features_of(h5: str, *, net, limit: int | None, crop_to: tuple[int, int] | None, batch_size: int
                 ) -> tuple[np.ndarray, float]:
    from kdiff import data, metrics

    images, _, _ = data.read_h5(h5)
    images = images[:limit] if limit else images
    if crop_to is not None:
        images = _centre_crop(images, crop_to)
    t0 = time.perf_counter()
    feats = metrics.inception_features(images, net=net, batch_size=batch_size)
    return feats, time.perf_counter() - t0


def fid_reference(*, work: str, inception: str | None, batch_size: int, limit: int | None) -> dict[str, Any]:
    """Statistics of the test split's Inception features, computed here with the network in use."""
    from kdiff import metrics

    state = _state(work)
    feats, seconds = _features_of(state["data"]["test"], net=_net(inception), limit=limit, crop_to=None,
                                  batch_size=batch_size)
    mu, sigma = metrics.feature_stats(feats)
    out = Path(work) / "fid"
    out.mkdir(exist_ok=True)
    np.savez(out / "reference-test.npz", mu=mu, sigma=sigma, n=len(feats))
    md = f"- {len(feats):,} test images: resize + features in {seconds:.1f} s ({len(feats) / seconds:,.0f} img/s)"
    return {"n": len(feats), "seconds": seconds, "images_per_s": len(feats) / seconds, "md": md}


def _reference(work: str) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    from kdiff import data

    with np.load(Path(work) / "fid" / "reference-test.npz") as z:
        mu, sigma = z["mu"], z["sigma"]
    shape = data.read_info(_state(work)["data"]["test"]).image_shape[:2]
    return mu, sigma, (int(shape[0]), int(shape[1]))


def fid_samples(*, work: str, inception: str | None, batch_size: int, part: int, limit: int | None
                ) -> dict[str, Any]:
    """FID of the samples against the test statistics. ``part`` 0: the first sample file (seeds 0..9,999), whose
    features are kept; ``part`` 1: those features plus the second file's (all 50,000)."""
    from kdiff import metrics

    state = _state(work)
    mu_r, sigma_r, shape = _reference(work)
    files = state.get("samples", [])
    if len(files) <= part:
        raise FileNotFoundError(f"samples: stage 1 wrote {len(files)} sample files, part {part} needs {part + 1}")
    net = _net(inception)
    feats, seconds = _features_of(files[part], net=net, limit=limit, crop_to=shape, batch_size=batch_size)
    kept = Path(work) / "fid" / "samples-part0.npy"
    new = len(feats)
    np.save(Path(work) / "fid" / f"samples-part{part}.npy", feats.astype(np.float32))  # float32 halves the file
    if part != 0:
        feats = np.concatenate([np.load(kept).astype(np.float64), feats])
    t0 = time.perf_counter()
    fid = metrics.frechet_distance(*metrics.feature_stats(feats), mu_r, sigma_r)
    stats_seconds = time.perf_counter() - t0
    n = len(feats)
    md = (f"- **FID {fid:.3f}** at {n:,} samples vs the test statistics (samples centre-cropped to {shape[0]}x"
          f"{shape[1]}: the recipe pads the training images); features of {new:,} new samples in {seconds:.1f} s "
          f"({new / seconds:,.0f} img/s), statistics + distance {stats_seconds:.1f} s")
    return {"fid": fid, "n": n, "seconds": seconds, "md": md}


def fid_precision(*, work: str, inception: str | None, batch_size: int, limit: int | None) -> dict[str, Any]:
    """bf16 against float32 sampling of the same seeds: FID of each at 10k, and the FID difference between two
    disjoint 10k seed sets in bf16 (seeds 0.. and the first of the second file), the noise the first is judged by.
    Also the mean absolute uint8 difference between the paired images."""
    from kdiff import data, metrics

    state = _state(work)
    mu_r, sigma_r, shape = _reference(work)
    fid_dir = Path(work) / "fid"
    bf16_file, fp32_file = (state.get("samples") or [None])[0], state.get("samples_fp32")
    if bf16_file is None or fp32_file is None or not (fid_dir / "samples-part0.npy").is_file():
        raise FileNotFoundError("samples: the precision check needs stage 1's bf16 and float32 files of the first "
                                "seeds and the fid-10k step's features")
    bf16 = np.load(fid_dir / "samples-part0.npy").astype(np.float64)
    net = _net(inception)
    fp32, seconds = _features_of(fp32_file, net=net, limit=limit or len(bf16), crop_to=shape, batch_size=batch_size)
    n = min(len(bf16), len(fp32))
    fid = {name: metrics.frechet_distance(*metrics.feature_stats(f[:n]), mu_r, sigma_r)
           for name, f in (("bf16", bf16), ("fp32", fp32))}
    other = None
    if (fid_dir / "samples-part1.npy").is_file():
        part1 = np.load(fid_dir / "samples-part1.npy").astype(np.float64)
        if len(part1) >= n:
            other = metrics.frechet_distance(*metrics.feature_stats(part1[:n]), mu_r, sigma_r)
    pixels_bf16 = data.read_h5(bf16_file)[0][:n].astype(np.int16)
    pixels_fp32 = data.read_h5(fp32_file)[0][:n].astype(np.int16)
    pixel_diff = float(np.abs(pixels_bf16 - pixels_fp32).mean())
    precision_gap = abs(fid["bf16"] - fid["fp32"])
    seed_gap = None if other is None else abs(fid["bf16"] - other)
    verdict = ("no seed-noise figure (fid-50k did not run)" if seed_gap is None else
               f"bf16 {'within' if precision_gap <= seed_gap else 'BEYOND'} the seed noise")
    md = (f"- same {n:,} seeds: FID bf16 {fid['bf16']:.3f}, float32 {fid['fp32']:.3f} (|difference| "
          f"{precision_gap:.3f}); a disjoint {n:,}-seed bf16 set: "
          f"{'n/a' if other is None else f'{other:.3f}'} (|difference| "
          f"{'n/a' if seed_gap is None else f'{seed_gap:.3f}'}): {verdict}; mean |uint8 difference| of the paired "
          f"images {pixel_diff:.2f}; float32 features in {seconds:.1f} s")
    return {"n": n, "fid_bf16": fid["bf16"], "fid_fp32": fid["fp32"], "fid_bf16_other_seeds": other,
            "precision_gap": precision_gap, "seed_gap": seed_gap, "pixel_mean_abs_diff": pixel_diff, "md": md}


def fid_real(*, work: str, inception: str | None, batch_size: int, limit: int | None) -> dict[str, Any]:
    """The FID of real training images against the test statistics: the floor a perfect model reaches at 10k."""
    from kdiff import metrics

    state = _state(work)
    mu_r, sigma_r, _ = _reference(work)
    feats, seconds = _features_of(state["data"]["train_10k"], net=_net(inception), limit=limit, crop_to=None,
                                  batch_size=batch_size)
    fid = metrics.frechet_distance(*metrics.feature_stats(feats), mu_r, sigma_r)
    md = f"- FID {fid:.3f}: {len(feats):,} real training images vs the test statistics (features in {seconds:.1f} s)"
    return {"fid": fid, "n": len(feats), "seconds": seconds, "md": md}


TASKS = {f.__name__: f for f in (environment, toy_idx, pack_data, export_ema, inception, fid_reference, fid_samples,
                                 fid_real, fid_precision)}
