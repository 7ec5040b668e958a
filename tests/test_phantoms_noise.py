"""Phantoms (values, orientation, determinism) and noise models (statistics, bad input)."""

import math

import pytest
import torch

from operators import Parallel2D, RayTransform, VolumeGeometry
from operators.noise import (
    LODOPAB_MU_MAX,
    LODOPAB_PHOTONS,
    add_gaussian_noise,
    add_poisson_noise,
)
from operators.phantoms import (
    point_sources,
    random_ellipses,
    random_ellipsoids,
    rectangles,
    shepp_logan_2d,
    shepp_logan_3d,
)


def idx(coord: float, n: int) -> int:
    """Index of the voxel containing normalised coordinate ``coord`` in [-1, 1]."""
    return min(n - 1, int((coord + 1) / 2 * n))


# ---------------------------------------------------------------------------------------
# Shepp-Logan
# ---------------------------------------------------------------------------------------


def test_shepp_logan_2d_values_and_orientation():
    n = 200
    img = shepp_logan_2d(n, dtype=torch.float64)
    assert img.shape == (n, n) and img.dtype == torch.float64
    assert float(img.min()) == 0.0 and float(img.max()) == 1.0

    def at(x: float, y: float) -> float:
        return float(img[idx(y, n), idx(x, n)])  # row <-> y, column <-> x

    assert at(0.0, 0.95) == 0.0  # outside
    assert at(0.0, 0.9) == 1.0  # skull (top)
    assert at(0.0, 0.35) == pytest.approx(0.3)  # ellipse at y = +0.35: upper half, rows > n/2
    assert at(0.0, -0.3) == pytest.approx(0.2)  # brain
    assert at(0.22, 0.0) == pytest.approx(0.0)  # right dark ellipse (x > 0: larger column)
    assert at(-0.22, 0.25) == pytest.approx(0.0)  # left one is the taller one
    assert at(0.22, 0.25) == pytest.approx(0.2)
    assert at(0.0, -0.605) == pytest.approx(0.3)  # small ellipses at the bottom
    # upright with origin="lower": more structure above the centre row than at y = -0.35
    orig = shepp_logan_2d(n, modified=False, dtype=torch.float64)
    assert float(orig.max()) == pytest.approx(2.0)
    assert float(orig[idx(-0.3, n), idx(0.0, n)]) == pytest.approx(1.02)


def test_shepp_logan_3d_values_and_orientation():
    n = 64
    vol = shepp_logan_3d(n, dtype=torch.float64)
    assert vol.shape == (n, n, n)
    assert float(vol.min()) == 0.0 and float(vol.max()) == 1.0

    def at(x: float, y: float, z: float) -> float:
        return float(vol[idx(z, n), idx(y, n), idx(x, n)])

    # ellipsoids 6 and 7 are centred at z = +0.25, ellipsoid 5 at z = -0.15
    assert at(0.0, 0.1, 0.25) == pytest.approx(0.3)
    assert at(0.0, 0.1, -0.6) == pytest.approx(0.2)  # below them: plain brain
    assert at(0.0, 0.35, -0.15) == pytest.approx(0.3)
    assert at(0.0, 0.0, 0.85) == 0.0 and at(0.0, 0.0, 0.79) == pytest.approx(1.0)  # c = 0.81
    # its central slice resembles the 2D phantom (same ellipse family, tilt differs)
    sl = vol[n // 2]
    assert float((sl - shepp_logan_2d(n, dtype=torch.float64)).abs().mean()) < 0.05


def test_shepp_logan_bad_input():
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        shepp_logan_2d((4, 4, 4))
    with pytest.raises(ValueError, match="positive"):
        shepp_logan_3d((4, 0, 4))
    with pytest.raises(TypeError, match="floating point"):
        shepp_logan_2d(8, dtype=torch.int64)


# ---------------------------------------------------------------------------------------
# Random phantoms
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda g: random_ellipses((40, 30), generator=g), (40, 30)),
        (lambda g: random_ellipsoids((12, 16, 20), generator=g), (12, 16, 20)),
        (lambda g: rectangles((24, 24), n=4, generator=g), (24, 24)),
        (lambda g: rectangles((10, 12, 14), n=3, generator=g), (10, 12, 14)),
    ],
    ids=["ellipses", "ellipsoids", "rectangles-2d", "boxes-3d"],
)
def test_random_phantoms_are_seeded_and_in_range(make, shape):
    a = make(torch.Generator().manual_seed(5))
    b = make(torch.Generator().manual_seed(5))
    c = make(torch.Generator().manual_seed(6))
    assert a.shape == shape and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0 and float(a.max()) > 0


