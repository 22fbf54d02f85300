"""Invertible 1×1 convolutions: one channel matrix, log-det against slogdet, round trips."""

from __future__ import annotations

import pytest
import torch

import p4opt
from p4opt.nn import InvertibleConv1x1

F64 = torch.float64


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_a_1x1_conv_weight_is_one_channel_matrix(dims):
    conv = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d, 3: torch.nn.Conv3d}[dims](5, 5, 1, dtype=F64)
    with torch.no_grad():
        conv.weight.add_(torch.eye(5, dtype=F64).reshape(5, 5, *([1] * dims)))
    pert = p4opt.register(conv, "weight", p4opt.Invertible())
    opt = p4opt.P4Optimizer(torch.optim.Adam(conv.parameters(), lr=1e-2))
    x = torch.randn(4, 5, *([3] * dims), dtype=F64)
    for _ in range(5):
        (conv(x) - x.flip(1)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    matrix = conv.weight.detach().reshape(5, 5)
    assert pert.logabsdet().shape == ()
    assert abs(float(pert.logabsdet().detach() - torch.linalg.slogdet(matrix)[1])) < 1e-12
    assert pert.validate().ok and opt.stats["merges_accepted"] == 5


def test_invertible_conv1x1_round_trip_and_log_det():
    torch.manual_seed(0)
    layer = InvertibleConv1x1(4, dtype=F64)
    with torch.no_grad():
        layer.perturbation.delta.normal_(std=0.1)  # a pending change: the dense paths
    x = torch.randn(3, 4, 5, 6, dtype=F64)
    y, ladj = layer.forward_and_log_det(x)
    x_back, ladj_inv = layer.inverse_and_log_det(y)
    assert (x_back - x).abs().max() < 1e-12 and torch.allclose(ladj_inv, -ladj)
    jac = torch.linalg.slogdet(layer.weight.detach())[1] * 30  # H * W positions
    assert (ladj - jac).abs().max() < 1e-10
    ref = torch.nn.functional.conv2d(x, layer.weight.detach()[:, :, None, None])
    assert (y - ref).abs().max() < 1e-12


def test_invertible_conv1x1_trains_to_a_gaussian_and_stays_exact():
    torch.manual_seed(0)
    scales = torch.diag(torch.tensor([3.0, 1.0, 0.5, 0.2], dtype=F64))
    mix = torch.linalg.qr(torch.randn(4, 4, dtype=F64))[0] @ scales
    x = torch.einsum("oc,bchw->bohw", mix, torch.randn(64, 4, 4, 4, dtype=F64))
    layer = InvertibleConv1x1(4, dtype=F64)
    opt = p4opt.P4Optimizer(torch.optim.Adam(layer.parameters(), lr=3e-2))

    def nll() -> torch.Tensor:
        z, ladj = layer.forward_and_log_det(x)
        return (0.5 * z.square().sum((1, 2, 3)) - ladj).mean() / 64

    first = float(nll().detach())
    for _ in range(300):
        loss = nll()
        loss.backward()
        opt.step()
        opt.zero_grad()
    cov = torch.einsum("bchw,bdhw->cd", x, x) / (64 * 16)
    best = 0.5 * 4 + 0.5 * float(torch.linalg.slogdet(cov)[1])  # per position, at W = cov^{-1/2}
    assert float(nll().detach()) - best < 1e-3 * (first - best)
    assert layer.perturbation.validate().ok


def test_shape_errors_name_the_expected_layout():
    layer = InvertibleConv1x1(3)
    with pytest.raises(p4opt.ShapeError, match=r"\(batch, 3, \*spatial\)"):
        layer(torch.randn(2, 4, 5))
