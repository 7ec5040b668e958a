"""Anisotropic TV and its subgradient against hand-computed values and a brute-force loop."""

import itertools

import pytest
import torch

from dip_uq.dip.tv import tv, tv_subgradient


def _tv_loop(x: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Obviously-correct reference: visit every voxel and every forward neighbour."""
    total, g = 0.0, torch.zeros_like(x, dtype=torch.float64)
    for idx in itertools.product(*(range(n) for n in x.shape)):
        for a in range(x.ndim):
            nb = list(idx)
            nb[a] += 1
            if nb[a] >= x.shape[a]:
                continue
            d = float(x[tuple(nb)] - x[idx])
            total += abs(d)
            s = (d > 0) - (d < 0)
            g[tuple(nb)] += s
            g[idx] -= s
    return total, g


def test_2d_hand_values():
    x = torch.tensor([[0.0, 1.0, 3.0], [2.0, 2.0, 0.0]])
    # vertical |2|+|1|+|-3| = 6; horizontal |1|+|2| + |0|+|-2| = 5
    assert tv(x).item() == 11.0
    expected = torch.tensor([[-2.0, -1.0, 2.0], [1.0, 2.0, -2.0]])
    assert torch.equal(tv_subgradient(x), expected)


def test_3d_hand_values():
    x = torch.arange(8.0).reshape(2, 2, 2)
    # z pairs differ by 4 (4 pairs), y by 2 (4 pairs), x by 1 (4 pairs)
    assert tv(x).item() == 16 + 8 + 4
    z, yy, xx = torch.meshgrid(*(torch.arange(2.0),) * 3, indexing="ij")
    assert torch.equal(tv_subgradient(x), (2 * z - 1) + (2 * yy - 1) + (2 * xx - 1))


def test_flat_regions_and_boundaries_get_zero_sign():
    x = torch.tensor([[5.0, 5.0, 5.0, 7.0]])
    assert tv(x).item() == 2.0
    # only the last pair differs: voxel 2 gets -1, voxel 3 (boundary) +1
    assert torch.equal(tv_subgradient(x), torch.tensor([[0.0, 0.0, -1.0, 1.0]]))
    assert tv(torch.full((4, 4, 4), 3.0)).item() == 0.0
    assert torch.equal(tv_subgradient(torch.full((3, 3), 3.0)), torch.zeros(3, 3))


@pytest.mark.parametrize("shape", [(5, 7), (1, 6), (3, 4, 5), (4, 1, 3)])
def test_matches_loop_and_autograd(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-2, 3, shape, generator=g).double()  # integers: many exact ties
    ref_tv, ref_g = _tv_loop(x)
    assert tv(x).item() == pytest.approx(ref_tv)
    assert torch.equal(tv_subgradient(x), ref_g)
    xr = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    tv(xr).backward()
    assert torch.allclose(xr.grad, tv_subgradient(xr.detach()))


def test_leading_dims_are_summed():
    x = torch.randn(2, 1, 6, 6, dtype=torch.float64)
    assert tv(x, ndim=2).item() == pytest.approx(tv(x[0, 0]).item() + tv(x[1, 0]).item())
    g = tv_subgradient(x, ndim=2)
    assert torch.equal(g[1, 0], tv_subgradient(x[1, 0]))
    # a 3D TV of the same tensor also couples the channel axis of size 1: nothing to add
    assert tv(x[0], ndim=3).item() == pytest.approx(tv(x[0, 0]).item())


def test_bad_ndim():
    with pytest.raises(ValueError, match="pass ndim"):
        tv(torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match="ndim must be 2 or 3"):
        tv_subgradient(torch.zeros(4, 4), ndim=1)
