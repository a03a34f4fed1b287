"""The ADM recipe: guided samplers against kdiff's own samplers, the classifier objective and its accuracy table,
bitwise resume of classifier training, config checks and the trade-off plot."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from kdiff.guidance import classifier_guidance, noisy_classifier_log_prob
from kdiff.solvers import sample
from recipes import adm
from recipes.checkpoints import load_checkpoint
from recipes.distributed import Rand
from recipes.image import DataInfo

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(autouse=True)
def torch_attention(monkeypatch):
    """The recipe's math is under test here, not the kernels: attention by its torch reference, not through the
    Triton interpreter that the test session selects on a CPU."""
    monkeypatch.setenv("KDIFF_KERNELS", "torch")

TINY = dict(net="unet_tiny", net_channels=8, classifier_net="classifier_tiny", classifier_channels=8,
            timesteps=50, sample_steps=6, batch_size=16, steps=4, log_every=1, checkpoint_every=2,
            warmup_steps=0, progress=False, sweep_samples=0)
INFO = DataInfo((1, 8, 8), 10, 8)


def tiny_config(tmp_path, **kw) -> adm.ADMConfig:
    return adm.ADMConfig(**{"out_dir": str(tmp_path / "run"), **TINY, **kw})


def tiny_networks(config: adm.ADMConfig, info: DataInfo = INFO, seed: int = 0):
    torch.manual_seed(seed)
    model = adm.build_model(config, info).eval()
    classifier = adm.build_classifier(config, info).eval()
    return model, classifier


def start(config: adm.ADMConfig, n: int, seed: int = 0) -> torch.Tensor:
    sigmas = adm.sigmas_for(config)
    noise = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    return noise * adm.start_scale(config, sigmas)


@pytest.mark.parametrize("sampler,solver", [("ancestral", "ddpm"), ("ddim", "ddim")])
def test_unguided_samplers_are_kdiffs_own(tmp_path, sampler, solver):
    """At scale 0 Algorithm 1 is kdiff's ancestral DDPM sampler with the learned variance (the same noise draws)
    and Algorithm 2 is kdiff's DDIM."""
    config = tiny_config(tmp_path)
    model, classifier = tiny_networks(config)
    labels = torch.arange(5)
    denoise = adm.model_denoiser(model, config, labels)
    x, sigmas = start(config, 5), adm.sigmas_for(config)
    alphas_bar, _ = adm.tables(config)
    ours = adm.guided_sample(denoise, classifier, x, sigmas, labels, scale=0.0, sampler=sampler,
                             alphas_bar=alphas_bar, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        theirs = sample(denoise, x, sigmas, solver=solver, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_algorithm_2_equals_classifier_guidance_in_edm_space(tmp_path):
    """Alg. 2 through guided_eps in the VP frame and kdiff's EDM-space classifier_guidance (through the noisy
    classifier adapter) followed by DDIM are the same sampler."""
    config = tiny_config(tmp_path)
    model, classifier = tiny_networks(config, seed=1)
    labels = torch.tensor([3, 1, 4, 1, 5])
    denoise = adm.model_denoiser(model, config, labels)
    x, sigmas = start(config, 5, seed=2), adm.sigmas_for(config)
    alphas_bar, _ = adm.tables(config)
    ours = adm.guided_sample(denoise, classifier, x, sigmas, labels, scale=3.0, sampler="ddim", alphas_bar=alphas_bar)
    log_prob = noisy_classifier_log_prob(classifier, alphas_bar=alphas_bar)
    theirs = sample(classifier_guidance(denoise, log_prob, y=labels, scale=3.0), x, sigmas, solver="ddim")
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    unguided = adm.guided_sample(denoise, classifier, x, sigmas, labels, scale=0.0, sampler="ddim",
                                 alphas_bar=alphas_bar)
    assert (ours - unguided).abs().max() > 1e-3  # the classifier moved the samples


def grad_by_hand(classifier, z: torch.Tensor, t: int, labels: torch.Tensor) -> torch.Tensor:
    z = z.detach().requires_grad_(True)
    logp = torch.log_softmax(classifier(z.float(), torch.full((z.shape[0],), float(t))), 1)
    (grad,) = torch.autograd.grad(logp[torch.arange(z.shape[0]), labels].sum(), z)
    return grad.double()


def test_algorithm_1_by_hand(tmp_path):
    """ADM Alg. 1 on a two-step chain t_a > t_b > clean, written out: ``z_b = mu + s Sigma g + sqrt(Sigma) n`` with
    iDDPM's learned ``Sigma = exp(f log beta + (1 - f) log beta~)``, then the last step ``x_0 + s Sigma_1 g``
    with ``beta_1 = 1 - abar_b`` and ``beta~`` replaced by the chain's second posterior variance (iDDPM)."""
    config = tiny_config(tmp_path)
    model, classifier = tiny_networks(config, seed=4)
    labels, scale = torch.tensor([0, 7, 2]), 2.5
    denoise = adm.model_denoiser(model, config, labels)
    alphas_bar, logsnrs = adm.tables(config)
    ta, tb = 40, 17
    ab_a, ab_b = alphas_bar[ta], alphas_bar[tb]
    sig = lambda ab: torch.sqrt((1 - ab) / ab)  # noqa: E731
    sigmas = torch.stack([sig(ab_a), sig(ab_b), torch.zeros((), dtype=torch.float64)])
    x = start(config, 3, seed=5)
    out = adm.guided_sample(denoise, classifier, x, sigmas, labels, scale=scale, sampler="ancestral",
                            alphas_bar=alphas_bar, generator=torch.Generator().manual_seed(9))

    x = x.double()
    z_a = ab_a.sqrt() * x
    with torch.no_grad():
        x0, frac = (v.double() for v in denoise(x.float(), sigmas[0]))
    beta = 1 - ab_a / ab_b
    beta_tilde = (1 - ab_b) / (1 - ab_a) * beta
    mu = ab_b.sqrt() * beta / (1 - ab_a) * x0 + (1 - ab_b) * (1 - beta).sqrt() / (1 - ab_a) * z_a  # DDPM Eq. 7
    var = torch.exp(frac * beta.log() + (1 - frac) * beta_tilde.log())
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    z_b = mu + scale * var * grad_by_hand(classifier, z_a, ta, labels) + var.sqrt() * noise
    with torch.no_grad():
        x0_b, frac_b = (v.double() for v in denoise((z_b / ab_b.sqrt()).float(), sigmas[1]))
    var_1 = torch.exp(frac_b * torch.log(1 - ab_b) + (1 - frac_b) * beta_tilde.log())
    expected = x0_b + scale * var_1 * grad_by_hand(classifier, z_b, tb, labels)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)


def test_classifier_loss_is_cross_entropy_on_the_noised_batch(tmp_path):
    config = tiny_config(tmp_path)
    _, classifier = tiny_networks(config)
    x, labels = torch.rand(6, 1, 8, 8) * 2 - 1, torch.tensor([0, 1, 2, 3, 4, 9])
    loss, position = adm.classifier_loss_fn(config)(classifier, (x, labels), Rand(torch.Generator().manual_seed(1)))
    rand = Rand(torch.Generator().manual_seed(1))
    t = (rand.rand(6).double() * config.timesteps).floor().long()
    eps = rand.randn_like(x)
    _, logsnrs = adm.tables(config)
    z = torch.sigmoid(logsnrs[t]).sqrt()[:, None, None, None] * x + torch.sigmoid(-logsnrs[t]).sqrt()[
        :, None, None, None] * eps
    expected = F.cross_entropy(classifier(z.float(), t.float()), labels, reduction="none")
    torch.testing.assert_close(loss, expected.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(position, (t + 0.5) / config.timesteps)


def test_accuracy_by_noise_buckets_cover_the_chain():
    class Constant(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, z, t):  # always class 3
            return F.one_hot(torch.full((z.shape[0],), 3), 10).float() + 0 * self.w

    labels = torch.arange(40) % 10
    rows = adm.accuracy_by_noise(Constant(), torch.zeros(40, 1, 8, 8), labels, torch.linspace(5, -5, 30),
                                 buckets=4, batch_size=7)
    assert [(lo, hi) for lo, hi, _ in rows] == [(0, 7), (8, 14), (15, 21), (22, 29)]
    assert all(acc == 0.1 for _, _, acc in rows)


@pytest.mark.filterwarnings("ignore:resume. config fields differ")  # out_dir differs on purpose
def test_classifier_training_resumes_bitwise(tmp_path):
    """Four steps straight equal a run resumed from the straight run's step-2 checkpoint (as after a kill): the
    classifier's weights and optimizer state (and the model's) bit for bit."""
    adm.RECIPE.run(tiny_config(tmp_path, out_dir=str(tmp_path / "a")))
    adm.RECIPE.run(tiny_config(tmp_path, out_dir=str(tmp_path / "b")), resume=tmp_path / "a" / "ckpt-00000002.pt")
    a, b = load_checkpoint(tmp_path / "a" / "ckpt-00000004.pt"), load_checkpoint(tmp_path / "b" / "ckpt-00000004.pt")
    ca, cb = a["extra_models"]["classifier"], b["extra_models"]["classifier"]
    assert ca["model"].keys() == cb["model"].keys()
    for key in ca["model"]:
        assert torch.equal(ca["model"][key], cb["model"][key]), key
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    sa, sb = ca["optimizer"]["state"], cb["optimizer"]["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    before = load_checkpoint(tmp_path / "a" / "ckpt-00000002.pt")["extra_models"]["classifier"]["model"]
    assert any(not torch.equal(before[k], cb["model"][k]) for k in before)  # it trained after the resume


@pytest.mark.slow
def test_sweep_command_on_a_finished_run(tmp_path):
    """``python -m recipes.adm sweep RUN`` as a user runs it (the module is then __main__, not recipes.adm)."""
    adm.RECIPE.run(tiny_config(tmp_path, steps=2))
    out = subprocess.run([sys.executable, "-m", "recipes.adm", "sweep", str(tmp_path / "run"), "--sweep-scales",
                          "0,2", "--sweep-samples", "3", "--sample-steps", "2", "--sampler", "ddim"],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "KDIFF_KERNELS": "torch"})
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "run" / "guidance-ddim.json").read_text())
    assert [r["scale"] for r in result["sweep"]] == [0.0, 2.0] and len(result["classifier_accuracy"]) == 10
    assert (tmp_path / "run" / "sweep-ddim-scale2.png").is_file()
    assert "classifier guidance (ddim, 2 steps, 3 samples per scale)" in out.stdout


