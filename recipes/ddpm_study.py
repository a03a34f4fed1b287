"""The DDPM / Improved-DDPM comparison on the digits behind RESULTS.md (CPU, sequential, single-threaded).

Trains two models at one shared budget with :mod:`recipes.ddpm` — linear betas + ``L_simple`` (evaluated with
fixed-small and fixed-large variances) and cosine + ``L_hybrid`` (learned variances) — then measures:

- test bits/dim, the exact whole chain on all 360 test digits, exact and tanh CDF, with and without the x0 clip;
- the stochastic estimate (``K`` random steps per image) next to the exact value, in standard errors;
- the digits Frechet distance against the number of sampling steps: ancestral 1000/250/100/50/25 with fixed and
  learned variances, DDIM(eta=0) 50/25.

    python -m recipes.ddpm_study --out runs/ddpm-study        # writes study.json and fd_vs_steps.png there
    python -m recipes.ddpm_study --out runs/ddpm-study --estimators --repeats 50  # estimators.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from kdiff import elbo, metrics

from . import ddpm
from .image import load_for_sampling
from .plot import line_chart

ANCESTRAL_STEPS = (1000, 250, 100, 50, 25)
DDIM_STEPS = (50, 25)


def _net(model: nn.Module):
    return ddpm.time_net(model)


@torch.no_grad()
def bits_table(model: nn.Module, x: Tensor, logsnrs: Tensor, *, variances: tuple[str, ...], learn_variance: bool,
               k: int, progress: bool, unclipped: tuple[str, ...] = ()) -> list[dict]:
    rows = []
    for variance in variances:
        for clip in (True, False) if variance in unclipped else (True,):
            t0 = time.perf_counter()
            bits = ddpm.chain_bits_per_dim(_net(model), x, logsnrs, variance=variance, learn_variance=learn_variance,
                                           clip_denoised=clip, progress=progress)
            exact_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            est, se = ddpm.estimate_bits_per_dim(_net(model), x, logsnrs, k=k, variance=variance,
                                                 learn_variance=learn_variance, clip_denoised=clip, seed=1)
            rows.append({"variance": variance, "clip": clip, **bits._asdict(), "exact_seconds": exact_s,
                         "estimate": est, "estimate_se": se, "estimate_k": k,
                         "estimate_seconds": time.perf_counter() - t0})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


@torch.no_grad()
def fd_sweep(model: nn.Module, alphas_bar: Tensor, fd, *, variances: tuple[str, ...], learn_variance: bool,
             n: int, clip: bool, ancestral_steps=ANCESTRAL_STEPS, ddim_steps=DDIM_STEPS) -> list[dict]:
    """Frechet distance of ``n`` samples per setting (the same starting noise for every setting)."""
    noise = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(12345))
    rows = []
    runs = [("ancestral", v, s) for v in variances for s in ancestral_steps] + [("ddim", "-", s) for s in ddim_steps]
    for sampler, variance, steps in runs:
        var = ("learned" if learn_variance else "small") if variance == "-" else variance
        denoise = ddpm.ddpm_denoiser(_net(model), alphas_bar, learn_variance=learn_variance, variance=var, clip=clip)
        t0 = time.perf_counter()
        images = ddpm.sample_chain(denoise, noise, alphas_bar, steps, sampler=sampler, variance=var,
                                   generator=torch.Generator().manual_seed(steps))
        rows.append({"sampler": sampler, "variance": variance, "steps": steps, "clip": clip,
                     "fd": fd(images.clamp(-1, 1)), "seconds": time.perf_counter() - t0})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


@torch.no_grad()
def estimate_spread(model: nn.Module, x: Tensor, logsnrs: Tensor, *, variance: str, learn_variance: bool,
                    k: int, repeats: int, method: str = "uniform") -> dict:
    """``repeats`` independent stochastic estimates (seeds 1..repeats): their mean and spread beside the mean
    stated standard error, to check that the stated error describes the estimate's actual scatter."""
    runs = [ddpm.estimate_bits_per_dim(_net(model), x, logsnrs, k=k, variance=variance, learn_variance=learn_variance,
                                       seed=seed, method=method) for seed in range(1, repeats + 1)]
    est = torch.tensor([r[0] for r in runs], dtype=torch.float64)
    se = torch.tensor([r[1] for r in runs], dtype=torch.float64)
    return {"variance": variance, "k": k, "method": method, "repeats": repeats, "mean": est.mean().item(),
            "spread": est.std().item(), "mean_stated_se": se.mean().item(), "median_stated_se": se.median().item()}


def estimates_only(out: Path, configs: dict, plan: dict, x: Tensor, *, ks: tuple[int, ...], repeats: int) -> None:
    result = json.loads((out / "study.json").read_text())
    for name, config in configs.items():
        model = load_for_sampling(config.out_dir).model
        _, logsnrs = ddpm.chain_tables(config.schedule, config.T)
        result[name]["estimate_spread"] = [
            estimate_spread(model, x, logsnrs, variance=v, learn_variance=config.learn_variance, k=k, repeats=repeats)
            for v in plan[name][0][:1] for k in ks]
        print(json.dumps(result[name]["estimate_spread"]), file=sys.stderr, flush=True)
        (out / "study.json").write_text(json.dumps(result, indent=1))


