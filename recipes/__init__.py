"""Full training and sampling runs built on kdiff: ``python -m recipes.NAME --preset P``.

Installed, this package is ``kdiff.recipes`` (``python -m kdiff.recipes.edm`` works from anywhere). Each system
is one small file holding only what is its own; the machinery is shared:

=====================  ======================================================================================
``config``             a frozen dataclass <-> command-line flags, JSON, presets, ``--resume``
``train_config``       :class:`TrainConfig`, the training loop's fields (optimizer, schedule, EMA, budget, ...)
``checkpoints``        atomic writes, every RNG state, latest/prune, the run-directory lock
``distributed``        torchrun/DDP, the resumable batch order, shard-independent training noise (``Rand``)
``optim``              ``ema_update``/``ema_decay``, learning-rate schedules, Adam/AdamW, autocast
``grids``              ``write_grid``: sample grids, small images enlarged by nearest neighbour
``loop``               ``train``: the loop, with recipe-owned state and extra trainable models
``image``              ``ImageConfig``/``ImageRecipe``: data, networks, ``generate``, evaluation, ``run``/``main``
``edm``                EDM (Karras et al. 2022); ``sample`` and ``evaluate`` work for every recipe
=====================  ======================================================================================

Writing a recipe
================

A recipe file ``recipes/NAME.py`` declares five things and hands them to :class:`~recipes.image.ImageRecipe`:

1. **Config**: a frozen dataclass subclassing :class:`~recipes.image.ImageConfig` (which already has the
   training-loop, data, network, solver and evaluation fields). One field per setting, each with a trailing
   ``# comment``: it becomes the ``--flag``'s help. Check values in ``__post_init__`` (call ``super()`` first)
   and raise ``ValueError("field: expected ..., got ...")``; NaN/inf in any float field is refused for you.
2. **Presets**: a dict of named configs; ``default_preset`` runs without ``--preset``.
3. **Loss**: ``loss(config, info, state) -> loss_fn``, with ``loss_fn(net, batch, rand) -> (loss [b], position
   [b])``: the per-sample loss and where in the noise range (0 clean, 1 noise) each sample was drawn.
   ``batch`` is ``(x, labels)``, ``x`` in [-1, 1]; draw every random number from ``rand`` (``rand.randn(b)``,
   ``rand.rand(b)``, ``rand.randn_like(x)``) so that resume and multi-GPU runs stay exact. ``info.shape`` and
   ``info.num_classes`` (None when unconditional) describe the data.
4. **Denoiser**: ``denoiser(model, config, labels, extras) -> denoise(x, sigma)``, the sampler's one model
   contract (EDM space: ``x = y + sigma n``, returns the estimate of ``y``; ``kdiff.denoisers.vp_denoiser``
   wraps VP networks, ``kdiff.guidance`` adds guidance).
5. **Sampling grid**: ``sigmas(config) -> (n + 1,)`` decreasing noise levels ending in 0. A VP model also
   gives ``start_scale(config, sigmas)`` (``sqrt(1 + sigma_max^2)``); ``solver_options(config)`` passes
   keywords such as ``s_churn`` or ``eta`` to ``kdiff.solvers.sample``; ``sampling_fields`` lists the config
   fields ``python -m recipes.sample`` may override.

Optional: ``new_state(config, info) -> {name: obj}`` for **recipe-owned state** (any object with
``state_dict()``/``load_state_dict()``, e.g. a loss-history importance sampler that ``loss_fn`` reads and
updates); it is saved in every checkpoint and restored bitwise on resume. ``extra_models(config, info, state)
-> {name: Trainable(module, loss_fn, optimizer_fn=..., lr_fn=...)}`` for a **second trainable model** (e.g. a
noisy-image classifier): trained on the same batches with its own optimizer and EMA, checkpointed, and handed to
``denoiser`` as ``extras[name]`` (its EMA). ``build_model(config, info)`` replaces the default network builder
(``kdiff.nets.build(config.net, ...)``), e.g. for twice the output channels of a learned variance.

The shared skeleton then gives the recipe ``--preset``/flags/``--resume``, validation of the whole config
before the first step (one image is sampled with the untrained network), the training loop (Adam or AdamW,
warm-up then constant/linear/cosine, EMA, bf16, DDP, ``--max-seconds``), checkpoints that record the recipe
and config (so ``python -m recipes.sample RUN_DIR`` works with no recipe-specific code), sample grids and the
final evaluation (digits: Frechet distance in a digit classifier's feature space and, when labelled, accuracy;
other data: FID).

A minimal recipe (denoising score matching with log-uniform noise levels, unconditional)::

    import dataclasses

    import torch

    from kdiff import schedules

    from .image import ImageConfig, ImageRecipe


    @dataclasses.dataclass(frozen=True)
    class VEConfig(ImageConfig):
        \"\"\"Denoising score matching with log-uniform noise levels.\"\"\"

        sigma_min: float = 0.01  # smallest noise level, in training and sampling
        sigma_max: float = 20.0  # largest noise level


    PRESETS = {"digits": VEConfig(out_dir="runs/ve-digits", steps=1000, batch_size=128, lr=2e-3,
                                  net="unet_digits", net_channels=32, conditional=False)}


    def denoise_with(net, config, labels):
        def denoise(x, sigma):
            sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])
            return net(x * (1 + sigma**2).rsqrt().view(-1, 1, 1, 1), sigma.log() / 4, labels)
        return denoise


    def loss(config, info, state):
        def loss_fn(net, batch, rand):
            x, _ = batch
            u = rand.rand(x.shape[0]).to(x.device)
            sigma = config.sigma_min * (config.sigma_max / config.sigma_min) ** u
            x_hat = denoise_with(net, config, None)(x + sigma.view(-1, 1, 1, 1) * rand.randn_like(x), sigma)
            return (x_hat - x).square().flatten(1).mean(1), u
        return loss_fn


    def denoiser(model, config, labels, extras):
        return denoise_with(model, config, labels)


    def sigmas(config):
        return schedules.sigmas_karras(config.sample_steps, sigma_min=config.sigma_min, sigma_max=config.sigma_max)


    RECIPE = ImageRecipe(name="ve", config=VEConfig, presets=PRESETS, loss=loss, denoiser=denoiser, sigmas=sigmas)

    if __name__ == "__main__":
        raise SystemExit(RECIPE.main())

``name`` is the module's name under ``recipes/`` (a recipe kept elsewhere gives its full dotted module path):
checkpoints record it, and ``recipes.sample`` imports the module and uses its ``RECIPE``. Test a recipe the
way ``tests/test_recipe_edm.py`` does: its loss against an independent closed form, and a tiny run (``steps=4``,
``net="unet_tiny"``) through train, resume, ``recipes.sample`` and ``recipes.evaluate``.

Pieces for your own training loops: :func:`recipes.optim.ema_update` / :func:`recipes.optim.ema_decay` (EDM's
half-life in images) and :func:`recipes.grids.write_grid`.
"""

from .grids import make_grid, write_grid
from .optim import ema_decay, ema_update

__all__ = ["ema_decay", "ema_update", "make_grid", "write_grid"]
