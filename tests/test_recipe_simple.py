"""The simple-diffusion recipe: its loss against closed forms, a training step through the multiscale kernels
against the torch reference, and the run end to end on a tiny preset (train, resume bitwise, sample)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from kdiff import data, losses, nets
from kdiff.kernels import multiscale_mse_ref
from recipes import sample as sample_cli
from recipes import simple
from recipes.checkpoints import load_checkpoint
from recipes.distributed import Rand
from recipes.image import DataInfo

INFO = DataInfo((1, 32, 32), None, 32)  # the digits as the digits32 model sees them

pytestmark = pytest.mark.usefixtures("single_thread")


def tiny(tmp_path, **kw) -> simple.SimpleConfig:
    base = dict(out_dir=str(tmp_path / "run"), steps=4, batch_size=8, lr=1e-3, log_every=2, checkpoint_every=2,
                sample_steps=3, grid_samples=4, eval_samples=0, progress=False)
    return dataclasses.replace(simple.PRESETS["digits32"], **{**base, **kw})


@pytest.fixture(autouse=True)
def _data_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the digits are packed under ./data on first use


# ----------------------------------------------------------------------------------------------
# The loss against closed forms


@pytest.mark.parametrize("loss", ["eps", "v", "min_snr"])
@pytest.mark.parametrize("schedule", ["cosine", "shifted", "interpolated"])
def test_loss_is_the_weighted_v_error_at_uniform_times(tmp_path, loss, schedule):
    """Redo the draw by hand in float64: ``t ~ U[0, 1)``, logsnr from the closed-form cosine in tangent form
    plus the shift, ``z = alpha x + sigma eps``; the eps-loss is ``alpha^2 |v_hat - v|^2``, the v-loss
    ``|v_hat - v|^2``, min-SNR ``min(SNR, 5) / (1 + SNR) |v_hat - v|^2``, each averaged over pixels."""
    config = tiny(tmp_path, loss=loss, schedule=schedule, noise_size=8, noise_size_low=8)
    x8 = torch.rand(8, 1, 8, 8) * 2 - 1
    seen = {}

    def net(z, logsnr, y):
        seen["z"], seen["logsnr"] = z, logsnr
        return torch.tanh(z) * 0.5

    g = torch.Generator().manual_seed(0)
    per_sample, position = simple.make_loss_fn(config, INFO)(net, (x8, torch.zeros(8, dtype=torch.long)), Rand(g))
    g = torch.Generator().manual_seed(0)
    t = torch.rand(8, generator=g).double()
    eps = torch.randn(8, 1, 32, 32, generator=g).double()
    u = math.atan(math.exp(-7.5)) + t * (math.atan(math.exp(7.5)) - math.atan(math.exp(-7.5)))
    shift = {"cosine": 0.0, "shifted": 2 * math.log(8 / 32), "interpolated": 0.0}[schedule]
    logsnr = -2 * torch.log(torch.tan(u)) + shift
    if schedule == "interpolated":
        logsnr = logsnr + t * 2 * math.log(8 / 32)
    x = x8.double().repeat_interleave(4, -2).repeat_interleave(4, -1)
    alpha, sigma = torch.sigmoid(logsnr).sqrt().view(-1, 1, 1, 1), torch.sigmoid(-logsnr).sqrt().view(-1, 1, 1, 1)
    z = alpha * x + sigma * eps
    v_err = ((torch.tanh(z) * 0.5 - (alpha * eps - sigma * x)) ** 2).mean(dim=(1, 2, 3))
    snr = torch.exp(logsnr)
    weight = {"eps": alpha.flatten() ** 2, "v": torch.ones_like(snr), "min_snr": torch.clamp(snr, max=5) / (1 + snr)}
    torch.testing.assert_close(per_sample.double(), weight[loss] * v_err, rtol=2e-4, atol=1e-6)
    torch.testing.assert_close(position.double(), t, rtol=0, atol=0)
    torch.testing.assert_close(seen["logsnr"].double(), logsnr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seen["z"].double(), z, rtol=1e-4, atol=1e-5)


def test_the_multiscale_eps_loss_is_the_papers_sum_over_levels(tmp_path):
    """``sum_s (1/s) (1/s^2) |avgpool_s(eps_hat - eps)|^2`` over s = 32, 16, 8 (base 8), eps_hat = sigma z + alpha v."""
    config = tiny(tmp_path, multiscale=True, multiscale_base=8)
    g = torch.Generator().manual_seed(1)
    v_pred, x, eps = (torch.randn(3, 1, 32, 32, generator=g, dtype=torch.float64) for _ in range(3))
    logsnr = torch.tensor([-3.0, 0.0, 4.0], dtype=torch.float64)
    alpha, sigma = torch.sigmoid(logsnr).sqrt().view(-1, 1, 1, 1), torch.sigmoid(-logsnr).sqrt().view(-1, 1, 1, 1)
    z = alpha * x + sigma * eps
    diff = sigma * z + alpha * v_pred - eps
    expected = sum((1 / s) * torch.nn.functional.avg_pool2d(diff, 32 // s).square().sum(dim=(1, 2, 3)) / s**2
                   for s in (32, 16, 8))
    torch.testing.assert_close(simple.simple_loss(v_pred, x, eps, z, logsnr, config), expected, rtol=1e-10, atol=0)


# ----------------------------------------------------------------------------------------------
# A training step through the kernels equals the step through the torch reference


def _step(config: simple.SimpleConfig, net_name: str, kernels: str, *, ref64: bool = False):
    """Per-sample loss and every parameter gradient of one training step of a fresh network."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KDIFF_KERNELS", kernels)
        if ref64:  # the float64 reference of the loss on the same float32 network output
            mp.setattr(losses, "multiscale_mse",
                       lambda p, t, *, base: multiscale_mse_ref(p.double(), t.double(), base=base))
        return _grads(config, net_name)