def test_config_checks(tmp_path):
    with pytest.raises(ValueError, match="guidance: classifier-free guidance is not ADM's"):
        tiny_config(tmp_path, guidance=2.0)
    with pytest.raises(ValueError, match="classifier_net: expected one of adm_classifier_imagenet64, .*'unet_tiny'"):
        tiny_config(tmp_path, classifier_net="unet_tiny")
    with pytest.raises(ValueError, match="sample_steps: expected at most timesteps=50, got 60"):
        tiny_config(tmp_path, sample_steps=60)
    with pytest.raises(ValueError, match="sweep_scales: expected a finite float"):
        tiny_config(tmp_path, sweep_scales=(0.0, math.inf))
    with pytest.raises(ValueError, match="sweep_scales: expected finite scales >= 0"):
        tiny_config(tmp_path, sweep_scales=(0.0, -1.0))
    with pytest.raises(TypeError, match="solver"):
        tiny_config(tmp_path, solver="heun")
    assert dataclasses.replace(tiny_config(tmp_path), conditional=False).conditional is False


@pytest.mark.parametrize("preset", sorted(adm.PRESETS))
def test_every_preset_builds_its_networks(preset):
    config = adm.PRESETS[preset]
    size, channels = config.image_size, 1 if config.image_size <= 32 else 3
    info = DataInfo((channels, size, size), None if not config.conditional else 10, size)
    if not config.conditional:
        config = dataclasses.replace(config, data="digits")  # the classifier's classes come from labelled data
    with torch.device("meta"):
        model, classifier = adm.build_model(config, info), adm.build_classifier(config, info)
    assert model.cfg.learn_variance and classifier.cfg.num_classes == 10


