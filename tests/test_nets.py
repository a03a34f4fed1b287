"""Networks: DWT, layers against independent oracles, shapes of every option, parameter counts, kernel
paths, learning, bad input.

Oracles: scipy's ``correlate1d`` for the 5/3 filter bank, ``avg_pool2d`` for the Haar low band,
numpy float64 for the sinusoidal features and AdaGN, ``nn.MultiheadAttention`` for the attention
block, published parameter counts for the architectures.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from scipy.ndimage import correlate1d
from torch import nn

from kdiff.nets import (
    CONFIGS,
    AdaGN,
    LabelEmbedding,
    NoisyClassifier,
    SelfAttention2d,
    UNet,
    UNetConfig,
    UViT,
    build,
    count_params,
    downsample_input,
    drop_labels,
    dwt,
    idwt,
    sinusoidal_embedding,
    upsample_output,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny networks run fastest on one thread (and do not fight other processes for the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _reference_attention(monkeypatch):
    """Attention on the torch path unless a test asks for another (the interpreter is slow)."""
    monkeypatch.setenv("KDIFF_KERNELS", "torch")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _net(name: str, seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    return build(name, **overrides)


def _randomize(net: nn.Module, seed: int = 1) -> nn.Module:
    """Overwrite every parameter (zero-initialized ones included) so outputs depend on every layer."""
    g = _gen(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return net


# ----------------------------------------------------------------------------------------------
# DWT

_image_shapes = st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 6), st.integers(1, 6))


@given(shape=_image_shapes, levels=st.integers(1, 2), wavelet=st.sampled_from(["legall53", "haar", "shuffle"]),
       seed=st.integers(0, 2**16))
def test_input_downsampling_round_trip_is_exact(shape, levels, wavelet, seed):
    B, C, h, w = shape
    x = torch.randn(B, C, h * 2**levels, w * 2**levels, generator=_gen(seed), dtype=torch.float64)
    y = downsample_input(x, transform=wavelet, levels=levels)
    assert y.shape == (B, C * 4**levels, h, w)
    torch.testing.assert_close(upsample_output(y, transform=wavelet, levels=levels), x, rtol=0, atol=1e-12)


def _legall53_1d(x: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """The 5/3 analysis filter bank with whole-sample symmetric extension, at even / odd samples."""
    low = correlate1d(x, np.array([-1, 2, 6, 2, -1]) / 8, axis=axis, mode="mirror")
    high = correlate1d(x, np.array([-0.5, 1.0, -0.5]), axis=axis, mode="mirror")
    take = lambda a, start: np.take(a, np.arange(start, a.shape[axis], 2), axis=axis)
    return take(low, 0), take(high, 1)


@given(shape=_image_shapes, seed=st.integers(0, 2**16))
def test_legall53_bands_equal_the_filter_bank(shape, seed):
    B, C, h, w = shape
    x = np.random.default_rng(seed).standard_normal((B, C, 2 * h, 2 * w))
    low_w, high_w = _legall53_1d(x, axis=3)
    (ll, hl), (lh, hh) = _legall53_1d(low_w, axis=2), _legall53_1d(high_w, axis=2)
    # normalization: sqrt(2) per low, 1/sqrt(2) per high filter
    expected = np.concatenate([2 * ll, lh, hl, hh / 2], axis=1)
    np.testing.assert_allclose(dwt(torch.from_numpy(x), wavelet="legall53").numpy(), expected, rtol=0, atol=1e-12)


@given(shape=_image_shapes, seed=st.integers(0, 2**16))
def test_haar_low_band_is_2x2_average(shape, seed):
    B, C, h, w = shape
    x = torch.randn(B, C, 2 * h, 2 * w, generator=_gen(seed), dtype=torch.float64)
    ll = dwt(x, wavelet="haar")[:, :C]
    torch.testing.assert_close(ll, 2 * F.avg_pool2d(x, 2), rtol=0, atol=1e-12)


@pytest.mark.parametrize("wavelet", ["legall53", "haar"])
def test_low_band_of_a_locally_constant_image_is_the_2x2_average(wavelet):
    # a smooth (here constant) image: the 5/3 low band also equals 2x the 2x2 average, the high bands vanish
    x = torch.full((1, 2, 8, 6), 0.7, dtype=torch.float64)
    y = dwt(x, wavelet=wavelet)
    torch.testing.assert_close(y[:, :2], 2 * F.avg_pool2d(x, 2), rtol=0, atol=1e-14)
    assert y[:, 2:].abs().max() < 1e-14


def test_dwt_rejects_odd_sizes_and_unknown_wavelets():
    with pytest.raises(ValueError, match="divisible by 4"):
        dwt(torch.randn(1, 1, 8, 6), levels=2)
    with pytest.raises(ValueError, match="wavelet"):
        dwt(torch.randn(1, 1, 8, 8), wavelet="db4")
    with pytest.raises(ValueError, match="divisible by 4"):
        idwt(torch.randn(1, 6, 4, 4))
    with pytest.raises(TypeError, match="x"):
        dwt(torch.zeros(1, 1, 4, 4, dtype=torch.long))


# ----------------------------------------------------------------------------------------------
# Layers against oracles


@given(c=st.lists(st.floats(-1000, 1000), min_size=1, max_size=5), half=st.integers(1, 16))
def test_sinusoidal_embedding_matches_float64_formula(c, half):
    got = sinusoidal_embedding(torch.tensor(c, dtype=torch.float64), 2 * half)
    freqs = 10000.0 ** (-np.arange(half) / half)
    args = np.asarray(c)[:, None] * freqs[None]
    # float32 arguments: |c f| <= 1000 carries an absolute error of ~1000 * 2^-24
    np.testing.assert_allclose(got.numpy(), np.concatenate([np.cos(args), np.sin(args)], 1), atol=2e-4, rtol=0)


def test_adagn_matches_numpy_group_norm():
    torch.manual_seed(0)
    layer = _randomize(AdaGN(8, 5, groups=4)).double()
    h = torch.randn(3, 8, 4, 5, dtype=torch.float64)
    emb = torch.randn(3, 5, dtype=torch.float64)
    hn = h.numpy().reshape(3, 4, 2 * 4 * 5)
    normed = ((hn - hn.mean(-1, keepdims=True)) / np.sqrt(hn.var(-1, keepdims=True) + 1e-5)).reshape(3, 8, 4, 5)
    gamma, beta = (p.detach().numpy()[:, None, None] for p in (layer.norm.weight, layer.norm.bias))
    normed = normed * gamma + beta
    silu = emb.numpy() / (1 + np.exp(-emb.numpy()))
    y = silu @ layer.proj.weight.detach().numpy().T + layer.proj.bias.detach().numpy()
    y_s, y_b = y[:, :8, None, None], y[:, 8:, None, None]
    np.testing.assert_allclose(layer(h, emb).detach().numpy(), (1 + y_s) * normed + y_b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("impl", ["kdiff", "sdpa"])
@pytest.mark.parametrize("heads,head_channels", [(1, None), (4, None), (1, 2)])
def test_self_attention_matches_torch_multihead_attention(impl, heads, head_channels):
    torch.manual_seed(0)
    block = _randomize(SelfAttention2d(8, num_heads=heads, head_channels=head_channels, groups=2,
                                       attention=impl)).double()
    mha = nn.MultiheadAttention(8, block.heads, batch_first=True, dtype=torch.float64)
    with torch.no_grad():
        mha.in_proj_weight.copy_(block.qkv.weight)
        mha.in_proj_bias.copy_(block.qkv.bias)
        mha.out_proj.weight.copy_(block.proj.weight)
        mha.out_proj.bias.copy_(block.proj.bias)
    x = torch.randn(2, 8, 3, 5, dtype=torch.float64)
    tokens = F.group_norm(x, 2, block.norm.weight, block.norm.bias).flatten(2).transpose(1, 2)
    expected = x + mha(tokens, tokens, tokens, need_weights=False)[0].transpose(1, 2).reshape(x.shape)
    assert block.heads == (4 if head_channels else heads)
    torch.testing.assert_close(block(x), expected, rtol=1e-10, atol=1e-10)


def test_heads_wider_than_the_kernel_take_the_sdpa_path():
    # ADM-128 has 4 heads of 192 and 256 channels; kdiff.kernels.attention takes D <= 128
    torch.manual_seed(0)
    wide = _randomize(SelfAttention2d(320, num_heads=2, groups=32))
    sdpa = SelfAttention2d(320, num_heads=2, groups=32, attention="sdpa")
    sdpa.load_state_dict(wide.state_dict())
    x = torch.randn(1, 320, 2, 3, generator=_gen(0))
    torch.testing.assert_close(wide(x), sdpa(x))


def test_heads_must_divide_channels():
    with pytest.raises(ValueError, match="head_channels"):
        SelfAttention2d(12, head_channels=5, groups=4)
    with pytest.raises(ValueError, match="num_heads"):
        SelfAttention2d(12, num_heads=5, groups=4)


# ----------------------------------------------------------------------------------------------
# Class labels and their dropout


def test_drop_labels_maps_to_the_reserved_index():
    labels = torch.randint(0, 10, (20000,), generator=_gen(0))
    assert torch.equal(drop_labels(labels, p=0.0, num_classes=10, generator=_gen(1)), labels)
    assert torch.equal(drop_labels(labels, p=1.0, num_classes=10, generator=_gen(1)), torch.full_like(labels, 10))
    dropped = drop_labels(labels, p=0.3, num_classes=10, generator=_gen(1))
    assert torch.equal(dropped, drop_labels(labels, p=0.3, num_classes=10, generator=_gen(1)))  # same seed
    kept = dropped != 10
    assert torch.equal(dropped[kept], labels[kept])
    # Binomial(20000, 0.3): 5 standard deviations
    assert abs((~kept).float().mean().item() - 0.3) < 5 * math.sqrt(0.3 * 0.7 / 20000)


def test_drop_labels_takes_uniforms():
    labels = torch.tensor([0, 3, 5, 9])
    u = torch.tensor([0.1, 0.5, 0.29, 0.3])
    assert torch.equal(drop_labels(labels, u, p=0.3, num_classes=10), torch.tensor([10, 3, 10, 9]))
    with pytest.raises(ValueError, match=r"^u: expected shape \(4,\)"):
        drop_labels(labels, u[:3], p=0.3, num_classes=10)
    with pytest.raises(ValueError, match=r"^generator: expected None"):
        drop_labels(labels, u, p=0.3, num_classes=10, generator=_gen(0))


def test_drop_labels_bad_input():
    with pytest.raises(ValueError, match="p"):
        drop_labels(torch.tensor([1]), p=1.5, num_classes=10)
    with pytest.raises(TypeError, match="labels"):
        drop_labels(torch.tensor([1.0]), p=0.5, num_classes=10)
    with pytest.raises(ValueError, match=r"labels: expected values in \[0, 10\]"):
        drop_labels(torch.tensor([11]), p=0.5, num_classes=10)


def test_no_label_is_its_own_row_and_none_means_no_label():
    table = LabelEmbedding(10, 4)
    none = table(None, 3, torch.device("cpu"))
    torch.testing.assert_close(none, table.table.weight[10].expand(3, 4))
    assert not torch.allclose(table(torch.tensor([9]), 1, torch.device("cpu")), none[:1])


# ----------------------------------------------------------------------------------------------
# Shapes of every option that matters

UNET_OPTIONS = [
    dict(),
    dict(adagn=False, biggan=False),
    dict(adagn=False, biggan=False, conv_resample=False, mid_attention=False),
    dict(learn_variance=True, head_channels=8),
    dict(num_classes=None, embedding="fourier", dropout=0.2),
    dict(input_transform="legall53", learn_variance=True),
    dict(input_transform="haar", image_size=32, input_levels=2, attn_resolutions=(8, 4)),
    dict(input_transform="shuffle", out_channels=1),
    dict(channel_mult=(1, 2, 2), attn_resolutions=(8, 2), num_blocks=2),
]


@pytest.mark.parametrize("options", UNET_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_unet_output_shapes(options):
    net = _net("unet_tiny", **options)
    cfg = net.cfg
    size = cfg.image_size
    x = torch.randn(2, 3, size, size, generator=_gen(0))
    labels = torch.tensor([3, cfg.num_classes]) if cfg.num_classes else None
    out = net(x, torch.tensor([0.1, -2.0]), labels)
    channels = (cfg.out_channels or 3) * (2 if cfg.learn_variance else 1)
    assert out.shape == (2, channels, size, size)
    out.square().mean().backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_unet_takes_any_divisible_size_and_non_square_images():
    net = _net("unet_tiny")
    assert net(torch.randn(1, 3, 12, 6), 0.5).shape == (1, 3, 12, 6)


@pytest.mark.parametrize("options", [dict(), dict(biggan=True, adagn=False), dict(input_transform="legall53",
                                     learn_variance=True), dict(input_transform="shuffle", input_levels=2,
                                     image_size=64, num_classes=None)])
def test_uvit_output_shapes(options):
    net = _net("uvit_tiny", **options)
    cfg = net.cfg
    x = torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=_gen(0))
    out = net(x, torch.tensor([0.1, -2.0]))
    assert out.shape == (2, 3 * (2 if cfg.learn_variance else 1), cfg.image_size, cfg.image_size)
    out.square().mean().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_classifier_output_shape_and_gradient_wrt_input():
    net = _net("classifier_tiny")
    x = torch.randn(3, 3, 8, 8, generator=_gen(0), requires_grad=True)
    logits = net(x, torch.tensor([0.0, 1.0, 2.0]))
    assert logits.shape == (3, 10)
    torch.log_softmax(logits, -1)[:, 0].sum().backward()  # the classifier-guidance gradient
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_scalar_and_batched_noise_cond_agree_and_integer_timesteps_work():
    net = _randomize(_net("unet_tiny", num_classes=None))
    x = torch.randn(2, 3, 8, 8, generator=_gen(0))
    torch.testing.assert_close(net(x, 3.0), net(x, torch.tensor([3.0, 3.0])))
    torch.testing.assert_close(net(x, torch.tensor([3, 7])), net(x, torch.tensor([3.0, 7.0])))


def test_labels_change_the_output_and_none_is_the_no_label_class():
    net = _randomize(_net("unet_tiny"))
    x = torch.randn(2, 3, 8, 8, generator=_gen(0))
    null = net(x, 0.0, torch.tensor([10, 10]))
    torch.testing.assert_close(net(x, 0.0), null)
    assert (net(x, 0.0, torch.tensor([1, 2])) - null).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------
# Parameter counts of the named configurations (built on the meta device)


def _count(name: str) -> int:
    with torch.device("meta"):
        return count_params(build(name))


def test_ddpm_cifar10_has_35_7m_parameters():
    # [DDPM] Ho et al. 2020, App. B: "Our CIFAR10 model has 35.7 million parameters"
    assert abs(_count("ddpm_cifar10") / 35.7e6 - 1) < 0.02


def test_adm_imagenet256_and_its_classifier_match_published_counts():
    # Rombach et al. 2022 (LDM), Table 3: ADM 554M parameters, ADM-G (with its classifier) 608M
    model, classifier = _count("adm_imagenet256"), _count("adm_classifier_imagenet256")
    assert abs(model / 554e6 - 1) < 0.01
    assert abs((model + classifier) / 608e6 - 1) < 0.01


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_named_config_builds(name):
    assert _count(name) > 0


# ----------------------------------------------------------------------------------------------
# Kernel paths, precision, compile, checkpointing


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("name,shape", [("unet_tiny", (2, 3, 8, 8)), ("uvit_tiny", (2, 3, 16, 16)),
                                        ("classifier_tiny", (2, 3, 8, 8))])
def test_reference_and_triton_attention_give_the_same_network(monkeypatch, name, shape):
    net = _randomize(_net(name)).to(_device())
    x = torch.randn(shape, generator=_gen(0)).to(_device())
    c = torch.tensor([0.3, -1.0], device=_device())

    def run(kernels: str):
        monkeypatch.setenv("KDIFF_KERNELS", kernels)
        net.zero_grad()
        out = net(x, c)
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in net.parameters()]

    out_ref, grads_ref = run("torch")
    out_tri, grads_tri = run("triton")
    torch.testing.assert_close(out_tri, out_ref, rtol=1e-4, atol=1e-4)
    for g_tri, g_ref in zip(grads_tri, grads_ref):
        torch.testing.assert_close(g_tri, g_ref, rtol=1e-3, atol=1e-4)


def test_sdpa_option_gives_the_same_network():
    net = _randomize(_net("uvit_tiny"))
    other = _net("uvit_tiny", attention="sdpa")
    other.load_state_dict(net.state_dict())
    x = torch.randn(2, 3, 16, 16, generator=_gen(0))
    torch.testing.assert_close(other(x, 0.5), net(x, 0.5))


@pytest.mark.parametrize("name,size", [("unet_tiny", 8), ("uvit_tiny", 16)])
def test_bf16_autocast_stays_close_to_float32(name, size):
    net = _randomize(_net(name), seed=2)
    x = torch.randn(2, 3, size, size, generator=_gen(0))
    ref = net(x, 0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, 0.5)
    assert out.dtype == torch.bfloat16
    # bf16 keeps 8 mantissa bits: a relative error of a few percent through the whole network
    assert ((out.float() - ref).norm() / ref.norm()).item() < 0.05


def test_activation_checkpointing_changes_nothing():
    net = _randomize(_net("unet_tiny"))
    ckpt = _net("unet_tiny", use_checkpoint=True)
    ckpt.load_state_dict(net.state_dict())
    x = torch.randn(2, 3, 8, 8, generator=_gen(0))
    grads = []
    for model in (net, ckpt):
        model(x, 0.5).square().sum().backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_compiles_without_graph_breaks(monkeypatch):
    monkeypatch.setenv("KDIFF_KERNELS", "auto")
    torch._dynamo.reset()
    net = _randomize(_net("unet_tiny"))
    x = torch.randn(2, 3, 8, 8, generator=_gen(0))
    labels = torch.tensor([1, 10])
    compiled = torch.compile(net, backend="eager", fullgraph=True)  # fullgraph: a graph break raises
    torch.testing.assert_close(compiled(x, torch.tensor([0.5, 1.0]), labels), net(x, torch.tensor([0.5, 1.0]), labels))
    torch._dynamo.reset()


def test_works_with_the_denoiser_wrappers():
    from kdiff.denoisers import edm_denoiser, vp_denoiser

    net = _randomize(_net("unet_tiny", learn_variance=True))
    x = torch.randn(2, 3, 8, 8, generator=_gen(0))
    labels = torch.tensor([1, 2])
    denoised, var = vp_denoiser(lambda z, c: net(z, c, labels), learned_variance=True)(x, torch.tensor([0.5, 2.0]))
    assert denoised.shape == var.shape == x.shape
    edm_net = _net("unet_tiny")
    assert edm_denoiser(lambda z, c: edm_net(z, c, labels))(x, 1.5).shape == x.shape


# ----------------------------------------------------------------------------------------------
# Learning


def _diffuse(x: torch.Tensor, eps: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
    alpha, sigma = torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()
    return alpha[:, None, None, None] * x + sigma[:, None, None, None] * eps


def test_a_tiny_unet_learns_to_denoise_a_tiny_batch():
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    net = build("unet_tiny", in_channels=1, num_classes=None)
    images = torch.from_numpy(load_digits().images[:8]).float()[:, None] / 8 - 1  # [-1, 1]
    # held-out noise: the same 8 images under 64 fixed draws of noise and log-SNR
    eval_x = images.repeat(8, 1, 1, 1)
    eval_eps, eval_logsnr = torch.randn(eval_x.shape, generator=_gen(2)), torch.linspace(-4, 4, 64)
    eval_z = _diffuse(eval_x, eval_eps, eval_logsnr)

    def eval_loss() -> float:
        with torch.no_grad():
            return (net(eval_z, eval_logsnr) - eval_eps).square().mean().item()

    before = eval_loss()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = _gen(1)
    for _ in range(200):
        eps, logsnr = torch.randn(images.shape, generator=g), 8 * torch.rand(8, generator=g) - 4
        loss = (net(_diffuse(images, eps, logsnr), logsnr) - eps).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    # the zero-initialized output starts at E[eps^2] ~ 1. The best linear denoiser of data with this
    # variance scores ~0.4 on this log-SNR range; the network must learn the images to go below 0.25.
    assert before > 0.9
    assert eval_loss() < 0.25 * before


# ----------------------------------------------------------------------------------------------
# Bad input and bad configurations


def test_bad_input_raises_clear_errors():
    net = _net("unet_tiny")
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="x: expected 3 channels, got 1"):
        net(torch.randn(2, 1, 8, 8), 0.5)
    with pytest.raises(ValueError, match="divisible by the network's downsampling factor 2, got 7x8"):
        net(torch.randn(2, 3, 7, 8), 0.5)
    with pytest.raises(ValueError, match="divisible by the network's downsampling factor 4"):
        _net("unet_tiny", input_transform="legall53")(torch.randn(2, 3, 6, 8), 0.5)
    with pytest.raises(ValueError, match="4-D"):
        net(torch.randn(3, 8, 8), 0.5)
    with pytest.raises(ValueError, match=r"labels: expected values in \[0, 10\].*max 11"):
        net(x, 0.5, torch.tensor([0, 11]))
    with pytest.raises(ValueError, match="labels.*min -1"):
        net(x, 0.5, torch.tensor([-1, 0]))
    with pytest.raises(TypeError, match="labels: expected an integer tensor"):
        net(x, 0.5, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"labels: expected shape \(2,\)"):
        net(x, 0.5, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="no class conditioning"):
        _net("unet_tiny", num_classes=None)(x, 0.5, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"noise_cond: expected a scalar or shape \(2,\)"):
        net(x, torch.zeros(3))
    with pytest.raises(TypeError, match="x"):
        net(x.long(), 0.5)
    with pytest.raises(ValueError, match="x: expected 8x8 images"):
        _net("classifier_tiny")(torch.randn(2, 3, 16, 16), 0.5)
    with pytest.raises(ValueError, match="divisible by the network's downsampling factor 4"):
        _net("uvit_tiny")(torch.randn(1, 3, 10, 12), 0.5)


@pytest.mark.parametrize("overrides,match", [
    (dict(image_size=9), "image_size: expected a multiple of the total downsampling factor 2"),
    (dict(attn_resolutions=(16,)), r"attn_resolutions: expected sizes among the levels' \[8, 4\], got \[16\]"),
    (dict(norm_groups=5), "norm_groups"),
    (dict(input_transform="wavelet"), "input_transform"),
    (dict(channel_mult=()), "channel_mult"),
    (dict(dropout=1.0), "dropout"),
    (dict(attention="flash"), "attention"),
])
def test_bad_unet_configs_raise(overrides, match):
    with pytest.raises(ValueError, match=match):
        UNet(replace(CONFIGS["unet_tiny"], **overrides))


def test_bad_uvit_and_classifier_configs_raise():
    with pytest.raises(ValueError, match="conv_dropout"):
        UViT(replace(CONFIGS["uvit_tiny"], conv_dropout=(0.1,)))
    with pytest.raises(ValueError, match="image_size"):
        UViT(replace(CONFIGS["uvit_tiny"], image_size=10))
    with pytest.raises(ValueError, match="num_classes"):
        NoisyClassifier(replace(CONFIGS["classifier_tiny"], num_classes=0))
    with pytest.raises(ValueError, match="name: expected one of"):
        build("resnet50")
    assert isinstance(CONFIGS["unet_tiny"], UNetConfig)