def test_random_ellipses_options():
    g = torch.Generator().manual_seed(0)
    one = random_ellipses(
        64, n_ellipses=1, value_range=(0.5, 0.5), generator=g, dtype=torch.float64
    )
    assert one.dtype == torch.float64
    assert set(torch.unique(one).tolist()) == {0.0, 1.0}  # a single ellipse, normalised
    # every ellipse centre lies in the disc of the given radius: the corners stay empty
    many = random_ellipses(64, n_ellipses=50, axis_range=(0.02, 0.05), radius=0.5, generator=g)
    yy, xx = torch.meshgrid(*(torch.linspace(-1, 1, 64),) * 2, indexing="ij")
    assert float(many[(xx**2 + yy**2) > 0.6**2].abs().max()) == 0.0
    with pytest.raises(ValueError, match="n_ellipses"):
        random_ellipses(8, n_ellipses=0)
    with pytest.raises(ValueError, match="value_range"):
        random_ellipses(8, value_range=(1.0, 0.0))


def test_rectangles_are_piecewise_constant_with_drawn_values():
    img = rectangles(
        (32, 32), n=3, value_range=(0.3, 0.9), generator=torch.Generator().manual_seed(2)
    )
    vals = set(torch.unique(img).tolist()) - {0.0}
    assert 1 <= len(vals) <= 3 and all(0.3 <= v <= 0.9 for v in vals)
    assert float(img[0].abs().max()) == 0.0  # boxes stay inside [-0.9, 0.9]
    with pytest.raises(ValueError, match="shape"):
        rectangles((4,))


def test_point_sources_integer_and_fractional():
    img = point_sources((6, 7), [[1, 2], [4, 6]], mass=[2.0, 3.0], dtype=torch.float64)
    assert float(img[1, 2]) == 2.0 and float(img[4, 6]) == 3.0 and float(img.sum()) == 5.0
    pos = torch.tensor([[2.25, 3.5, 1.0]], dtype=torch.float64)
    vol = point_sources((5, 6, 4), pos, dtype=torch.float64)
    assert float(vol.sum()) == pytest.approx(1.0)
    grids = torch.meshgrid(
        *(torch.arange(s, dtype=torch.float64) for s in vol.shape), indexing="ij"
    )
    com = torch.stack([(g * vol).sum() for g in grids])
    torch.testing.assert_close(com, pos[0])  # centre of mass preserved
    assert int((vol > 0).sum()) == 4  # split over 2 x 2 voxels (third coordinate integer)
    edge = point_sources((4, 4), [[3, 3]])  # the last voxel is valid
    assert float(edge[3, 3]) == 1.0
    with pytest.raises(ValueError, match="outside the image"):
        point_sources((4, 4), [[4, 0]])
    with pytest.raises(ValueError, match=r"\(k, 2\)"):
        point_sources((4, 4), [[1, 2, 3]])


