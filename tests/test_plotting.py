import matplotlib.image as mpimg
import numpy as np
import pytest
import torch

from dip_uq.plotting import central_slices, save_panel


def test_central_slices_orders():
    v = torch.arange(2 * 3 * 4.0).reshape(2, 3, 4)
    names = [n for n, _ in central_slices(v)]
    shapes = [s.shape for _, s in central_slices(v)]
    assert names == ["z=1", "y=1", "x=2"] and shapes == [(3, 4), (2, 4), (2, 3)]
    np.testing.assert_array_equal(central_slices(v)[2][1], v[:, :, 2].numpy())
    with pytest.raises(ValueError, match="2D image or 3D"):
        central_slices(torch.zeros(3))


@pytest.mark.parametrize("shape", [(16, 16), (8, 10, 12)])
def test_panel_is_written_atomically(tmp_path, shape):
    x = torch.rand(shape)
    out = save_panel(
        tmp_path / "panel.png",
        {"reconstruction": x, "std": x / 10, "|error|": x.abs()},
        calibration=([0.1, 0.5, 0.9], [0.12, 0.48, 0.88]),
        title="t",
    )
    img = mpimg.imread(out)
    assert img.ndim == 3 and img.shape[0] > 100
    assert [p.name for p in tmp_path.iterdir()] == ["panel.png"]  # no temporary left behind