def _grads(config: simple.SimpleConfig, net_name: str):
    torch.manual_seed(0)
    # attention through SDPA: the multiscale kernel is what is under test (and the interpreter is slow)
    model = nets.build(net_name, image_size=32, in_channels=1, num_classes=None, dropout=0.0, attention="sdpa")
    with torch.no_grad():  # no zero-initialized layer: every parameter gets a gradient
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.rand(6, 1, 8, 8) * 2 - 1
    per_sample, _ = simple.make_loss_fn(config, INFO)(model, (x, torch.zeros(6, dtype=torch.long)),
                                                      Rand(torch.Generator().manual_seed(3)))
    per_sample.float().mean().backward()
    return per_sample.double().detach(), {n: p.grad.double() for n, p in model.named_parameters()}


@pytest.mark.parametrize("net_name", ["unet_digits32", "uvit_digits32"])
@pytest.mark.parametrize("kernel", ["numba", "triton"])
def test_a_training_step_through_the_kernel_matches_the_torch_reference(tmp_path, net_name, kernel):
    """The kernels' own tolerance (STYLE.md): ``err(kernel, ref64) <= 2 err(ref32, ref64) + atol`` for the loss
    and every gradient, where ref64 is the float64 torch reference on the same network output. Triton runs
    in the interpreter on CPU (tests/conftest.py)."""
    config = tiny(tmp_path, multiscale=True, multiscale_base=8, dropout=0.0)
    ref64 = _step(config, net_name, "torch", ref64=True)
    ref32 = _step(config, net_name, "torch")
    got = _step(config, net_name, kernel)
    for name in ["loss", *ref64[1]]:
        r64, r32, k = ((v[0] if name == "loss" else v[1][name]) for v in (ref64, ref32, got))
        scale = r64.abs().max().item()
        err_ref, err_k = (r32 - r64).abs().max().item(), (k - r64).abs().max().item()
        assert err_k <= 2 * err_ref + 1e-6 * scale + 1e-12, (name, err_k, err_ref, scale)
    assert any(v.abs().max() > 0 for v in got[1].values())


@pytest.mark.parametrize("name", sorted(simple.PRESETS))
def test_every_preset_builds_its_network_and_sampling_grid(name):
    config = simple.PRESETS[name]
    channels, classes = (3, 1000) if "imagenet" in name else (1, 10)
    info = DataInfo((channels, config.resolution, config.resolution), classes if config.conditional else None)
    with torch.device("meta"):
        model = simple.build_model(config, info)
    assert model.cfg.image_size == config.resolution
    sigmas = simple.sigmas_for(config)
    assert sigmas.shape == (config.sample_steps + 1,) and sigmas[-1] == 0


# ----------------------------------------------------------------------------------------------
# End to end


def test_train_resume_bitwise_sample_and_score(tmp_path, monkeypatch):
    """A tiny digits32 run (the U-ViT, multiscale eps-loss through the numba kernel): it trains, scores the samples
    reduced to 8x8 with the digits Frechet distance, resumes bitwise (model, EMA and optimizer equal to the
    uninterrupted run's at step 4), and its checkpoint samples through ``python -m recipes.sample``."""
    monkeypatch.setenv("KDIFF_KERNELS", "numba")  # the CPU kernel; attention has none and takes the reference
    config = tiny(tmp_path, net="uvit_digits32", multiscale=True, multiscale_base=8, eval_samples=16)
    scores = simple.run(config)
    assert "digits_fd" in scores and scores["digits_fd"] > scores["digits_fd_real_train"] > 0
    run = tmp_path / "run"
    images, _, _ = data.read_h5(run / "samples.h5")
    assert images.shape == (16, 32, 32, 1) and (run / "samples.png").is_file()

    final = load_checkpoint(run / "ckpt-00000004.pt")
    more = dataclasses.replace(config, out_dir=str(tmp_path / "run2"), eval_samples=0)
    simple.run(dataclasses.replace(more, steps=2))
    with pytest.warns(UserWarning, match="steps"):
        simple.run(more, resume=tmp_path / "run2" / "ckpt-00000002.pt")
    resumed = load_checkpoint(tmp_path / "run2" / "ckpt-00000004.pt")
    for part in ("model", "ema"):
        for k, v in final[part].items():
            assert torch.equal(v, resumed[part][k]), (part, k)
    for k, v in final["optimizer"]["state"].items():
        for name, tensor in v.items():
            assert torch.equal(tensor, resumed["optimizer"]["state"][k][name]), (k, name)

    assert sample_cli.main([str(run), "--num", "3", "--steps", "4", "--out", str(tmp_path / "s3")]) == 0
    three, _, _ = data.read_h5(tmp_path / "s3" / "samples.h5")
    assert three.shape == (3, 32, 32, 1)


def test_bad_settings_end_as_one_error_line(tmp_path, capsys):
    assert simple.main(["--schedule", "linear", "--out-dir", str(tmp_path / "r")]) == 2
    assert simple.main(["--noise-size-low", "64", "--noise-size-high", "8", "--out-dir", str(tmp_path / "r")]) == 2
    assert simple.main(["--net", "unet_digits32", "--enlarge", "3", "--steps", "1", "--out-dir",
                        str(tmp_path / "r")]) == 2  # 24 pixels: its 4x4 attention level does not exist
    err = capsys.readouterr().err
    assert err.count("error:") == 3 and "Traceback" not in err
