"""Bad input over the public API, table-driven: every case must raise ValueError or TypeError with a message
that starts with the name of the offending argument.

Each argument is attacked by kind: per-sample scalars (``logsnr``, ``sigma``, ``t``: a float, ``[]`` or ``[B]``)
with NaN, infinities where the math has no limit, integer/boolean/complex tensors, strings, wrong lengths and a
tensor on another device (the meta device stands in for a second device); data tensors with the wrong dtype,
shape or device; hyper-parameters with NaN, inf, strings and out-of-range values; options with unknown strings.
Every group also runs its valid call, so a case fails for the reason it names. The empty batch (B = 0) is
accepted everywhere and gives empty results; limits the math defines are returned, not NaN.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import pytest
import torch

from kdiff import denoisers as D
from kdiff import elbo as E
from kdiff import losses as L
from kdiff import param as PA
from kdiff import process as P
from kdiff import schedules as S
from kdiff import solvers as SO
from kdiff.nets import build, drop_labels, null_labels, sinusoidal_embedding
from kdiff.nets.layers import noise_cond_vector

pytestmark = pytest.mark.usefixtures("single_thread")

NAN, INF = math.nan, math.inf
B = 2
META = torch.device("meta")
Case = tuple[str, Callable[[], object], type, str]

CASES: list[Case] = []
VALID: list[tuple[str, Callable[[], object]]] = []


def x_() -> torch.Tensor:
    return torch.linspace(-0.9, 0.9, B * 3).reshape(B, 3)


def grid_x() -> torch.Tensor:
    """Data on the 8-bit grid in [-1, 1] (for the discretized decoder)."""
    return torch.tensor([[-1.0, 1 / 255 - 1 + 2 / 255, 1.0], [0.0 + 1 / 255, -1.0, 1.0]])


def add(fn: str, arg: str, call: Callable[[object], object], valid: object,
        bad: list[tuple[str, object, type]]) -> None:
    """Register ``call(value)`` for each bad value (and the valid one as a baseline)."""
    VALID.append((f"{fn}:{arg}", lambda: call(valid)))
    for label, value, exc in bad:
        CASES.append((f"{fn}:{arg}={label}", lambda value=value: call(value), exc, arg))


def per_sample(*, data: bool = True, posinf: bool = False, neginf: bool = False,
               valid: float = 0.5) -> list[tuple[str, object, type]]:
    """Bad values for a scalar-or-[B] argument (``data``: checked against a batch of B)."""
    bad = [
        ("nan", NAN, ValueError),
        ("nan[B]", torch.tensor([valid, NAN]), ValueError),
        ("int", torch.tensor([1, 2]), TypeError),
        ("bool", torch.tensor([True, False]), TypeError),
        ("complex", torch.tensor([1 + 1j, 1.0]), TypeError),
        ("str", "0.5", TypeError),
        ("None", None, TypeError),
    ]
    if not posinf:
        bad.append(("+inf", INF, ValueError))
    if not neginf:
        bad.append(("-inf", torch.tensor([valid, -INF]), ValueError))
    if data:
        bad += [("length", torch.full((B + 1,), valid), ValueError),
                ("2-D", torch.full((B, 1), valid), ValueError),
                ("meta", torch.full((B,), valid, device=META), ValueError)]
    return bad


def data_tensor(*, second: bool = True, shape: tuple[int, ...] = (B, 3),
                none: type = TypeError) -> list[tuple[str, object, type]]:
    """Bad values for a data tensor; shape and device are checked against an earlier tensor when ``second``.
    ``none``: the error for None (a ValueError where None is a legal value in other circumstances)."""
    bad = [("int", torch.ones(shape, dtype=torch.int64), TypeError),
           ("bool", torch.ones(shape, dtype=torch.bool), TypeError),
           ("complex", torch.ones(shape, dtype=torch.complex64), TypeError),
           ("list", [[0.0] * shape[-1]] * shape[0], TypeError),
           ("None", None, none)]
    if second:
        bad += [("shape", torch.zeros(shape[0], shape[-1] + 1), ValueError),
                ("meta", torch.zeros(shape, device=META), ValueError)]
    return bad


def hparam(*, low: float | None = None, inf_ok: bool = False, extra: tuple = ()) -> list[tuple[str, object, type]]:
    """Bad values for a hyper-parameter (a Python number): NaN, inf, a string, below ``low``."""
    bad = [("nan", NAN, ValueError), ("str", "1", TypeError), ("None", None, TypeError)]
    if not inf_ok:
        bad.append(("inf", INF, ValueError))
    if low is not None:
        bad.append(("low", low - 1.0, ValueError))
    return bad + list(extra)


def choice() -> list[tuple[str, object, type]]:
    return [("unknown", "nope", ValueError), ("None", None, ValueError), ("int", 3, ValueError)]


# ----------------------------------------------------------------------------------------------
# kdiff.schedules

for _fn in (S.alpha_sigma, S.sigma_from_logsnr, S.alphas_bar_from_logsnr, S.t_from_logsnr_cosine):
    add(_fn.__name__, "logsnr", _fn, 0.5, per_sample(data=False, posinf=True, neginf=True))
add("t_from_logsnr_cosine_shifted", "logsnr", lambda v: S.t_from_logsnr_cosine_shifted(v, image_size=32), 0.5,
    per_sample(data=False, posinf=True, neginf=True))
add("t_from_logsnr_cosine_interpolated", "logsnr",
    lambda v: S.t_from_logsnr_cosine_interpolated(v, image_size=64), 0.5,
    per_sample(data=False, posinf=True, neginf=True))
add("logsnr_from_sigma", "sigma", S.logsnr_from_sigma, 0.5,
    per_sample(data=False, posinf=True) + [("negative", -1.0, ValueError)])
add("logsnr_from_alpha_sigma", "alpha", lambda v: S.logsnr_from_alpha_sigma(v, 0.5), 0.5,
    per_sample(data=False) + [("negative", -0.5, ValueError)])
add("logsnr_from_alpha_sigma", "sigma", lambda v: S.logsnr_from_alpha_sigma(0.5, v), 0.5,
    per_sample(data=False) + [("negative", -0.5, ValueError)])
add("logsnr_from_alpha_sigma", "alpha, sigma", lambda v: S.logsnr_from_alpha_sigma(v, v), 0.5,
    [("both zero", 0.0, ValueError)])
for _fn in (S.logsnr_cosine,):
    add(_fn.__name__, "t", _fn, 0.5, per_sample(data=False) + [("above 1", 1.5, ValueError)])
add("logsnr_cosine_shifted", "t", lambda v: S.logsnr_cosine_shifted(v, image_size=32), 0.5, per_sample(data=False))
add("logsnr_cosine_interpolated", "t", lambda v: S.logsnr_cosine_interpolated(v, image_size=64), 0.5,
    per_sample(data=False))
for _arg in ("logsnr_min", "logsnr_max"):
    add("logsnr_cosine", _arg, lambda v, a=_arg: S.logsnr_cosine(0.5, **{a: v}), -10.0 if _arg == "logsnr_min"
        else 10.0, hparam())
add("logsnr_cosine_interpolated", "noise_size_low",
    lambda v: S.logsnr_cosine_interpolated(0.5, image_size=64, noise_size_low=v), 32,
    [("zero", 0, ValueError), ("float", 32.0, TypeError)])
add("logsnr_cosine_interpolated", "noise_size_high",
    lambda v: S.logsnr_cosine_interpolated(0.5, image_size=64, noise_size_high=v), 64, [("zero", 0, ValueError)])
add("t_from_logsnr_cosine_interpolated", "iters",
    lambda v: S.t_from_logsnr_cosine_interpolated(0.5, image_size=64, iters=v), 40, [("zero", 0, ValueError)])
add("betas_linear", "T", lambda v: S.betas_linear(v), 10, [("zero", 0, ValueError), ("float", 10.0, TypeError)])
add("betas_linear", "beta_start", lambda v: S.betas_linear(10, beta_start=v), 1e-4, hparam(low=0.0))
add("betas_linear", "beta_end", lambda v: S.betas_linear(10, beta_end=v), 0.02, hparam(extra=(("one", 1.0,
                                                                                                   ValueError),)))
add("alphas_bar_cosine", "s", lambda v: S.alphas_bar_cosine(10, s=v), 0.008, hparam(low=0.0))
add("alphas_bar_cosine", "max_beta", lambda v: S.alphas_bar_cosine(10, max_beta=v), 0.999, hparam(low=0.0))
add("alphas_bar_from_betas", "betas", S.alphas_bar_from_betas, torch.full((4,), 0.1),
    data_tensor(second=False, shape=(2, 4)) + [("nan", torch.tensor([0.1, NAN]), ValueError),
                                               ("above 1", torch.tensor([0.1, 1.5]), ValueError)])
for _fn in (S.betas_from_alphas_bar, S.logsnr_from_alphas_bar):
    add(_fn.__name__, "alphas_bar", _fn, torch.tensor([0.9, 0.5]),
        data_tensor(second=False) + [("nan", torch.tensor([0.9, NAN]), ValueError),
                                     ("negative", torch.tensor([-0.1]), ValueError)])
add("sigmas_karras", "n", lambda v: S.sigmas_karras(v), 5, [("zero", 0, ValueError), ("float", 5.0, TypeError)])
add("sigmas_karras", "sigma_min", lambda v: S.sigmas_karras(5, sigma_min=v), 0.002,
    hparam(extra=(("zero", 0.0, ValueError),)))
add("sigmas_karras", "sigma_max", lambda v: S.sigmas_karras(5, sigma_max=v), 80.0,
    hparam(extra=(("zero", 0.0, ValueError),)))
add("sigmas_karras", "rho", lambda v: S.sigmas_karras(5, rho=v), 7.0, hparam(extra=(("zero", 0.0, ValueError),)))
add("sigma_lognormal", "u", lambda v: S.sigma_lognormal(v), torch.zeros(B),
    data_tensor(second=False, shape=(B, 1)) + [("nan", torch.tensor([0.0, NAN]), ValueError)])
add("sigma_lognormal", "p_mean", lambda v: S.sigma_lognormal(torch.zeros(B), p_mean=v), -1.2, hparam())
add("sigma_lognormal", "p_std", lambda v: S.sigma_lognormal(torch.zeros(B), p_std=v), 1.2,
    hparam(extra=(("zero", 0.0, ValueError),)))
add("respace", "spacing", lambda v: S.respace(10, 5, spacing=v), "trailing", choice())
add("respace", "n", lambda v: S.respace(10, v), 5, [("too many", 11, ValueError), ("zero", 0, ValueError)])
_AB = S.alphas_bar_from_betas(S.betas_linear(20))
add("sigmas_from_alphas_bar", "alphas_bar", lambda v: S.sigmas_from_alphas_bar(v), _AB,
    data_tensor(second=False, shape=(2, 20)) + [("2-D", _AB[None], ValueError)])
add("sigmas_from_alphas_bar", "timesteps", lambda v: S.sigmas_from_alphas_bar(_AB, v), torch.tensor([0, 5, 19]),
    [("float", torch.tensor([0.0, 5.0]), TypeError), ("out of range", torch.tensor([0, 20]), ValueError),
     ("decreasing", torch.tensor([5, 0]), ValueError)])
add("timestep_from_sigma", "sigma", lambda v: S.timestep_from_sigma(v, _AB), S.sigmas_from_alphas_bar(_AB)[3],
    [("nan", NAN, ValueError), ("outside the table", 1e6, ValueError)])
add("timestep_from_sigma", "alphas_bar", lambda v: S.timestep_from_sigma(S.sigmas_from_alphas_bar(_AB)[3], v), _AB,
    data_tensor(second=False, shape=(2, 20)))


# ----------------------------------------------------------------------------------------------
# kdiff.process and kdiff.param

add("diffuse", "x", lambda v: P.diffuse(v, x_(), 0.5), x_(), data_tensor(second=False))
add("diffuse", "eps", lambda v: P.diffuse(x_(), v, 0.5), x_(), data_tensor())
add("diffuse", "logsnr", lambda v: P.diffuse(x_(), x_(), v), 0.5, per_sample(posinf=True, neginf=True))
add("transition", "logsnr_s", lambda v: P.transition(v, 0.0), 0.5,
    per_sample(data=False, posinf=True, neginf=True) + [("reversed", -1.0, ValueError)])
add("transition", "logsnr_t", lambda v: P.transition(1.0, v), 0.5,
    per_sample(data=False, posinf=True, neginf=True)[:-1])  # NaN, dtypes; a [B] pair may sit on any one device
add("posterior_logvar", "logsnr_s", lambda v: P.posterior_logvar(v, 0.0), 0.5,
    per_sample(data=False, posinf=True, neginf=True))
add("transition_logvar", "logsnr_t", lambda v: P.transition_logvar(1.0, v), 0.5,
    per_sample(data=False, posinf=True, neginf=True))
add("posterior", "z_t", lambda v: P.posterior(x_(), v, 1.0, 0.5), x_(), data_tensor())
add("posterior", "logsnr_s", lambda v: P.posterior(x_(), x_(), v, 0.0), 0.5,
    per_sample(posinf=True, neginf=True))
add("posterior", "logsnr_t", lambda v: P.posterior(x_(), x_(), 1.0, v), 0.5, per_sample(posinf=True, neginf=True))
for _fn, _names, _pos, _neg in [(PA.x_from_eps, ("z", "eps"), True, False), (PA.eps_from_x, ("z", "x"), False, True),
                                (PA.v_from_x_eps, ("x", "eps"), True, True), (PA.x_from_v, ("z", "v"), True, True),
                                (PA.eps_from_v, ("z", "v"), True, True), (PA.v_from_x, ("z", "x"), False, True),
                                (PA.v_from_eps, ("z", "eps"), True, False)]:
    add(_fn.__name__, _names[0], lambda v, f=_fn: f(v, x_(), 0.5), x_(), data_tensor(second=False))
    add(_fn.__name__, _names[1], lambda v, f=_fn: f(x_(), v, 0.5), x_(), data_tensor())
    add(_fn.__name__, "logsnr", lambda v, f=_fn: f(x_(), x_(), v), 0.5, per_sample(posinf=_pos, neginf=_neg))
add("x_from_eps", "logsnr", lambda v: PA.x_from_eps(x_(), x_(), v), 0.5, [("-inf (alpha = 0)", -INF, ValueError)])
add("eps_from_x", "logsnr", lambda v: PA.eps_from_x(x_(), x_(), v), 0.5, [("+inf (sigma = 0)", INF, ValueError)])
add("score_from_eps", "logsnr", lambda v: PA.score_from_eps(x_(), v), 0.5, per_sample(neginf=True))
add("eps_from_score", "logsnr", lambda v: PA.eps_from_score(x_(), v), 0.5, per_sample(posinf=True, neginf=True))
add("score_from_eps", "eps", lambda v: PA.score_from_eps(v, 0.5), x_(), data_tensor(second=False))
add("edm_precond", "sigma", lambda v: PA.edm_precond(v), 0.5,
    per_sample(data=False) + [("zero", 0.0, ValueError), ("negative", torch.tensor([1.0, -1.0]), ValueError)])
add("edm_precond", "sigma_data", lambda v: PA.edm_precond(1.0, sigma_data=v), 0.5,
    hparam(extra=(("zero", 0.0, ValueError),)))


# ----------------------------------------------------------------------------------------------
# kdiff.losses

add("mse", "pred", lambda v: L.mse(v, x_()), x_(), data_tensor(second=False))
add("mse", "target", lambda v: L.mse(x_(), v), x_(), data_tensor())
add("mse_conversion", "logsnr", lambda v: L.mse_conversion(v), 0.5, per_sample(data=False))
add("mse_conversion", "from_target", lambda v: L.mse_conversion(0.5, from_target=v), "eps", choice())
add("mse_conversion", "to_target", lambda v: L.mse_conversion(0.5, to_target=v), "x", choice())
add("eps_mse_from_v", "v_pred", lambda v: L.eps_mse_from_v(v, x_(), x_(), 0.5), x_(), data_tensor())
add("eps_mse_from_v", "eps", lambda v: L.eps_mse_from_v(x_(), x_(), v, 0.5), x_(), data_tensor())
add("eps_mse_from_v", "logsnr", lambda v: L.eps_mse_from_v(x_(), x_(), x_(), v), 0.5, per_sample(posinf=True,
                                                                                                  neginf=True))
add("weight_min_snr", "logsnr", lambda v: L.weight_min_snr(v), 0.5, per_sample(data=False, posinf=True, neginf=True))
add("weight_min_snr", "gamma", lambda v: L.weight_min_snr(0.5, gamma=v), 5.0,
    [("nan", NAN, ValueError), ("zero", 0.0, ValueError), ("str", "5", ValueError)])
add("weight_min_snr", "target", lambda v: L.weight_min_snr(0.5, target=v), "eps", choice())
add("weight_edm", "sigma", lambda v: L.weight_edm(v), 0.5, per_sample(data=False, posinf=True))
add("weight_edm", "sigma_data", lambda v: L.weight_edm(0.5, sigma_data=v), 0.5, hparam(low=0.0))
_IMG = torch.zeros(B, 1, 4, 4)
add("multiscale_mse", "target", lambda v: L.multiscale_mse(_IMG, v, base=2), _IMG,
    [("int", torch.zeros(B, 1, 4, 4, dtype=torch.int64), TypeError), ("shape", torch.zeros(B, 1, 4, 2), ValueError),
     ("meta", torch.zeros(B, 1, 4, 4, device=META), ValueError)])


# ----------------------------------------------------------------------------------------------
# kdiff.elbo

add("normal_kl", "logvar2", lambda v: E.normal_kl(x_(), x_(), x_(), v), x_(),
    [("int", torch.zeros(B, 3, dtype=torch.int64), TypeError), ("nan float", NAN, ValueError),
     ("shape", torch.zeros(4), ValueError), ("meta", torch.zeros(B, 3, device=META), ValueError),
     ("str", "0", TypeError)])
add("discretized_gaussian_loglik", "x", lambda v: E.discretized_gaussian_loglik(v, grid_x(), grid_x()), grid_x(),
    data_tensor(second=False) + [("outside [-1, 1]", torch.full((B, 3), 1.5), ValueError),
                                 ("nan", torch.full((B, 3), NAN), ValueError)])
add("discretized_gaussian_loglik", "mean", lambda v: E.discretized_gaussian_loglik(grid_x(), v, grid_x()), grid_x(),
    data_tensor())
add("discretized_gaussian_loglik", "min_prob",
    lambda v: E.discretized_gaussian_loglik(grid_x(), grid_x(), grid_x(), min_prob=v), 1e-12, hparam(low=0.0))
add("decoder_nll", "logvar", lambda v: E.decoder_nll(grid_x(), grid_x(), v), grid_x(), data_tensor())
add("gaussian_nll", "mean", lambda v: E.gaussian_nll(x_(), v, x_()), x_(), data_tensor())
add("prior_kl", "x", lambda v: E.prior_kl(v, 0.5), x_(), data_tensor(second=False))
add("prior_kl", "logsnr_T", lambda v: E.prior_kl(x_(), v), -5.0, per_sample(posinf=True, neginf=True, valid=-5.0))
add("learned_logvar", "v_raw", lambda v: E.learned_logvar(v, 2.0, 1.0), x_(), data_tensor(second=False))
add("learned_logvar", "logsnr_s", lambda v: E.learned_logvar(x_(), v, 0.0), 1.0,
    per_sample(posinf=True, valid=1.0) + [("reversed", -1.0, ValueError)])
add("learned_logvar", "logsnr_t", lambda v: E.learned_logvar(x_(), 2.0, v), 1.0, per_sample(valid=1.0))
add("learned_logvar", "first_logvar", lambda v: E.learned_logvar(x_(), INF, 1.0, first_logvar=v), -3.0,
    [("nan", NAN, ValueError), ("meta", torch.zeros(B, 3, device=META), ValueError), ("str", "a", TypeError)])
add("vlb_term", "z_t", lambda v: E.vlb_term(grid_x(), v, grid_x(), grid_x(), 2.0, 1.0), grid_x(), data_tensor())
add("vlb_term", "logvar", lambda v: E.vlb_term(grid_x(), grid_x(), grid_x(), v, 2.0, 1.0), grid_x(),
    data_tensor())
add("vlb_term", "logsnr_t", lambda v: E.vlb_term(grid_x(), grid_x(), grid_x(), grid_x(), 2.0, v), 1.0,
    per_sample(valid=1.0))
add("hybrid_loss", "lam", lambda v: E.hybrid_loss(grid_x(), grid_x(), x_(), x_(), grid_x(), 2.0, 1.0,
                                                  num_steps=10, lam=v), 0.001, hparam(low=0.0))
add("hybrid_loss", "num_steps", lambda v: E.hybrid_loss(grid_x(), grid_x(), x_(), x_(), grid_x(), 2.0, 1.0,
                                                        num_steps=v), 10, [("zero", 0, ValueError),
                                                                           ("float", 1.5, TypeError)])
add("bits_per_dim", "dims", lambda v: E.bits_per_dim(torch.ones(B), v), 3, [("zero", 0, ValueError)])
_LEVELS = torch.tensor([3.0, 0.0, -3.0])


def _model(z: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros_like(z), torch.zeros_like(z)


add("vlb", "model_fn", lambda v: E.vlb(v, grid_x(), _LEVELS), _model,
    [("None", None, TypeError), ("str", "net", TypeError),
     ("returns None", lambda z, i: None, TypeError), ("returns one tensor", lambda z, i: z, TypeError)])
add("vlb", "logsnrs", lambda v: E.vlb(_model, grid_x(), v), _LEVELS,
    data_tensor(second=False, shape=(2, 3)) + [("increasing", _LEVELS.flip(0), ValueError),
                                               ("inf", torch.tensor([INF, 0.0]), ValueError)])
add("vlb", "decoder", lambda v: E.vlb(_model, grid_x(), _LEVELS, decoder=v), "gaussian", choice())
add("vlb", "generator", lambda v: E.vlb(_model, grid_x(), _LEVELS, generator=v), torch.Generator().manual_seed(0),
    [("int", 0, TypeError), ("str", "cpu", TypeError)])
add("vlb", "noise", lambda v: E.vlb(_model, grid_x(), _LEVELS, noise=v), torch.zeros(3, B, 3),
    [("shape", torch.zeros(2, B, 3), ValueError), ("meta", torch.zeros(3, B, 3, device=META), ValueError),
     ("int", torch.zeros(3, B, 3, dtype=torch.int64), TypeError)])
_HIST, _COUNTS = torch.ones(4, 2), torch.full((4,), 2)
add("importance_probs", "uniform_prob", lambda v: E.importance_probs(_HIST, _COUNTS, uniform_prob=v), 0.01,
    hparam(low=0.0, extra=(("above 1", 1.5, ValueError),)))
add("importance_probs", "counts", lambda v: E.importance_probs(_HIST, v), _COUNTS,
    [("float", torch.ones(4), TypeError), ("shape", torch.ones(3, dtype=torch.int64), ValueError),
     ("meta", torch.ones(4, dtype=torch.int64, device=META), ValueError)])
add("importance_weights", "t", lambda v: E.importance_weights(torch.full((4,), 0.25), v), torch.tensor([0, 3]),
    [("float", torch.tensor([0.0, 1.0]), TypeError), ("negative", torch.tensor([-1]), ValueError),
     ("too large", torch.tensor([4]), ValueError), ("bool", torch.tensor([True]), TypeError)])
add("push_loss_history", "t", lambda v: E.push_loss_history(_HIST, _COUNTS, v, torch.ones(1)), torch.tensor([1]),
    [("negative", torch.tensor([-1]), ValueError), ("too large", torch.tensor([4]), ValueError),
     ("float", torch.tensor([1.0]), TypeError)])
add("continuous_diffusion_loss", "dlogsnr_dt", lambda v: E.continuous_diffusion_loss(x_(), x_(), v), -1.0,
    per_sample(valid=-1.0))
add("continuous_diffusion_loss", "eps_hat", lambda v: E.continuous_diffusion_loss(x_(), v, -1.0), x_(),
    data_tensor())


# ----------------------------------------------------------------------------------------------
# kdiff.solvers

for _fn in (SO.euler_step, SO.ddim_step, SO.dpmpp_2m_step):
    add(_fn.__name__, "denoised", lambda v, f=_fn: f(x_(), v, 1.0, 0.5), x_(), data_tensor())
    add(_fn.__name__, "sigma", lambda v, f=_fn: f(x_(), x_(), v, 0.25), 1.0,
        per_sample(valid=1.0) + [("zero", 0.0, ValueError)])
    add(_fn.__name__, "sigma_next", lambda v, f=_fn: f(x_(), x_(), 1.0, v), 0.5,
        per_sample() + [("negative", -0.5, ValueError)])
add("heun_step", "denoise", lambda v: SO.heun_step(x_(), x_(), 1.0, 0.5, denoise=v), lambda x, s: x,
    [("returns None", lambda x, s: None, TypeError)])
_ETA_BAD = [("nan", NAN, ValueError), ("inf", INF, ValueError), ("negative", -1.0, ValueError),
            ("str", "1", ValueError), ("None", None, ValueError), ("bool", True, ValueError)]
add("ddim_step", "eta", lambda v: SO.ddim_step(x_(), x_(), 1.0, 0.5, eta=v, noise=x_()), 0.5, _ETA_BAD)
add("ddim_step", "noise", lambda v: SO.ddim_step(x_(), x_(), 1.0, 0.5, eta=0.5, noise=v), x_(),
    data_tensor(none=ValueError))
add("ddpm_step", "variance", lambda v: SO.ddpm_step(x_(), x_(), 1.0, 0.5, noise=x_(), variance=v), "small",
    choice() + [("int tensor", torch.ones(B, 1, dtype=torch.int64), TypeError)])
add("ddpm_step", "variance", lambda v: SO.ddpm_step(x_(), x_(), 1.0, 0.0, variance=v), "large",
    [("unknown, last step", "nope", ValueError)])
add("churn", "s_churn", lambda v: SO.churn(x_(), 1.0, x_(), s_churn=v, n_steps=10), 1.0, _ETA_BAD)
add("churn", "s_noise", lambda v: SO.churn(x_(), 1.0, x_(), s_churn=1.0, n_steps=10, s_noise=v), 1.0, _ETA_BAD)
add("churn", "n_steps", lambda v: SO.churn(x_(), 1.0, x_(), s_churn=1.0, n_steps=v), 10,
    [("zero", 0, ValueError), ("float", 10.0, TypeError)])
add("churn", "s_tmin", lambda v: SO.churn(x_(), 1.0, x_(), s_churn=1.0, n_steps=10, s_tmin=v), 0.0,
    hparam(low=0.0))
add("churn", "noise", lambda v: SO.churn(x_(), 1.0, v, s_churn=1.0, n_steps=10), x_(), data_tensor(none=ValueError))
add("churn", "sigma", lambda v: SO.churn(x_(), v, x_(), s_churn=1.0, n_steps=10), 1.0, per_sample(valid=1.0))
_SIGMAS = torch.tensor([2.0, 1.0, 0.0])


def _identity(x: torch.Tensor, sigma: object) -> torch.Tensor:
    return x


add("sample", "denoise", lambda v: SO.sample(v, x_(), _SIGMAS), _identity,
    [("None", None, TypeError), ("str", "net", TypeError), ("returns None", lambda x, s: None, ValueError)])
add("sample", "x", lambda v: SO.sample(_identity, v, _SIGMAS), x_(), data_tensor(second=False))
add("sample", "sigmas", lambda v: SO.sample(_identity, x_(), v), _SIGMAS,
    data_tensor(second=False, shape=(2, 3)) + [("no trailing 0", torch.tensor([2.0, 1.0]), ValueError),
                                               ("nan", torch.tensor([NAN, 0.0]), ValueError)])
add("sample", "solver", lambda v: SO.sample(_identity, x_(), _SIGMAS, solver=v), "euler", choice())
add("sample", "s_churn", lambda v: SO.sample(_identity, x_(), _SIGMAS, solver="heun", s_churn=v), 1.0,
    [("nan", NAN, ValueError), ("negative", -1.0, ValueError), ("inf", INF, ValueError)])
add("sample", "s_churn", lambda v: SO.sample(_identity, x_(), _SIGMAS, solver="ddim", s_churn=v), 0.0,
    [("with ddim", 1.0, ValueError), ("nan with ddim", NAN, ValueError)])
add("sample", "eta", lambda v: SO.sample(_identity, x_(), _SIGMAS, solver="ddim", eta=v), 0.5,
    [("nan", NAN, ValueError), ("negative", -1.0, ValueError), ("str", "1", ValueError)])
add("sample", "eta", lambda v: SO.sample(_identity, x_(), _SIGMAS, solver="heun", eta=v), 0.0,
    [("with heun", 0.5, ValueError)])
add("sample", "variance", lambda v: SO.sample(_identity, x_(), _SIGMAS, solver="ddpm", variance=v), "large",
    choice())
add("sample", "variance", lambda v: SO.sample(_identity, x_(), _SIGMAS, solver="heun", variance=v), "small",
    [("invalid with heun", "foo", ValueError), ("large with heun", "large", ValueError)])
add("sample", "s_noise", lambda v: SO.sample(_identity, x_(), _SIGMAS, s_noise=v), 1.0,
    [("nan", NAN, ValueError), ("negative", -1.0, ValueError)])
add("sample", "generator", lambda v: SO.sample(_identity, x_(), _SIGMAS, generator=v), None,
    [("int", 0, TypeError), ("str", "cpu", TypeError)])
add("sample", "callback", lambda v: SO.sample(_identity, x_(), _SIGMAS, callback=v), None, [("str", "log", TypeError)])


# ----------------------------------------------------------------------------------------------
# kdiff.denoisers


def _net(x: torch.Tensor, c: torch.Tensor, *cond: object) -> torch.Tensor:
    return x


add("edm_denoiser", "net", lambda v: D.edm_denoiser(v)(x_(), 1.0), _net,
    [("None", None, TypeError), ("str", "unet", TypeError), ("returns None", lambda x, c: None, TypeError),
     ("wrong shape", lambda x, c: x[:1], ValueError)])
add("edm_denoiser", "sigma_data", lambda v: D.edm_denoiser(_net, sigma_data=v), 0.5,
    hparam(extra=(("zero", 0.0, ValueError),)))
add("edm_denoiser(...)", "sigma", lambda v: D.edm_denoiser(_net)(x_(), v), 1.0,
    per_sample(valid=1.0) + [("zero", 0.0, ValueError)])
add("edm_denoiser(...)", "x", lambda v: D.edm_denoiser(_net)(v, 1.0), x_(), data_tensor(second=False))
add("vp_denoiser", "net", lambda v: D.vp_denoiser(v)(x_(), 1.0), _net,
    [("None", None, TypeError), ("str", "unet", TypeError), ("returns None", lambda z, c: None, TypeError)])
add("vp_denoiser", "param", lambda v: D.vp_denoiser(_net, param=v), "eps", choice())
add("vp_denoiser(...)", "sigma", lambda v: D.vp_denoiser(_net)(x_(), v), 1.0,
    per_sample(valid=1.0) + [("zero", 0.0, ValueError)])


# ----------------------------------------------------------------------------------------------
# kdiff.nets (small networks; built once)

_UNET = build("unet_tiny")
_IMG8 = torch.zeros(B, 3, 8, 8)
add("UNet", "x", lambda v: _UNET(v, 0.0), _IMG8,
    [("float64", _IMG8.double(), TypeError), ("bfloat16", _IMG8.bfloat16(), TypeError),
     ("int", _IMG8.long(), TypeError), ("channels", torch.zeros(B, 1, 8, 8), ValueError),
     ("odd size", torch.zeros(B, 3, 7, 8), ValueError), ("3-D", torch.zeros(3, 8, 8), ValueError)])
add("UNet", "noise_cond", lambda v: _UNET(_IMG8, v), torch.zeros(B),
    [("complex", torch.zeros(B, dtype=torch.complex64), TypeError), ("nan", NAN, ValueError),
     ("length", torch.zeros(B + 1), ValueError), ("str", "0", TypeError)])
add("UNet", "labels", lambda v: _UNET(_IMG8, 0.0, v), torch.tensor([0, 10]),
    [("float", torch.tensor([0.0, 1.0]), TypeError), ("negative", torch.tensor([-1, 0]), ValueError),
     ("too large", torch.tensor([0, 11]), ValueError), ("length", torch.tensor([0]), ValueError)])
add("build", "out_channels", lambda v: build("unet_tiny", out_channels=v), 3, [("zero", 0, ValueError)])
for _field, _value in [("channels", 0), ("num_blocks", -1), ("image_size", 0)]:
    CASES.append((f"build:{_field}=bad", lambda f=_field, v=_value: build("unet_tiny", **{f: v}), ValueError, _field))
add("build", "out_channels", lambda v: build("uvit_tiny", out_channels=v), 3, [("zero (uvit)", 0, ValueError)])
add("build", "name", lambda v: build(v), "unet_tiny", [("unknown", "unet_huge", ValueError)])
add("sinusoidal_embedding", "dim", lambda v: sinusoidal_embedding(torch.zeros(B), v), 8,
    [("odd", 7, ValueError), ("zero", 0, ValueError), ("float", 8.0, TypeError)])
add("sinusoidal_embedding", "c", lambda v: sinusoidal_embedding(v, 8), torch.zeros(B),
    [("2-D", torch.zeros(B, 1), TypeError), ("complex", torch.zeros(B, dtype=torch.complex64), TypeError)])
add("noise_cond_vector", "noise_cond", lambda v: noise_cond_vector(v, B, torch.device("cpu")), torch.zeros(B),
    [("complex", torch.zeros(B, dtype=torch.complex64), TypeError), ("bool", torch.zeros(B, dtype=torch.bool),
                                                                      TypeError)])
add("drop_labels", "u", lambda v: drop_labels(torch.tensor([1, 2]), v, p=0.5, num_classes=10), torch.zeros(2),
    [("int", torch.zeros(2, dtype=torch.int64), TypeError), ("shape", torch.zeros(3), ValueError),
     ("nan", torch.tensor([NAN, 0.0]), ValueError), ("meta", torch.zeros(2, device=META), ValueError)])
add("drop_labels", "p", lambda v: drop_labels(torch.tensor([1, 2]), p=v, num_classes=10), 0.5,
    [("nan", NAN, ValueError), ("above 1", 1.5, ValueError)])
add("drop_labels", "generator", lambda v: drop_labels(torch.tensor([1, 2]), p=0.5, num_classes=10, generator=v),
    None, [("int", 0, TypeError)])
add("null_labels", "num_classes", lambda v: drop_labels(null_labels(2, 10), p=0.5, num_classes=v), 10,
    [])  # baseline only: the reserved index is accepted


@pytest.mark.parametrize("call, exc, name", [pytest.param(c, e, n, id=i) for i, c, e, n in CASES])
def test_bad_input_names_the_argument(call: Callable[[], object], exc: type, name: str) -> None:
    with pytest.raises(exc) as info:
        call()
    message = str(info.value)
    assert re.match(rf"{re.escape(name)}\b", message), f"message does not start with {name!r}: {message!r}"


@pytest.mark.parametrize("call", [pytest.param(c, id=i) for i, c in VALID])
def test_the_valid_call_of_each_group_runs(call: Callable[[], object]) -> None:
    call()


def test_case_count() -> None:
    """The table covers the public API broadly (the number is reported with the work)."""
    assert len(CASES) >= 500, len(CASES)


# ----------------------------------------------------------------------------------------------
# The empty batch: accepted everywhere, empty results


def _empty() -> torch.Tensor:
    return torch.zeros(0, 3)


EMPTY = {
    "mse": lambda: L.mse(_empty(), _empty()),
    "eps_mse_from_v": lambda: L.eps_mse_from_v(_empty(), _empty(), _empty(), 0.5),
    "decoder_nll": lambda: E.decoder_nll(_empty(), _empty(), _empty()),
    "gaussian_nll": lambda: E.gaussian_nll(_empty(), _empty(), _empty()),
    "prior_kl": lambda: E.prior_kl(_empty(), -5.0),
    "vlb_term": lambda: E.vlb_term(_empty(), _empty(), _empty(), _empty(), 2.0, 1.0),
    "continuous_diffusion_loss": lambda: E.continuous_diffusion_loss(_empty(), _empty(), -1.0),
    "vlb": lambda: E.vlb(_model, _empty(), _LEVELS).nats,
    "diffuse": lambda: P.diffuse(_empty(), _empty(), 0.5).sum(dim=1),
    "x_from_eps": lambda: PA.x_from_eps(_empty(), _empty(), 0.5).sum(dim=1),
    "sample": lambda: SO.sample(_identity, _empty(), _SIGMAS).sum(dim=1),
}


@pytest.mark.parametrize("name", list(EMPTY))
def test_empty_batch_gives_an_empty_result(name: str) -> None:
    out = EMPTY[name]()
    assert out.shape == (0,)


# ----------------------------------------------------------------------------------------------
# Limits the math defines come back as values, not NaN (oracles: the closed-form limits)


def test_defined_limits() -> None:
    assert L.weight_min_snr(-INF, target="eps").item() == 1.0  # min(SNR, g) / SNR -> 1 as SNR -> 0
    assert L.weight_min_snr(-INF, target="x").item() == 0.0
    assert L.weight_min_snr(-INF, target="v").item() == 0.0
    assert L.weight_min_snr(INF, target="eps").item() == 0.0
    assert L.weight_min_snr(INF, target="x").item() == 5.0
    assert L.weight_edm(INF).item() == pytest.approx(4.0)
    assert E.prior_kl(x_(), -INF).tolist() == [0.0, 0.0]
    z = torch.zeros(3)
    # KL from and to a point mass (logvar = -inf): infinite unless both are the same point.
    assert E.normal_kl(z, -INF, z, -INF).tolist() == [0.0] * 3
    assert E.normal_kl(z, -INF, z + 1, -INF).tolist() == [INF] * 3
    assert E.normal_kl(z, 0.0, z, -INF).tolist() == [INF] * 3
    assert E.normal_kl(z, -INF, z, 0.0).tolist() == [INF] * 3
    assert E.normal_kl(z, INF, z, 0.0).tolist() == [INF] * 3
    x = x_()
    torch.testing.assert_close(PA.x_from_eps(x, torch.ones_like(x), INF), x)  # clean data: x = z
    torch.testing.assert_close(PA.eps_from_x(x, torch.ones_like(x), -INF), x)  # pure noise: eps = z
    torch.testing.assert_close(P.diffuse(x, 2 * x, -INF), 2 * x)
    assert S.t_from_logsnr_cosine_interpolated(torch.tensor([INF, -INF]), image_size=64).tolist() == [0.0, 1.0]


def test_edm_precond_is_stable_for_huge_sigma_in_float32() -> None:
    """sigma = 1e20: sigma^2 overflows float32; the coefficients must still be their limits."""
    c_skip, c_out, c_in, c_noise = PA.edm_precond(torch.tensor([1e20, 1e-20]), sigma_data=0.5)
    assert c_out.dtype == torch.float32
    torch.testing.assert_close(c_out, torch.tensor([0.5, 1e-20]), rtol=1e-6, atol=0)
    torch.testing.assert_close(c_in, torch.tensor([1e-20, 2.0]), rtol=1e-6, atol=0)
    torch.testing.assert_close(c_skip, torch.tensor([0.25e-40, 1.0]), rtol=1e-4, atol=0)
    torch.testing.assert_close(c_noise, torch.tensor([math.log(1e20) / 4, math.log(1e-20) / 4]))


def test_zero_width_decoder_is_its_limit() -> None:
    """log_scale = -inf: P(x) = 1 when the mean is in x's bin, else 0 (floored at min_prob); never NaN."""
    x = torch.tensor([[-1.0, 1 / 255, 1.0]])
    mean_in = x + torch.tensor([[-0.5, 0.4, 0.9]]) / 255  # inside each bin (the edge bins are open)
    mean_out = x + torch.tensor([[3.0, 1.5, -3.0]]) / 255
    ls = torch.full_like(x, -INF)
    assert E.discretized_gaussian_loglik(x, mean_in, ls).tolist() == [[0.0, 0.0, 0.0]]
    assert E.discretized_gaussian_loglik(x, mean_out, ls, min_prob=0.0).tolist() == [[-INF] * 3]
    assert E.decoder_nll(x, mean_in, torch.full_like(x, -INF)).tolist() == [0.0]
    # a very narrow decoder approaches the same values
    narrow = E.discretized_gaussian_loglik(x.double(), mean_in.double(), torch.full_like(x, -30.0).double())
    assert narrow.abs().max().item() < 1e-12


