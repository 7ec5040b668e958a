"""The operator contract (operators.base): every operator of the package satisfies it through
one base class, and one checker names what an object lacks."""

from __future__ import annotations

import pickle

import pytest
import torch

from operators import (
    FanBeam2D,
    LinearOperator,
    MatrixOperator,
    OperatorBase,
    RayTransform,
    VolumeGeometry,
    check_operator,
)
from operators.base import power_norm
from operators.subset import ViewSubset


def _ops():
    vol = VolumeGeometry(shape=(10, 10))
    ray = RayTransform(vol, FanBeam2D.default(vol, n_angles=7))
    n = 100
    A = ray(torch.eye(n, dtype=torch.float64).reshape(n, 10, 10)).reshape(n, -1).T
    mat = MatrixOperator(A.to_sparse(), (10, 10), tuple(ray.range_shape))
    return {"ray": ray, "matrix": mat, "subset": ViewSubset(ray, [0, 3, 5])}, A


@pytest.mark.parametrize("name", ["ray", "matrix", "subset"])
def test_every_operator_keeps_the_contract(name):
    ops, A = _ops()
    op = ops[name]
    assert isinstance(op, OperatorBase) and isinstance(op, LinearOperator)
    assert op.T.T is op and op.T.domain_shape == op.range_shape
    assert check_operator(op) == (tuple(op.domain_shape), tuple(op.range_shape))
    back = pickle.loads(pickle.dumps(op))
    x = torch.rand(op.domain_shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(back(x), op(x))
    assert back.T.T is back
    dense = A if name != "subset" else A.reshape(7, -1, 100)[[0, 3, 5]].reshape(-1, 100)
    ref = float(torch.linalg.matrix_norm(dense, ord=2))
    assert op.norm() == pytest.approx(ref, rel=1e-4)
    assert op.norm() is op.norm()  # cached per device and dtype


def test_power_norm_matches_dense_for_a_plain_operator():
    M = torch.randn(6, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    class Plain:
        domain_shape, range_shape = (4,), (6,)

        def __call__(self, x):
            return x @ M.T

        @property
        def T(self):  # noqa: N802
            return lambda y: y @ M

    assert power_norm(Plain(), tol=1e-12, iterations=500) == pytest.approx(
        float(torch.linalg.matrix_norm(M, ord=2)), rel=1e-6
    )


def test_checker_names_what_is_missing():
    class NoShapes:
        def __call__(self, x):
            return x

        T = property(lambda self: self)  # noqa: N815

    with pytest.raises(TypeError, match="no domain_shape, no range_shape"):
        check_operator(NoShapes())
    assert check_operator(NoShapes(), shapes=False) is None
    with pytest.raises(TypeError, match=r"no call \(A\(x\)\), no callable \.T"):
        check_operator(object(), shapes=False)
    ops, _ = _ops()

    class Unmatched(ViewSubset):  # a stand-in for an unmatched backend (ASTRA CUDA)
        matched = False

    bad = Unmatched(ops["ray"], [0, 1])
    with pytest.warns(UserWarning, match="not the exact transpose"):
        check_operator(bad)
    with pytest.raises(ValueError, match="not the exact transpose"):
        check_operator(bad, matched="require")
    assert check_operator(bad, matched="ignore")[0] == (10, 10)
