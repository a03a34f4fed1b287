"""recipes.ddpm: the objectives, the timestep sampler, the samplers and the bits/dim pieces against kdiff's own
whole-chain bound and DDPM's table formulas; the residual MLP; the x0 clip."""

import math

import pytest
import torch

from kdiff import elbo, nets
from kdiff.denoisers import clip_denoised
from recipes import ddpm

F64 = torch.float64


def _x(B=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (B, 1, 8, 8), generator=g).to(F64) * 2 / 255 - 1


class _Net(torch.nn.Module):
    def __init__(self, out_mult=1, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(64 * out_mult, 64, generator=g, dtype=F64) * 0.1)
        self.out_mult = out_mult

    def forward(self, z, c):
        h = torch.tanh(z.flatten(1).to(F64) @ self.w.T * (1 + c.to(F64)[:, None] / 1000))
        return h.view(z.shape[0], self.out_mult, 8, 8).to(z.dtype)


def test_chain_tables_match_ddpm_and_iddpm():
    abar, logsnrs = ddpm.chain_tables("linear", 1000)
    want = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=F64), 0)
    torch.testing.assert_close(abar, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(logsnrs, torch.log(want / (1 - want)), rtol=1e-10, atol=1e-10)
    abar, _ = ddpm.chain_tables("cosine", 4000)
    f = torch.cos((torch.arange(4001, dtype=F64) / 4000 + 0.008) / 1.008 * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    torch.testing.assert_close(abar, torch.cumprod(1 - betas, 0), rtol=1e-10, atol=1e-14)
    with pytest.raises(ValueError, match="schedule: expected one of"):
        ddpm.chain_tables("sigmoid", 10)


def test_timesteps_from_uniform_inverts_the_cdf():
    u = torch.tensor([0.0, 0.49, 0.5, 0.74, 0.75, 0.999])
    assert ddpm.timesteps_from_uniform(u, 3, torch.tensor([0.5, 0.25, 0.25])).tolist() == [0, 0, 1, 1, 2, 2]
    assert ddpm.timesteps_from_uniform(u, 10).tolist() == [0, 4, 5, 7, 7, 9]
    with pytest.raises(ValueError, match=r"probs: expected shape \(4,\)"):
        ddpm.timesteps_from_uniform(u, 4, torch.ones(3) / 3)


def test_losses_against_the_chain_terms():
    T = 50
    _, logsnrs = ddpm.chain_tables("cosine", T)
    x = _x()
    t = torch.tensor([0, 1, 7, 25, 48, 49])
    noise = torch.randn(T, *x.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    eps = noise[t, torch.arange(6)]
    net = _Net(2)
    chain = elbo.vlb(elbo.vlb_model(net, logsnrs, variance="learned"), x, logsnrs, noise=noise)
    want_term = chain.terms[torch.arange(6), t] / (64 * math.log(2))
    vlb = ddpm.ddpm_loss(net, x, t, eps, logsnrs, objective="vlb", learn_variance=True)
    torch.testing.assert_close(vlb.loss, T * want_term, rtol=1e-9, atol=1e-9)
    simple = ddpm.ddpm_loss(net, x, t, eps, logsnrs, objective="simple", learn_variance=True)
    eps_hat = net(ddpm.diffuse(x, eps, logsnrs[t]), t.float())[:, :1]
    torch.testing.assert_close(simple.loss, (eps - eps_hat).square().flatten(1).mean(1))
    hybrid = ddpm.ddpm_loss(net, x, t, eps, logsnrs, objective="hybrid", learn_variance=True)
    torch.testing.assert_close(hybrid.loss, simple.loss + 0.001 * T * want_term, rtol=1e-9, atol=1e-9)
    assert not hybrid.term.requires_grad and torch.equal(hybrid.term, hybrid.loss.detach())


def test_hybrid_trains_the_mean_by_l_simple_only_and_vlb_trains_both():
    T = 20
    _, logsnrs = ddpm.chain_tables("linear", T)
    x, t = _x(4), torch.tensor([0, 3, 10, 19])
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=F64)

    def grad_of(objective):
        out = torch.zeros(4, 2, 8, 8, dtype=F64, requires_grad=True)
        ddpm.ddpm_loss(lambda z, c: out + 0 * z, x, t, eps, logsnrs, objective=objective,
                       learn_variance=True).loss.sum().backward()
        return out.grad

    g_simple, g_hybrid, g_vlb = grad_of("simple"), grad_of("hybrid"), grad_of("vlb")
    torch.testing.assert_close(g_hybrid[:, :1], g_simple[:, :1])  # stop-grad on the mean in the VLB part
    assert g_hybrid[:, 1:].abs().sum() > 0 and g_simple[:, 1:].abs().sum() == 0
    assert (g_vlb[:, :1] - g_simple[:, :1]).abs().sum() > 0  # pure L_vlb moves the mean too


def test_loss_bad_input():
    _, logsnrs = ddpm.chain_tables("linear", 10)
    x, t, eps = _x(2), torch.tensor([1, 2]), torch.zeros(2, 1, 8, 8, dtype=F64)
    with pytest.raises(ValueError, match="objective: 'hybrid' trains the learned variance"):
        ddpm.ddpm_loss(_Net(), x, t, eps, logsnrs, objective="hybrid")
    with pytest.raises(ValueError, match="objective: expected one of"):
        ddpm.ddpm_loss(_Net(), x, t, eps, logsnrs, objective="kl")
    with pytest.raises(ValueError, match="net: expected 2 output channels"):
        ddpm.ddpm_loss(_Net(), x, t, eps, logsnrs, objective="hybrid", learn_variance=True)


def test_chain_bits_per_dim_is_the_whole_chain_vlb_with_both_cdfs():
    T = 30
    _, logsnrs = ddpm.chain_tables("cosine", T)
    x, net = _x(5), _Net(2)
    got = ddpm.chain_bits_per_dim(net, x, logsnrs, variance="learned", learn_variance=True, batch_size=3, seed=4,
                                  clip_denoised=False)
    model_fn = elbo.vlb_model(net, logsnrs, variance="learned")
    gen = torch.Generator().manual_seed(4)
    runs = [elbo.vlb(model_fn, x[:3], logsnrs, generator=gen, cdf=c) for c in ("exact",)]
    runs.append(elbo.vlb(model_fn, x[3:], logsnrs, generator=gen))
    want = torch.cat([r.bpd for r in runs]).mean().item()
    assert got.bpd == pytest.approx(want, rel=1e-12)
    assert got.bpd == pytest.approx(got.prior + got.decoder + got.kl, rel=1e-12)
    gen = torch.Generator().manual_seed(4)
    tanh = [elbo.vlb(model_fn, xb, logsnrs, generator=gen, cdf="tanh").bpd for xb in (x[:3], x[3:])]
    assert got.bpd_tanh == pytest.approx(torch.cat(tanh).mean().item(), rel=1e-12)
    assert got.bpd_tanh != got.bpd and got.images == 5
    fixed = ddpm.chain_bits_per_dim(net, x, logsnrs, variance="small", learn_variance=True)
    assert math.isfinite(fixed.bpd) and fixed.bpd != got.bpd


def test_clip_denoised_clamps_and_keeps_the_learned_variance():
    d = clip_denoised(lambda x, s: (3 * x, x))
    x = torch.tensor([[-1.0, 0.1, 0.5]])
    den, frac = d(x, 1.0)
    assert den.tolist() == [[-1.0, pytest.approx(0.3), 1.0]] and torch.equal(frac, x)
    assert clip_denoised(lambda x, s: -2 * x)(x, 1.0).tolist() == [[1.0, pytest.approx(-0.2), -1.0]]
    with pytest.raises(ValueError, match="low, high: expected low < high"):
        clip_denoised(lambda x, s: x, low=1.0, high=1.0)


@pytest.mark.parametrize("variance", ["small", "large"])
def test_fixed_variance_respaced_ancestral_sampling_matches_the_table_sampler(variance):
    # DDPM Alg. 2 on the respaced betas (iDDPM Sec. 4): x0 from eps, posterior mean, sqrt(beta~) or sqrt(beta).
    T, K = 40, 9
    abar, _ = ddpm.chain_tables("linear", T)
    net = _Net(1, seed=3)
    n = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(5), dtype=F64)
    got = ddpm.sample_chain(ddpm.ddpm_denoiser(net, abar, variance=variance), n, abar, K, variance=variance,
                            generator=torch.Generator().manual_seed(6))
    ts = ddpm.schedules.respace(T, K)
    kept = abar[ts]
    prev = torch.cat([torch.ones(1, dtype=F64), kept[:-1]])
    betas = 1 - kept / prev
    gen, z = torch.Generator().manual_seed(6), n
    for k in reversed(range(K)):
        eps = net(z, torch.full((3,), float(ts[k]), dtype=F64))
        x0 = (z - (1 - kept[k]).sqrt() * eps) / kept[k].sqrt()
        mean = (betas[k] * prev[k].sqrt() * x0 + (1 - prev[k]) * (1 - betas[k]).sqrt() * z) / (1 - kept[k])
        var = betas[k] * (1 - prev[k]) / (1 - kept[k]) if variance == "small" else betas[k]
        noise = torch.randn(z.shape, generator=gen, dtype=F64)
        z = mean + (var.sqrt() * noise if k > 0 else 0)
    torch.testing.assert_close(got, z, rtol=1e-7, atol=1e-7)


def test_ddim_zero_eta_is_deterministic_and_sampler_bad_input():
    abar, _ = ddpm.chain_tables("cosine", 50)
    n = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(7), dtype=F64)
    d = ddpm.ddpm_denoiser(_Net(2), abar, learn_variance=True, variance="learned", clip=True)
    a = ddpm.sample_chain(d, n, abar, 10, sampler="ddim", generator=torch.Generator().manual_seed(1))
    b = ddpm.sample_chain(d, n, abar, 10, sampler="ddim", generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and a.abs().max() <= 1
    with pytest.raises(ValueError, match="sampler: expected one of"):
        ddpm.sample_chain(d, n, abar, 10, sampler="heun")
    with pytest.raises(ValueError, match="variance: 'learned' needs a network with learn_variance=True"):
        ddpm.ddpm_denoiser(_Net(1), abar, variance="learned")


def test_mlp_shapes_zero_output_and_bad_input():
    net = nets.build("mlp_digits", learn_variance=True, width=32, depth=2)
    x = torch.randn(3, 1, 8, 8)
    out = net(x, torch.tensor([0.0, 10.0, 999.0]))
    assert out.shape == (3, 2, 8, 8) and out.abs().max() == 0  # zero-initialized output layer
    cond = nets.build("mlp_digits", width=32, depth=1, num_classes=10)
    assert cond(x, 5.0, torch.tensor([1, 2, 10])).shape == (3, 1, 8, 8)
    with pytest.raises(ValueError, match=r"x: expected shape \(B, 1, 8, 8\)"):
        net(torch.randn(3, 1, 4, 4), 1.0)
    with pytest.raises(ValueError, match="labels: this network has no class conditioning"):
        net(x, 1.0, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="width: expected an int >= 1"):
        nets.build("mlp_digits", width=0)


def test_loss_history_is_uniform_until_full_then_follows_the_second_moment_and_round_trips():
    h = ddpm.LossHistory(4, k=2, uniform_prob=0.0)
    h.push(torch.tensor([0, 1, 2, 3, 0, 1, 2]), torch.tensor([1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0]))
    torch.testing.assert_close(h.probs(), torch.full((4,), 0.25, dtype=F64))  # row 3 holds one value only
    h.push(torch.tensor([3]), torch.tensor([4.0]))
    torch.testing.assert_close(h.probs(), torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=F64) / 10)
    h.push(torch.tensor([0]), torch.tensor([7.0]))  # the oldest value of row 0 drops out: rms(1, 7) = 5
    assert h.values[0].tolist() == [1.0, 7.0]
    torch.testing.assert_close(h.probs(), torch.tensor([5.0, 2.0, 3.0, 4.0], dtype=F64) / 14)
    other = ddpm.LossHistory(4, k=2, uniform_prob=0.0)
    other.load_state_dict(h.state_dict())
    assert torch.equal(other.probs(), h.probs()) and torch.equal(other.counts, h.counts)
    with pytest.raises(ValueError, match=r"loss history: expected shapes \(5, 2\)"):
        ddpm.LossHistory(5, k=2).load_state_dict(h.state_dict())


