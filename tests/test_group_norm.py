"""kdiff.nets.GroupNorm32: float32 statistics for every input dtype; bfloat16 without a float32 round trip.

Oracle: ``F.group_norm`` in float64 on the same (bfloat16-valued) input with the float32 parameters. Rule for
the bfloat16 path, output and every gradient: ``err <= 2 * err(float32 round trip) + atol`` with atol one
bfloat16 unit in the last place of the largest reference value (the affine weight and bias are rounded to
bfloat16, as autocast rounds conv and linear weights).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kdiff.nets import GroupNorm32
from torch.utils._python_dispatch import TorchDispatchMode

pytestmark = pytest.mark.usefixtures("single_thread")


def _norm(channels: int = 32, groups: int = 8, seed: int = 0) -> GroupNorm32:
    gen = torch.Generator().manual_seed(seed)
    gn = GroupNorm32(groups, channels)
    with torch.no_grad():
        gn.weight.copy_(1 + 0.5 * torch.randn(channels, generator=gen))
        gn.bias.copy_(0.3 * torch.randn(channels, generator=gen))
    return gn


def _inputs(shape: tuple[int, ...], seed: int, *, offset: float) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(shape, generator=gen) + offset).bfloat16()
    dy = torch.randn(shape, generator=gen).bfloat16()
    return x, dy


def _run(gn: GroupNorm32, x: torch.Tensor, dy: torch.Tensor, mode: str) -> tuple[torch.Tensor, ...]:
    """(y, dx, dweight, dbias): mode "kdiff" (GroupNorm32 under bf16 autocast), "fp32" (float32 round trip),
    "ref" (float64)."""
    gn.zero_grad()
    if mode == "ref":
        xx = x.double().requires_grad_()
        y = F.group_norm(xx, gn.num_groups, gn.weight.double(), gn.bias.double(), gn.eps)
        y.backward(dy.double())
        return y.detach(), xx.grad, gn.weight.grad.clone(), gn.bias.grad.clone()
    xx = x.clone().requires_grad_()
    if mode == "kdiff":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = gn(xx)
    else:
        y = F.group_norm(xx.float(), gn.num_groups, gn.weight, gn.bias, gn.eps).to(x.dtype)
    y.backward(dy)
    return y.detach(), xx.grad, gn.weight.grad.clone(), gn.bias.grad.clone()


@pytest.mark.parametrize("shape, groups, offset, seed", [
    ((4, 32, 16, 16), 8, 0.0, 0),
    ((2, 64, 8, 8), 32, 2.0, 1),     # a mean of 2 sigma/3: the variance must not cancel
    ((3, 32, 7, 5), 1, -5.0, 2),     # odd sizes, one group
])
def test_bfloat16_path_matches_float64_within_the_float32_round_trip_rule(shape, groups, offset, seed):
    gn = _norm(shape[1], groups, seed)
    x, dy = _inputs(shape, seed, offset=offset)
    ref, fp32, got = _run(gn, x, dy, "ref"), _run(gn, x, dy, "fp32"), _run(gn, x, dy, "kdiff")
    assert got[0].dtype == got[1].dtype == torch.bfloat16
    assert got[2].dtype == got[3].dtype == torch.float32
    for name, g, f, r in zip(("y", "dx", "dweight", "dbias"), got, fp32, ref):
        err, err_fp32 = (g.double() - r).abs().max().item(), (f.double() - r).abs().max().item()
        atol = 2.0**-8 * r.abs().max().item()
        assert err <= 2 * err_fp32 + atol, f"{name}: err {err:.3g}, float32 round trip {err_fp32:.3g}"


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, list[torch.dtype]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        self.seen.append((str(func), [o.dtype for o in outs if isinstance(o, torch.Tensor) and o.dim() == 4]))
        return out


def test_bfloat16_activations_are_never_copied_to_float32():
    gn = _norm()
    x, dy = _inputs((2, 32, 8, 8), 3, offset=0.0)
    x.requires_grad_()
    with _Ops() as ops:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = gn(x)
        y.backward(dy)
    four_d = [(name, dtypes) for name, dtypes in ops.seen if dtypes]
    assert any("native_group_norm.default" in name for name, _ in four_d), four_d
    assert all(dtype == torch.bfloat16 for _, dtypes in four_d for dtype in dtypes), four_d


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_other_dtypes_normalize_in_float32_at_least(dtype):
    gn = _norm().to(torch.float64 if dtype == torch.float64 else torch.float32)
    gen = torch.Generator().manual_seed(4)
    x = (3 * torch.randn(2, 32, 8, 8, generator=gen) + 1).to(dtype)
    acc = torch.promote_types(dtype, torch.float32)
    want = F.group_norm(x.to(acc), 8, gn.weight.to(acc), gn.bias.to(acc), gn.eps).to(dtype)
    assert torch.equal(gn(x), want)


@pytest.mark.gpu
@pytest.mark.parametrize("shape, groups, offset", [((256, 64, 32, 32), 32, 0.0), ((8, 128, 16, 16), 32, 3.0)])
def test_cuda_bfloat16_path_matches_float64(shape, groups, offset):
    """On CUDA the weight and bias are rounded to bfloat16; same rule, on the GPU."""
    gn = _norm(shape[1], groups, 5).cuda()
    x, dy = (t.cuda() for t in _inputs(shape, 5, offset=offset))

    def run(mode: str) -> tuple[torch.Tensor, ...]:
        gn.zero_grad()
        xx = (x.double() if mode == "ref" else x.clone()).requires_grad_()
        if mode == "ref":
            y = F.group_norm(xx, groups, gn.weight.double(), gn.bias.double(), gn.eps)
        elif mode == "fp32":
            y = F.group_norm(xx.float(), groups, gn.weight, gn.bias, gn.eps).to(x.dtype)
        else:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = gn(xx)
        y.backward(dy.to(y.dtype))
        return y.detach(), xx.grad, gn.weight.grad.clone(), gn.bias.grad.clone()

    ref, fp32, got = run("ref"), run("fp32"), run("kdiff")
    assert got[0].dtype == got[1].dtype == torch.bfloat16
    for name, g, f, r in zip(("y", "dx", "dweight", "dbias"), got, fp32, ref):
        err, err_fp32 = (g.double() - r).abs().max().item(), (f.double() - r).abs().max().item()
        assert err <= 2 * err_fp32 + 2.0**-8 * r.abs().max().item(), f"{name}: {err:.3g} vs {err_fp32:.3g}"
