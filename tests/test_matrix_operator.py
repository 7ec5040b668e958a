"""The geometry-free sparse-matrix operator against its dense matrix."""

import pytest
import torch

from operators import MatrixOperator
from operators.testing import dot_test


def make(seed=0):
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(6, 12, dtype=torch.float64, generator=g)
    dense[dense.abs() < 0.8] = 0
    return dense, MatrixOperator(dense.to_sparse(), (3, 4), (2, 3))


def test_forward_adjoint_batched_equal_dense():
    dense, op = make()
    x = torch.randn(5, 2, 3, 4, dtype=torch.float64)
    torch.testing.assert_close(op(x), (x.reshape(10, 12) @ dense.T).reshape(5, 2, 2, 3))
    y = torch.randn(4, 2, 3, dtype=torch.float64)
    torch.testing.assert_close(op.T(y), (y.reshape(4, 6) @ dense).reshape(4, 3, 4))
    assert op.T.T is op and op.matched
    assert dot_test(op) < 1e-12
    assert op.norm() == pytest.approx(float(torch.linalg.matrix_norm(dense, 2)), rel=1e-6)


def test_gradients_and_errors():
    _, op = make(1)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(op, (x,))
    with pytest.raises(ValueError, match="expected input"):
        op(torch.zeros(4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="does not match"):
        MatrixOperator(torch.zeros(5, 12).to_sparse(), (3, 4), (2, 3))