# ----------------------------------------------------------------------------------------------
# The recipe end to end (tiny): train, evaluate, resume bitwise with the importance sampler on


@pytest.fixture
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the digits are packed under ./data on first use
    torch.set_num_threads(1)  # bitwise resume on a CPU holds at one thread count


def _tiny(tmp_path, **kw):
    import dataclasses

    base = dict(out_dir=str(tmp_path / "run"), net_channels=32, T=4, sample_steps=4, steps=6, batch_size=16,
                log_every=3, checkpoint_every=3, grid_samples=4, eval_samples=0, eval_images=20, progress=False,
                objective="vlb", timestep_sampler="importance")
    return dataclasses.replace(ddpm.PRESETS["digits"], **{**base, **kw})


@pytest.mark.usefixtures("_in_tmp")
def test_resume_is_bitwise_with_the_importance_sampler(tmp_path):
    import dataclasses

    from recipes.checkpoints import load_checkpoint

    config = _tiny(tmp_path)
    scores = ddpm.RECIPE.run(config)
    assert math.isfinite(scores["test_bits_per_dim"]) and scores["test_bits_per_dim_tanh_cdf"] != scores[
        "test_bits_per_dim"]
    final = load_checkpoint(tmp_path / "run" / "ckpt-00000006.pt")
    history = final["recipe_state"]["loss_history"]
    assert (history["counts"] == 10).all()  # every row full: the last steps drew t by importance
    more = dataclasses.replace(config, out_dir=str(tmp_path / "run2"), eval_bits=False)
    ddpm.RECIPE.run(dataclasses.replace(more, steps=3))
    with pytest.warns(UserWarning, match="steps"):
        ddpm.RECIPE.run(more, resume=tmp_path / "run2" / "ckpt-00000003.pt")
    resumed = load_checkpoint(tmp_path / "run2" / "ckpt-00000006.pt")
    for k, v in final["model"].items():
        assert torch.equal(v, resumed["model"][k]), k
    for k, v in history.items():
        assert torch.equal(v, resumed["recipe_state"]["loss_history"][k]), k


@pytest.mark.usefixtures("_in_tmp")
def test_digits_run_samples_and_scores_and_bad_flags(tmp_path, capsys):
    config = _tiny(tmp_path, objective="hybrid", timestep_sampler="uniform", T=20, sample_steps=5, steps=2,
                   checkpoint_every=2, eval_samples=16, eval_bits=False)
    scores = ddpm.RECIPE.run(config)
    assert math.isfinite(scores["digits_fd"]) and (tmp_path / "run" / "samples.png").is_file()
    assert ddpm.main(["--objective", "hybrid", "--no-learn-variance", "--variance", "small"]) == 2
    assert "'hybrid' trains the learned variance" in capsys.readouterr().err
    assert ddpm.main(["--solver", "heun"]) == 2
    assert "expected 'ddpm' (ancestral) or 'ddim'" in capsys.readouterr().err
    assert ddpm.main(["--timestep-sampler", "importance"]) == 2
    assert "'importance' reweights L_vlb" in capsys.readouterr().err
    assert ddpm.main(["--sample-steps", "2000"]) == 2