def test_sampler_name_checked(tmp_path):
    config = tiny_config(tmp_path)
    model, classifier = tiny_networks(config)
    with pytest.raises(ValueError, match="sampler: expected one of ancestral, ddim, got 'heun'"):
        adm.guided_sample(adm.model_denoiser(model, config, None), classifier, start(config, 2),
                          adm.sigmas_for(config), None, scale=1.0, sampler="heun", alphas_bar=adm.tables(config)[0])


def test_unconditional_model_is_guided_by_the_classifier(tmp_path):
    config = tiny_config(tmp_path, conditional=False)
    info = DataInfo((1, 8, 8), None, 8)
    model, classifier = tiny_networks(config, info)
    assert model.cfg.num_classes is None and classifier.cfg.num_classes == 10
    labels = torch.tensor([1, 2])
    x, sigmas, alphas_bar = start(config, 2), adm.sigmas_for(config), adm.tables(config)[0]
    runs = [adm.guided_sample(adm.model_denoiser(model, config, labels), classifier, x, sigmas, labels, scale=s,
                              sampler="ancestral", alphas_bar=alphas_bar, generator=torch.Generator().manual_seed(0))
            for s in (0.0, 5.0)]
    assert (runs[0] - runs[1]).abs().max() > 1e-3


def test_plots_from_a_finished_evaluation(tmp_path):
    rows = [{"scale": s, "digits_fd": 1.0 / (1 + s), "digits_accuracy": 0.5 + s / 20} for s in (0, 1, 4)]
    acc = [{"t_first": 0, "t_last": 9, "accuracy": 0.9}, {"t_first": 10, "t_last": 19, "accuracy": 0.2}]
    run = {"sweep": rows, "classifier_accuracy": acc}
    paths = adm.plot_guidance({"a": run, "b": {**run, "sweep": rows[::-1]}}, tmp_path / "adm")
    assert [p.name for p in paths] == ["adm-fidelity.png", "adm-quality.png", "adm-classifier.png"]
    for path in paths:
        with Image.open(path) as img:
            assert img.mode == "RGB" and len(img.getcolors(maxcolors=1 << 16)) > 3
