"""``python -m benchmarks.gpu_session``: everything kdiff promises on a GPU, measured by one prepared command in two
stages of a few minutes each, on a machine without network.

    python -m benchmarks.gpu_session --stage train --data .gpu/data --out OUT1      # ~8 min: needs the IDX files
    python -m benchmarks.gpu_session --stage fid --inception .gpu/fid/inception-fp16.pt --out OUT2   # ~3 min
    python -m benchmarks.gpu_session --stage train --smoke --out OUT   # every step on the CPU at toy sizes

Stage ``train`` (default budget 490 s): device, driver and versions with the measured copy bandwidth and bf16 matmul
throughput; ``pytest -m gpu``; ``benchmarks.report --quick`` for every ``benchmarks/report_<op>.py`` with the ratios
to the goals of BENCHMARKS.md; every other ``benchmarks/test_bench_*.py`` suite (the networks' training-step
throughput); then EDM on Fashion-MNIST, class-conditional, through ``python -m recipes.edm`` and
``python -m recipes.sample``: pack the data, train for the rest of ~4 minutes, write the EMA weights in float16 to OUT
(11 MB), and draw 50,000 samples with Heun, 18 steps (35 evaluations), in bf16 autocast (``--precision bf16``), as
two calls (seeds 0..9,999, then 10,000..49,999) so a cut-short second call still leaves the FID at 10k; then seeds
0..9,999 again in float32. Stage ``fid`` (default 170 s): the Inception from ``--inception`` (any stored float dtype,
run in float32), test-split statistics computed with it, then FID at 10,000 and 50,000 samples, real training images
vs the test split at 10,000 (the floor), and the precision check: float32 against bf16 FID for the same seeds, beside
the FID difference of two disjoint bf16 seed sets (its noise).
Stage 1 leaves data, checkpoint and samples in ``--work`` (``runs/gpu-session/``: git-ignored, so never carried to
the device, and still there for stage 2 in the same checkout).

Robust to the time limit (see :mod:`.record`): each step gets its share of what remains of ``--budget-s``; each
result is appended to ``OUT/gpu-session.md`` and ``OUT/gpu-session.json`` (flush + fsync) when known; a step that
fails or hangs is recorded (with its output's tail) and the next one runs; everything risky runs in a subprocess
whose process group is killed at its budget. Training stops by the recipe's ``--max-seconds`` where it exists, else
by killing it after its last checkpoint (written every 200 steps, atomically).

The EDM run, chosen for the best FID in ~4 minutes of an H100 (measured on one before: ``unet_fashion``, 5.56M
parameters, batch 256, 80-129 ms per step eager, 64 ms with ``torch.compile``, 1.59 TFLOP per step, i.e. 3% of the
bf16 matmul peak; 2,321 kernel launches per step):

- network ``unet_fashion`` (the recipe's ``fashion`` preset, attention at 16x16 and 8x8): a step this small is bound
  by kernel launches, not arithmetic, so a narrower network would not train faster and a wider one would leave the
  launch-bound regime and see fewer images; the U-Net's convolutions also learn 28x28 images in fewer images than
  the 8.35M-parameter U-ViT.
- batch 1024, 4x the preset's: the launch cost per step stays, the GPU work grows to ~6.4 TFLOP (~10-25% of the
  matmul peak), so the images per second should grow ~3x: about 2M images (~30 epochs) in the budget instead of
  ~0.6M. lr 2e-3 (Adam's square-root rule from 1e-3 at 256), 200 warm-up steps, dropout 0 (30 epochs underfit;
  EDM's dropout is for 200M-image runs), the preset's EMA with its ramp-up (half-life 5% of the images seen).
- ``torch.compile`` on (1.3-2x per step, 30-90 s to compile), bf16 autocast (the recipe's default on CUDA); a compiled
  run that dies before its first checkpoint is retried eagerly in the time left.
- sampling in bf16 autocast at batch 2,500 (float32 took ~2 minutes for 50k); the sampler state stays float64.
These are estimates from one profile; the session measures images/s, the steps reached and the FID that result.
"""
