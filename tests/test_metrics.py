"""Metrics against closed forms and brute-force references."""

import math

import numpy as np
import pytest
import torch

from dip_uq import metrics as M


def test_psnr_closed_form():
    ref = torch.zeros(8, 8)
    ref[0, 0] = 2.0  # data range 2
    x = ref + 0.1
    assert M.psnr(x, ref) == pytest.approx(10 * math.log10(4 / 0.01))
    assert M.psnr(ref, ref) == math.inf
    with pytest.raises(ValueError, match="shapes differ"):
        M.psnr(torch.zeros(3), torch.zeros(4))


def test_ssim_identity_and_degradation_2d_3d():
    g = torch.Generator().manual_seed(0)
    for shape in [(32, 32), (12, 16, 16)]:
        ref = torch.rand(shape, generator=g)
        assert M.ssim(ref, ref) == pytest.approx(1.0)
        noisy = ref + 0.1 * torch.randn(shape, generator=g)
        worse = ref + 0.3 * torch.randn(shape, generator=g)
        assert 0 < M.ssim(worse, ref) < M.ssim(noisy, ref) < 1


def test_ssim_constant_images_closed_form():
    # two constant images a, b: SSIM = (2ab + c1) / (a^2 + b^2 + c1) (structure term is 1)
    a, b = torch.full((16, 16), 0.3), torch.full((16, 16), 0.5)
    c1 = (0.01 * 1.0) ** 2
    assert M.ssim(a, b, data_range=1.0) == pytest.approx((2 * 0.15 + c1) / (0.34 + c1))


def test_gaussian_nll_closed_form():
    y, m, v = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 2.0]), torch.tensor([4.0, 1.0])
    expected = np.mean([0.5 * (math.log(2 * math.pi * 4) + 1 / 4), 0.5 * math.log(2 * math.pi)])
    assert M.gaussian_nll(y, m, v) == pytest.approx(expected)
    with pytest.raises(ValueError, match="positive"):
        M.gaussian_nll(y, m, torch.zeros(2))


def test_exact_and_patch_log_likelihood_agree_for_diagonal_models():
    g = torch.Generator().manual_seed(1)
    shape = (6, 6)
    std = 0.5 + torch.rand(shape, generator=g, dtype=torch.float64)
    mean = torch.randn(shape, generator=g, dtype=torch.float64)
    x = mean + std * torch.randn(shape, generator=g, dtype=torch.float64)
    exact = M.exact_test_log_likelihood(x, mean, torch.diag(std.reshape(-1) ** 2))
    ref = float(torch.distributions.Normal(mean, std).log_prob(x).mean())
    assert exact == pytest.approx(ref, rel=1e-10)
    # p = 1 patches use only the per-voxel sample variance: with samples whose second
    # moment is exactly std^2 (+-std pairs) they reproduce the diagonal model exactly.
    samples = torch.stack([std, -std])
    assert M.patch_log_likelihood(x, mean, samples, patch_size=1) == pytest.approx(ref, rel=1e-6)


def test_patch_log_likelihood_matches_brute_force_blocks():
    g = torch.Generator().manual_seed(2)
    shape = (4, 6)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    mean = torch.zeros(shape, dtype=torch.float64)
    s = torch.randn(50, *shape, generator=g, dtype=torch.float64)
    got = M.patch_log_likelihood(x, mean, s, patch_size=2, shrinkage=0.5, delta=0.1)
    total = 0.0
    for i in range(0, 4, 2):
        for j in range(0, 6, 2):
            z = s[:, i : i + 2, j : j + 2].reshape(50, 4)
            c = z.T @ z / 50
            c = c * (0.5 + 0.5 * torch.eye(4, dtype=torch.float64)) + 0.1 * torch.eye(
                4, dtype=torch.float64
            )
            e = x[i : i + 2, j : j + 2].reshape(4)
            total += float(
                torch.distributions.MultivariateNormal(
                    torch.zeros(4, dtype=torch.float64), c
                ).log_prob(e)
            )
    assert got == pytest.approx(total / 24, rel=1e-6)
    # 3D volumes with p = 2 patches run and crop the remainder
    v = torch.randn(5, 4, 4, dtype=torch.float64)
    out = M.patch_log_likelihood(
        v, torch.zeros_like(v), torch.randn(30, 5, 4, 4, dtype=torch.float64), patch_size=2
    )
    assert math.isfinite(out)
    with pytest.raises(ValueError, match="samples must be"):
        M.patch_log_likelihood(x, mean, s[:, :2], patch_size=2)


def test_coverage_and_calibration_of_a_calibrated_gaussian():
    g = torch.Generator().manual_seed(3)
    n = 200_000
    std = 0.1 + torch.rand(n, generator=g, dtype=torch.float64)
    x = std * torch.randn(n, generator=g, dtype=torch.float64)
    cov = M.coverage(x, torch.zeros(n), std)
    for level, observed in cov.items():
        assert observed == pytest.approx(level, abs=0.005)
    levels, obs = M.calibration_curve(x, torch.zeros(n), std)
    assert torch.allclose(levels, obs, atol=0.005)
    # an overconfident predictive (std halved) under-covers
    assert M.coverage(x, torch.zeros(n), std / 2)[0.9] < 0.7
    z = M.zscore_stats(x, torch.zeros(n), std)
    assert z["mean"] == pytest.approx(0, abs=0.01) and z["std"] == pytest.approx(1, abs=0.01)


def test_std_error_correlation_and_ause():
    g = torch.Generator().manual_seed(4)
    std = torch.rand(5000, generator=g, dtype=torch.float64)
    err = std * torch.randn(5000, generator=g, dtype=torch.float64)
    assert M.std_error_correlation(err, 0 * err, std) > 0.3
    assert M.ause(err.abs(), err.abs()) == pytest.approx(0.0, abs=1e-12)  # oracle ranking
    assert M.ause(err, std) < M.ause(err, torch.rand(5000, generator=g, dtype=torch.float64))


def test_classification_metrics_closed_forms():
    probs = torch.tensor([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7], [0.8, 0.2]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 0])
    assert M.accuracy(probs, labels) == pytest.approx(0.75)
    nll = -np.mean(np.log([0.9, 0.4, 0.7, 0.8]))
    assert M.classification_nll(probs, labels) == pytest.approx(nll)
    brier = np.mean([2 * 0.1**2, 2 * 0.6**2, 2 * 0.3**2, 2 * 0.2**2])
    assert M.brier_score(probs, labels) == pytest.approx(brier)
    # one bin holding everything: ECE = |accuracy - mean confidence|
    conf = np.mean([0.9, 0.6, 0.7, 0.8])
    assert M.expected_calibration_error(probs, labels, n_bins=1) == pytest.approx(abs(0.75 - conf))
    assert M.expected_calibration_error(probs, labels, n_bins=1, adaptive=True) == pytest.approx(
        abs(0.75 - conf)
    )
    # two equal-width bins: [0.5, 1) splits at 0.5 -> confidences 0.6 | 0.7, 0.8, 0.9 fall in bin 2
    ece2 = M.expected_calibration_error(probs, labels, n_bins=2)
    assert ece2 == pytest.approx(abs(0.75 - conf))
    with pytest.raises(ValueError, match="out of range"):
        M.accuracy(probs, torch.tensor([0, 1, 2, 0]))