# ---------------------------------------------------------------------------------------------------------------
# Value-check modes: 'async' queues the same verdict on the device (no host sync), 'off' skips it
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def value_checks():
    from kdiff._util import set_value_checks

    previous = set_value_checks("auto")
    yield set_value_checks
    set_value_checks(previous)


def test_async_value_checks_raise_the_same_named_error_through_the_device_assert(value_checks):
    x = torch.zeros(2, 3)
    value_checks("async")
    with pytest.raises(RuntimeError, match="^logsnr: expected values that are not NaN"):
        P.diffuse(x, x, torch.tensor([0.0, math.nan]))
    with pytest.raises(RuntimeError, match="^logsnr_s: expected logsnr_s >= logsnr_t"):
        P.transition(torch.tensor([0.0, -1.0]), torch.tensor([-1.0, 0.0]))
    assert torch.equal(P.diffuse(x, x, torch.tensor([0.0, 1.0])), torch.zeros(2, 3))


def test_off_skips_value_checks_but_not_shape_checks(value_checks):
    x = torch.zeros(2, 3)
    value_checks("off")
    assert torch.isnan(P.diffuse(x, x, torch.tensor([0.0, math.nan]))).any()
    with pytest.raises(ValueError, match="^logsnr"):
        P.diffuse(x, x, torch.zeros(3))
    with pytest.raises(ValueError, match="^mode: expected one of"):
        value_checks("fast")