def estimator_comparison(out: Path, configs: dict, plan: dict, x: Tensor, *, ks: tuple[int, ...],
                         repeats: int, chain_seeds: int = 8) -> None:
    """Uniform against stratified draws of the stochastic estimate (``repeats`` runs each, seeds 1..repeats),
    beside the exact chain's mean over ``chain_seeds`` noise seeds (x0 clip, each model's first variance); trains
    a model first where ``--out`` has no checkpoint of it. Writes ``estimators.json``."""
    result: dict[str, object] = {"ks": list(ks), "repeats": repeats, "images": x.shape[0]}
    for name, config in configs.items():
        if not list(Path(config.out_dir).glob("ckpt-*.pt")):
            ddpm.RECIPE.run(config)
        model = load_for_sampling(config.out_dir).model
        _, logsnrs = ddpm.chain_tables(config.schedule, config.T)
        variance = plan[name][0][0]
        # the exact chain is exact in t but draws one forward noise per step: its own spread over noise seeds
        chains = [ddpm.chain_bits_per_dim(_net(model), x, logsnrs, variance=variance, seed=seed,
                                          learn_variance=config.learn_variance, progress=False).bpd
                  for seed in range(chain_seeds)]
        exact = torch.tensor(chains, dtype=torch.float64)
        rows = []
        for k in ks:
            for method in elbo.ESTIMATORS:
                t0 = time.perf_counter()
                row = estimate_spread(model, x, logsnrs, variance=variance, learn_variance=config.learn_variance, k=k,
                                      repeats=repeats, method=method)
                row["seconds"] = time.perf_counter() - t0
                rows.append(row)
                print(json.dumps({"model": name, "exact_mean": exact.mean().item(), **row}), file=sys.stderr,
                      flush=True)
        result[name] = {"variance": variance, "exact_chains": chains, "exact_mean": exact.mean().item(),
                        "exact_spread": exact.std().item(), "estimates": rows}
        (out / "estimators.json").write_text(json.dumps(result, indent=1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recipes.ddpm_study", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/ddpm-study", help="output folder")
    parser.add_argument("--steps", type=int, default=None, help="training steps of both models (default: preset)")
    parser.add_argument("--samples", type=int, default=500, help="samples per Frechet distance")
    parser.add_argument("--k", type=int, default=50, help="random steps per image of the stochastic estimate")
    parser.add_argument("--estimates-only", action="store_true",
                        help="with the trained models in --out: repeat the stochastic estimate (K = 50, 200) 20 times")
    parser.add_argument("--estimators", action="store_true",
                        help="uniform vs stratified stochastic estimates (K = k, 4k) against the exact chain's mean "
                             "over 8 noise seeds, training the models first where --out lacks them; writes "
                             "estimators.json")
    parser.add_argument("--repeats", type=int, default=20, help="independent estimates per setting (--estimators)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    base = dataclasses.replace(ddpm.PRESETS["digits"], eval_samples=0, eval_bits=False, progress=False)
    budget = {"steps": args.steps} if args.steps else {}
    configs = {
        "linear+L_simple": dataclasses.replace(base, schedule="linear", objective="simple", learn_variance=False,
                                               variance="small", out_dir=str(out / "linear-simple"), **budget),
        "cosine+L_hybrid": dataclasses.replace(base, schedule="cosine", objective="hybrid", learn_variance=True,
                                               out_dir=str(out / "cosine-hybrid"), **budget),
    }
    plan = {  # (bits/dim variances, which of them also without the clip, FD-sweep variances)
        "linear+L_simple": (("small", "large"), ("small",), ("small", "large")),
        "cosine+L_hybrid": (("learned", "small"), ("learned",), ("learned", "small")),
    }
    x_test = ddpm.held_out_images(base)
    if args.estimates_only:
        estimates_only(out, configs, plan, x_test, ks=(args.k, 4 * args.k), repeats=20)
        return 0
    if args.estimators:
        out.mkdir(parents=True, exist_ok=True)
        estimator_comparison(out, configs, plan, x_test, ks=(args.k, 4 * args.k), repeats=args.repeats)
        return 0
    result: dict[str, object] = {"budget": {"steps": configs["linear+L_simple"].steps, "batch_size": base.batch_size,
                                            "lr": base.lr, "T": base.T, "net": base.net, "samples": args.samples,
                                            "k": args.k}}
    for name, config in configs.items():
        t0 = time.perf_counter()
        ddpm.RECIPE.run(config)
        model = load_for_sampling(config.out_dir).model
        train_s = time.perf_counter() - t0
        alphas_bar, logsnrs = ddpm.chain_tables(config.schedule, config.T)
        bits_vars, unclipped, fd_vars = plan[name]
        entry: dict[str, object] = {"train_seconds": train_s}
        result[name] = entry
        entry["bits"] = bits_table(model, x_test, logsnrs, variances=bits_vars, learn_variance=config.learn_variance,
                                   k=args.k, progress=False, unclipped=unclipped)
        (out / "study.json").write_text(json.dumps(result, indent=1))
        entry["fd"] = (fd_sweep(model, alphas_bar, ddpm.digits_fd, variances=fd_vars,
                                learn_variance=config.learn_variance, n=args.samples, clip=True)
                       + fd_sweep(model, alphas_bar, ddpm.digits_fd, variances=fd_vars[:1],
                                  learn_variance=config.learn_variance, n=args.samples, clip=False,
                                  ancestral_steps=(100,), ddim_steps=()))
        (out / "study.json").write_text(json.dumps(result, indent=1))
    result["fd_real_train_floor"] = metrics.digits_frechet_floor()
    (out / "study.json").write_text(json.dumps(result, indent=1))
    series = {}
    for name in configs:
        for row in result[name]["fd"]:
            if row["clip"]:
                label = f"{name} {row['sampler']} {row['variance']}".replace(" -", "")
                series.setdefault(label, ([], []))
                series[label][0].append(row["steps"])
                series[label][1].append(row["fd"])
    line_chart(series, out / "fd_vs_steps.png", title="digits: Frechet distance vs sampling steps (x0 clipped)",
               xlabel="sampling steps (respaced, trailing)", ylabel="digits Frechet distance")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