def test_phantoms_agree_with_projection_conventions():
    """Upright phantoms: a point at world (x, y) lands where the geometry says."""
    vol = VolumeGeometry(shape=(32, 32))
    geom = Parallel2D(angles=(0.0, math.pi / 2), det_count=48)
    op = RayTransform(vol, geom)
    img = point_sources((32, 32), [[24, 8]])  # row 24 -> y = +8.5, column 8 -> x = -7.5
    sino = op(img.double())
    expected = geom.project_point((-7.5, 8.5))[:, 1]
    got = (sino * torch.arange(48)).sum(1) / sino.sum(1)
    torch.testing.assert_close(got, torch.as_tensor(expected), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------
# Noise
# ---------------------------------------------------------------------------------------


def test_gaussian_noise_std_matches_relative_level():
    g = torch.Generator().manual_seed(0)
    y = torch.rand(200, 300, generator=g, dtype=torch.float64) * 4 - 1  # some negative data
    noisy, std = add_gaussian_noise(y, rel=0.05, generator=g)
    assert std == pytest.approx(0.05 * float(y.abs().mean()), rel=1e-12)
    resid = noisy - y
    n = resid.numel()
    assert abs(float(resid.mean())) < 4 * std / math.sqrt(n)
    assert float(resid.std()) == pytest.approx(std, rel=4 * math.sqrt(1 / (2 * n)))
    same, _ = add_gaussian_noise(y, rel=0.05, generator=torch.Generator().manual_seed(1))
    again, _ = add_gaussian_noise(y, rel=0.05, generator=torch.Generator().manual_seed(1))
    assert torch.equal(same, again) and not torch.equal(same, noisy)
    zero, s0 = add_gaussian_noise(y.float(), rel=0.0)
    assert s0 == 0.0 and torch.equal(zero, y.float()) and zero.dtype == torch.float32


def test_gaussian_noise_on_projections():
    vol = VolumeGeometry(shape=(32, 32))
    op = RayTransform(vol, Parallel2D.default(vol, n_angles=40))
    ax = op(shepp_logan_2d(32))
    noisy, std = add_gaussian_noise(ax, rel=0.1, generator=torch.Generator().manual_seed(4))
    assert noisy.shape == ax.shape and std == pytest.approx(0.1 * float(ax.abs().mean()), rel=1e-6)


def test_gaussian_noise_bad_input():
    y = torch.ones(4)
    with pytest.raises(ValueError, match="rel must be"):
        add_gaussian_noise(y, rel=-0.1)
    with pytest.raises(ValueError, match="NaN"):
        add_gaussian_noise(torch.tensor([1.0, float("nan")]))
    with pytest.raises(TypeError, match="floating-point"):
        add_gaussian_noise(torch.ones(3, dtype=torch.int64))


@pytest.mark.parametrize("mu_max", [None, LODOPAB_MU_MAX])
def test_poisson_post_log_noise_first_order_statistics(mu_max):
    s = 1.0 if mu_max is None else mu_max
    photons = 1.0e4
    n = 200_000
    for line_integral in (0.3, 2.0):  # physical (dimensionless) line integrals
        y = torch.full((n,), line_integral / s, dtype=torch.float64)
        out = add_poisson_noise(
            y, photons=photons, mu_max=mu_max, generator=torch.Generator().manual_seed(7)
        )
        var_model = math.exp(line_integral) / (photons * s**2)  # first-order (delta method)
        assert float(out.var()) == pytest.approx(var_model, rel=0.03)
        bias = float(out.mean()) - line_integral / s
        # second-order bias is +var/2 * s; well below one standard deviation of the noise
        assert abs(bias) < 0.1 * math.sqrt(var_model)


def test_poisson_noise_zero_counts_and_lodopab_units():
    y = torch.full((1000,), 50.0, dtype=torch.float32)  # exp(-50) * 10 photons: always 0
    out = add_poisson_noise(y, photons=10.0)
    torch.testing.assert_close(out, torch.full_like(y, -math.log(0.1 / 10.0)))
    assert out.dtype == torch.float32
    # LoDoPaB: observations are divided by mu_max, so their zero-count ceiling is ~0.11
    big = torch.full((10,), 1.0)
    cap = add_poisson_noise(big, photons=LODOPAB_PHOTONS, mu_max=LODOPAB_MU_MAX)
    torch.testing.assert_close(cap, torch.full_like(big, -math.log(0.1 / 4096) / 81.35858))


def test_poisson_noise_determinism_and_bad_input():
    y = torch.rand(50, generator=torch.Generator().manual_seed(0))
    a = add_poisson_noise(y, photons=100.0, generator=torch.Generator().manual_seed(3))
    b = add_poisson_noise(y, photons=100.0, generator=torch.Generator().manual_seed(3))
    c = add_poisson_noise(y, photons=100.0, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    for bad in (0.0, -5.0, float("inf")):
        with pytest.raises(ValueError, match="photons must be"):
            add_poisson_noise(y, photons=bad)
    with pytest.raises(ValueError, match="mu_max must be"):
        add_poisson_noise(y, photons=10.0, mu_max=0.0)
    with pytest.raises(ValueError, match="NaN"):
        add_poisson_noise(torch.tensor([float("nan")]), photons=10.0)


@pytest.mark.cuda
def test_noise_and_phantoms_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    y = torch.rand(1000, device="cuda")
    noisy, _ = add_gaussian_noise(y, generator=torch.Generator(device="cuda").manual_seed(0))
    assert noisy.device.type == "cuda"
    # a CPU generator still works for CUDA data (drawn on the CPU, then moved)
    noisy2, _ = add_gaussian_noise(y, generator=torch.Generator().manual_seed(0))
    assert noisy2.device.type == "cuda"
    out = add_poisson_noise(y, photons=100.0, generator=torch.Generator().manual_seed(0))
    assert out.device.type == "cuda"
    img = random_ellipses(16, generator=torch.Generator().manual_seed(0), device="cuda")
    torch.testing.assert_close(
        img.cpu(), random_ellipses(16, generator=torch.Generator().manual_seed(0))
    )
