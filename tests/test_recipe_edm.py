"""The EDM recipe end to end on a tiny preset: train, checkpoint, resume, sample, evaluate (CPU, seconds)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from kdiff import data
from recipes import edm, evaluate
from recipes import sample as sample_cli
from recipes.checkpoints import load_checkpoint
from recipes.distributed import Rand

pytestmark = pytest.mark.usefixtures("single_thread")


def tiny(tmp_path, **kw) -> edm.EDMConfig:
    base = dict(out_dir=str(tmp_path / "run"), net="unet_tiny", steps=4, batch_size=16, lr=1e-3, log_every=2,
                checkpoint_every=2, sample_steps=3, grid_samples=4, eval_samples=12, progress=False)
    return dataclasses.replace(edm.PRESETS["digits"], **{**base, **kw})


@pytest.fixture(autouse=True)
def _data_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the digits are packed under ./data on first use


def test_loss_is_edm_weighted_denoising_error(tmp_path):
    """loss_fn = lambda(sigma) mean((D(x + sigma n) - x)^2), checked against EDM's effective training target
    (Eq. 8 in F-space): since lambda(sigma) c_out^2 = 1 it equals mean((F(c_in y) - (x - c_skip y) / c_out)^2)."""
    config = tiny(tmp_path)
    x = torch.rand(16, 1, 8, 8) * 2 - 1
    labels = torch.arange(16) % 10
    seen = {}

    def net(x_in, c_noise, y):
        seen["c_noise"], seen["x_in"] = c_noise, x_in
        return torch.tanh(x_in) * 0.3

    g = torch.Generator().manual_seed(0)
    loss, position = edm.make_loss_fn(config, 10)(net, (x, labels), Rand(g))
    g = torch.Generator().manual_seed(0)
    u = torch.randn(16, generator=g)
    sigma = torch.exp(config.p_mean + config.p_std * u.double())
    noise = torch.randn(16, 1, 8, 8, generator=g).double()
    y = x.double() + sigma.view(-1, 1, 1, 1) * noise
    sd = config.sigma_data
    c_skip = sd**2 / (sigma**2 + sd**2)
    c_out = sigma * sd / torch.sqrt(sigma**2 + sd**2)
    c_in = 1 / torch.sqrt(sigma**2 + sd**2)
    f = torch.tanh(c_in.view(-1, 1, 1, 1) * y) * 0.3
    target = (x.double() - c_skip.view(-1, 1, 1, 1) * y) / c_out.view(-1, 1, 1, 1)
    expected = ((f - target) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(seen["c_noise"].double(), torch.log(sigma) / 4, rtol=1e-5, atol=1e-6)
    from scipy.stats import norm
    np.testing.assert_allclose(position.numpy(), norm.cdf(u.numpy()), rtol=1e-5, atol=1e-6)


def test_train_resume_sample_evaluate(tmp_path, capsys):
    config = tiny(tmp_path)
    scores = edm.run(config)
    run = tmp_path / "run"
    assert (run / "samples.png").is_file() and (run / "samples.h5").is_file()
    assert any((run / "tb").iterdir())
    assert 0.0 <= scores["digits_accuracy"] <= 1.0
    assert scores["digits_accuracy_real_test"] > 0.9  # the classifier the number rests on works
    images, labels, _ = data.read_h5(run / "samples.h5")
    assert images.shape == (12, 8, 8, 1) and (labels == np.arange(12) % 10).all()

    # Resume from the step-2 checkpoint and reach the same step-4 weights as the uninterrupted run.
    final = load_checkpoint(run / "ckpt-00000004.pt")
    more = dataclasses.replace(config, out_dir=str(tmp_path / "run2"), eval_samples=0)
    edm.run(dataclasses.replace(more, steps=2))
    with pytest.warns(UserWarning, match="steps"):  # the resumed run is told it now runs 4 steps, not 2
        edm.run(more, resume=tmp_path / "run2" / "ckpt-00000002.pt")
    resumed = load_checkpoint(tmp_path / "run2" / "ckpt-00000004.pt")
    for k, v in final["model"].items():
        assert torch.equal(v, resumed["model"][k]), k

    # Sampling CLI: a seed regenerates the same image alone as inside a batch.
    assert sample_cli.main([str(run), "--num", "6", "--steps", "3", "--out", str(tmp_path / "s6")]) == 0
    assert sample_cli.main([str(run), "--seeds", "4", "--steps", "3", "--out", str(tmp_path / "s1")]) == 0
    six, _, _ = data.read_h5(tmp_path / "s6" / "samples.h5")
    one, one_labels, _ = data.read_h5(tmp_path / "s1" / "samples.h5")
    assert np.abs(six[4].astype(int) - one[0].astype(int)).max() <= 1 and one_labels[0] == 4
    assert evaluate.main([str(tmp_path / "s6" / "samples.h5"), "--digits"]) == 0
    assert "digits_accuracy" in capsys.readouterr().out


def test_bad_input(tmp_path, capsys):
    assert edm.main(["--preset", "nope"]) == 2
    assert "--preset" in capsys.readouterr().err
    with pytest.raises(ValueError, match="net"):
        tiny(tmp_path, net="no_such_net")
    with pytest.raises(ValueError, match="label_dropout"):
        tiny(tmp_path, label_dropout=1.5)
    with pytest.raises(FileNotFoundError, match="pack"):
        edm.run(tiny(tmp_path, data="missing.h5"))
    assert edm.main(["--data", "missing.h5", "--steps", "1", "--no-progress"]) == 2
    assert "kdiff.data pack" in capsys.readouterr().err
    assert sample_cli.main([str(tmp_path / "nowhere")]) == 2
    assert "checkpoint" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--seeds"):
        sample_cli.parse_seeds("a-b")
