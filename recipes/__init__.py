"""Full training and sampling runs built on kdiff: ``python -m recipes.NAME --preset P``.

Shared machinery: :mod:`recipes.common` (config -> CLI flags and presets, EMA, AdamW with warm-up,
autocast, atomic checkpoints with every RNG state) and :mod:`recipes.train_loop` (resumable data
order, torchrun/DDP, the training loop with TensorBoard logging, image grids).
"""
