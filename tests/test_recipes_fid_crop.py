"""FID of samples padded beyond the data's size (Fashion-MNIST 28 -> 32): the recipes crop them back to the
data's size first, so samples equal to the test images score ~0; scored padded they would not."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from kdiff import data, metrics
from recipes import edm, image

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def inception():
    try:
        metrics.inception_path()
    except ImportError as e:
        pytest.skip(f"the eval extra is not installed: {e}")


def test_crop_undoes_pad():
    x = torch.randn(3, 1, 28, 27)
    assert torch.equal(image.crop_to(data.pad_to(x, 32), 28)[..., :, 1:], data.pad_to(x, 28)[..., :, 1:])
    y = torch.randn(2, 3, 28, 28)
    assert torch.equal(image.crop_to(data.pad_to(y, 32), 28), y)
    assert torch.equal(image.crop_to(y, 28), y) and torch.equal(image.crop_to(y, None), y)


def test_samples_equal_to_the_test_images_score_zero(inception, tmp_path):
    rng = np.random.default_rng(0)
    n = 10
    test_u8 = np.clip(rng.normal(128, 60, (n, 28, 28, 1)), 0, 255).astype(np.uint8)
    data.write_h5(tmp_path / "fake-test.h5", test_u8, split="test", source="synthetic 28x28")
    padded = data.pad_to(data.x_from_uint8(torch.from_numpy(test_u8).permute(0, 3, 1, 2)), 32)

    def denoiser(model, config, labels, extras):
        # D(x, sigma) = the padded test images: the sampler's last step lands exactly on them
        return lambda x, sigma: padded[: x.shape[0]].to(x.dtype)

    recipe = dataclasses.replace(edm.RECIPE, denoiser=denoiser)
    config = dataclasses.replace(edm.PRESETS["fashion"], eval_data=str(tmp_path / "fake-test.h5"), eval_samples=n,
                                 sample_steps=2, solver="euler", conditional=False)
    stand_in = torch.nn.Linear(1, 1)  # only its device is read
    scores = image.evaluate(recipe, stand_in, config, image.DataInfo((1, 32, 32), None, 28), out_dir=tmp_path / "a",
                            progress=False)
    samples, _, _ = data.read_h5(tmp_path / "a" / "samples.h5")
    assert samples.shape == (n, 32, 32, 1)
    assert np.array_equal(samples[:, 2:30, 2:30], test_u8)  # the sampler reproduced them, centred in 32 x 32
    assert abs(scores["fid"]) < 1e-2
    uncropped = image.evaluate(recipe, stand_in, config, image.DataInfo((1, 32, 32), None, None),
                               out_dir=tmp_path / "b", progress=False)
    assert uncropped["fid"] > 10  # what scoring the padded samples would have reported
