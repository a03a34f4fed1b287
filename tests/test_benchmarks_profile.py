"""The training-step profile of ``benchmarks.report --op profile``, at toy size on the CPU."""

from __future__ import annotations

import pytest
import torch

from benchmarks import report_profile, train_step


@pytest.fixture(autouse=True)
def _torch_kernels(monkeypatch):
    """The CPU's own path (SDPA, the torch reference), as ``benchmarks.report`` runs there: the suite's Triton
    interpreter would make a step take seconds."""
    monkeypatch.setenv("KDIFF_KERNELS", "torch")


def test_profile_step_accounts_for_the_step():
    p = train_step.profile_step("unet_fashion", torch.device("cpu"), "eager", steps=2, top=40)
    assert p.batch == train_step.CPU_BATCH and p.wall_ms > 0 and p.host_ms > 0
    assert p.device_busy_ms is None and p.launches is None  # no device timeline on a CPU
    host = [r for r in p.rows if r.kind == "cpu"]
    assert host and all(r.kind == "cpu" for r in p.rows)
    assert [r.us_per_step for r in host] == sorted((r.us_per_step for r in host), reverse=True)
    assert 0 < sum(r.share for r in host) <= 1 + 1e-9
    # the U-Net's 3x3 convolutions run forward and backward once per step each: one call per conv layer
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in train_step.build("unet_fashion",
                                                                         **train_step.CPU_OVERRIDES).modules())
    by_name = {r.name: r for r in host}
    assert by_name["aten::convolution_backward"].calls_per_step == pytest.approx(convs)


def test_report_rows_start_with_a_summary():
    columns, rows = report_profile.rows(torch.device("cpu"), True)
    rows = list(rows)
    assert columns[:4] == ["net (batch)", "variant", "kind", "name"]
    assert rows[0][2] == "summary" and rows[0][3].startswith("wall ")
    assert {r[2] for r in rows[1:]} == {"cpu"} and all(len(r) == len(columns) for r in rows)
    with pytest.raises(ValueError, match="nets: expected names from"):
        report_profile.rows(torch.device("cpu"), True, nets=["nope"])
