"""The bad-input battery (issue 18): no silent wrong answers.

One table, in the style of deepinv's operator registry: each case is ``(id, entry point,
expected exception type, words its message must contain)``, run by one parametrised test. The
entry points are the API (operators, geometry files, data files, ``fit_dip``,
``reconstruct_with_uncertainty``, ``UQConfig``, ``UQResult``, ``evaluate_uq``, ``Laplace``)
and the command line (``dip_uq.cli.main`` in-process: exit status 2 and the message on
stderr). The classes covered: shapes, dtypes, devices, NaN/inf, empty tensors, impossible
geometries, malformed files, bad options, resume under changed settings, a checkpoint
directory that is a file, and (tests after the table) interruption and the caller's network.

Sizes are tiny (8² and 16² volumes, four views) and every error is raised before any
expensive work, so the whole module runs in seconds.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from _bad_input_env import (
    FAST,
    NAN,
    PAR,
    TINY_UQ,
    V8,
    V8_3D,
    V16,
    X3,
    A,
    CLIExit,
    X,
    Y,
    build_env,
    cli,
    cone,
    cone_vec,
    fan,
    fit_laplace,
    geometry_json,
    laplace,
    nan_matrix_operator,
    read_geometry,
    reconstruct_argv,
    text_file,
    tiny_net,
    uncertainty_argv,
    with_value,
)

from dip_uq import UQResult, reconstruct_with_uncertainty
from dip_uq.dip import fit_dip
from dip_uq.dip.trainer import CHECKPOINT_NAME
from dip_uq.errors import CheckpointError, DataFormatError, GeometryFileError
from dip_uq.io.arrays import read_array
from dip_uq.io.geometry_file import read_geometry_file
from dip_uq.uq.config import UQConfig
from dip_uq.uq.evaluation import evaluate_uq
from operators import (
    MatrixOperator,
    Parallel2D,
    Parallel3D,
    RayTransform,
    VolumeGeometry,
    check_operator,
)
from operators.errors import BackendUnavailable, GeometryError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The files and finished runs the cases read (``tests/_bad_input_env.py``)."""
    return build_env(tmp_path_factory.mktemp("bad_inputs"))


# ------------------------------------------------------------------------------ the table
@dataclass(frozen=True)
class Case:
    id: str
    call: Callable  # call(env)
    error: type[BaseException]
    words: tuple[str, ...]


def case(id: str, call: Callable, error: type[BaseException], *words: str) -> Case:
    return Case(id, call, error, words)


CASES = [
    # -- impossible geometries: refused when the operator is built ------------------------
    case("fan-source-inside-volume", lambda e: RayTransform(V16, fan(4, 10)), GeometryError,
         "FanBeam2D", "source lies inside the volume", "src_origin=4 must exceed 11.31"),
    case("cone-source-inside-volume", lambda e: RayTransform(V8_3D, cone(2, 10)), GeometryError,
         "ConeBeam3D", "source lies inside the volume", "src_origin=2 must exceed 5.657"),
    case("fan-detector-on-source-side", lambda e: RayTransform(V16, fan(40, -30)), GeometryError,
         "detector lies between the source and the volume", "origin_det=-30", "10", "40"),
    case("cone-detector-on-source-side", lambda e: RayTransform(V8_3D, cone(40, -30)),
         GeometryError, "detector lies between the source and the volume", "origin_det=-30"),
    case("cone-vec-source-inside-volume",
         lambda e: RayTransform(V8_3D, cone(2, 10).to_vec_geometry()), GeometryError,
         "ConeVec3D", "source lies inside the volume", "move the source"),
    case("geometry-volume-dimension", lambda e: RayTransform(V8, Parallel3D.default(V8_3D)),
         GeometryError, "3D Parallel3D", "2D volume", "(8, 8)"),
    case("empty-angle-list", lambda e: Parallel2D(angles=[], det_count=4), GeometryError,
         "angle list is empty"),
    case("nan-angle", lambda e: Parallel2D(angles=[0.0, NAN], det_count=4), GeometryError,
         "angles contain NaN"),
    case("det-count-zero", lambda e: Parallel2D(angles=[0.0], det_count=0), GeometryError,
         "det_count", "got 0"),
    case("negative-voxel-size", lambda e: VolumeGeometry(shape=(8, 8), voxel_size=-1),
         GeometryError, "voxel_size", "-1"),
    case("one-dimensional-volume", lambda e: VolumeGeometry(shape=(8,)), GeometryError,
         "(H, W) or (D, H, W)", "(8,)"),
    case("volume-with-zero-extent", lambda e: VolumeGeometry(shape=(8, 0)), GeometryError,
         ">= 1", "(8, 0)"),
    case("unknown-backend", lambda e: RayTransform(V8, PAR, backend="bogus"),
         BackendUnavailable, "unknown backend 'bogus'"),
    case("volume-not-a-geometry", lambda e: RayTransform((8, 8), PAR), TypeError,
         "VolumeGeometry", "tuple"),
    # -- operators: shapes, dtypes, devices, NaN, empty -----------------------------------
    case("op-volume-shape", lambda e: A(torch.zeros(7, 8)), ValueError,
         "volume shape mismatch", "(..., 8, 8)", "(7, 8)"),
    case("op-sinogram-shape", lambda e: A.T(torch.zeros(3, 12)), ValueError,
         "sinogram shape mismatch", "(3, 12)"),
    case("op-empty-tensor", lambda e: A(torch.zeros(0)), ValueError, "volume shape", "(0,)"),
    case("op-int-volume", lambda e: A(X.long()), TypeError, "floating-point", "torch.int64"),
    case("op-int-sinogram", lambda e: A.T(Y.long()), TypeError, "sinogram", "torch.int64"),
    case("op-complex-volume", lambda e: A(X.to(torch.complex64)), TypeError, "torch.complex64"),
    case("op-meta-volume", lambda e: A(X.to("meta")), ValueError,
         "volume is on device 'meta'", "cpu or cuda"),
    case("op-meta-sinogram", lambda e: A.T(Y.to("meta")), ValueError,
         "sinogram is on device 'meta'", "RayTransform"),
    case("op-nan-volume", lambda e: A(with_value(X, (1, 1), NAN)), ValueError, "volume", "NaN"),
    case("op-inf-sinogram", lambda e: A.T(with_value(Y, (0, 0), math.inf)), ValueError,
         "sinogram", "infinite"),
    case("op-numpy-input", lambda e: A(np.ones((8, 8))), TypeError, "torch.Tensor", "ndarray"),
    case("matrix-op-meta", lambda e: nan_matrix_operator()(X.double().to("meta")), ValueError,
         "meta", "MatrixOperator"),
    case("matrix-op-shapes", lambda e: MatrixOperator(torch.eye(4).to_sparse(), (2, 2), (3,)),
         ValueError, "matrix shape (4, 4)", "(3, 4)"),
    case("not-an-operator", lambda e: check_operator(object()), TypeError,
         "operator object has no call"),
    # -- geometry files: every value type-checked, named with file and key ---------------
    case("geofile-shape-bool", lambda e: read_geometry(e, "shape_bool", {}, {"shape": [True, 16]}),
         GeometryFileError, "shape_bool.json", "[volume].shape", "[True, 16]"),
    case("geofile-det-count-string",
         lambda e: read_geometry(e, "count_str", {"det_count": "abc"}), GeometryFileError,
         "count_str.json", "[projection].det_count", "'abc'"),
    case("geofile-det-count-float", lambda e: read_geometry(e, "count_f", {"det_count": 2.5}),
         GeometryFileError, "count_f.json", "det_count", "2.5"),
    case("geofile-cone-vec-det-shape-int",
         lambda e: read_geometry(e, "vec_shape", cone_vec(det_shape=5), {"shape": [8, 8, 8]}),
         GeometryFileError, "vec_shape.json", "[projection].det_shape", "[rows, cols]", "got 5"),
    case("geofile-det-shape-string", lambda e: read_geometry(
        e, "shape_str", {"type": "parallel3d", "det_shape": ["a", 8]}, {"shape": [8, 8, 8]}),
         GeometryFileError, "shape_str.json", "det_shape[0]", "'a'"),
    case("geofile-vectors-string",
         lambda e: read_geometry(e, "vec_str", cone_vec(vectors="abc"), {"shape": [8, 8, 8]}),
         GeometryFileError, "vec_str.json", "[projection].vectors", "12 numbers"),
    case("geofile-vectors-width", lambda e: read_geometry(
        e, "vec_w", cone_vec(vectors=[[1.0, 2.0, 3.0]]), {"shape": [8, 8, 8]}),
         GeometryFileError, "vec_w.json", "(n_views, 12)", "(1, 3)"),
    case("geofile-vectors-file-number", lambda e: read_geometry(
        e, "vec_file", {"type": "cone3d_vec", "vectors_file": 5, "det_shape": [8, 12]},
        {"shape": [8, 8, 8]}),
         GeometryFileError, "vec_file.json", "vectors"),
    case("geofile-type-number", lambda e: read_geometry(e, "type_num", {"type": 5}),
         GeometryFileError, "type_num.json", "[projection].type 5 is unknown"),
    case("geofile-src-origin-string", lambda e: read_geometry(
        e, "src_str", {"type": "fanbeam2d", "src_origin": "x", "origin_det": 5}),
         GeometryFileError, "src_str.json", "[projection].src_origin", "'x'"),
    case("geofile-angle-count-string", lambda e: read_geometry(e, "n_str", {"angles": {"n": "5"}}),
         GeometryFileError, "n_str.json", "[projection.angles].n", "'5'"),
    case("geofile-nan-angle", lambda e: read_geometry(e, "nan_angle", {"angles": [0.0, NAN]}),
         GeometryFileError, "nan_angle.json", "angles", "nan"),
    case("geofile-source-inside", lambda e: read_geometry(
        e, "inside", {"type": "fanbeam2d", "src_origin": 2, "origin_det": 5}),
         GeometryFileError, "inside.json", "source lies inside the volume", "src_origin=2"),
    case("geofile-detector-source-side", lambda e: read_geometry(
        e, "det_side", {"type": "fanbeam2d", "src_origin": 40, "origin_det": -30}),
         GeometryFileError, "det_side.json", "origin_det=-30"),
    case("geofile-truncated-json", lambda e: read_geometry_file(
        text_file(e.dir / "trunc_geom.json", '{"volume": {"shape": [8, 8]}, "proj')),
         GeometryFileError, "trunc_geom.json", "not valid JSON"),
    case("geofile-toml-shape-bool", lambda e: read_geometry_file(text_file(
        e.dir / "bool.toml", "[volume]\nshape = [true, 16]\n[projection]\ntype = 'parallel2d'\n")),
         GeometryFileError, "bool.toml", "[volume].shape", "[True, 16]"),
    # -- data files: named with the file and the problem ---------------------------------
    case("npz-truncated", lambda e: read_array(e.trunc_npz), DataFormatError,
         "trunc.npz", "truncated or corrupt", "BadZipFile"),
    case("npz-empty-file", lambda e: read_array(e.empty_npz), DataFormatError, "empty.npz",
         "not a readable .npz"),
    case("npz-several-arrays", lambda e: read_array(e.two_npz), DataFormatError, "two.npz",
         "several arrays", "key="),
    case("npz-unknown-key", lambda e: read_array(e.two_npz, key="zz"), KeyError, "two.npz",
         "no array 'zz'"),
    case("npy-truncated", lambda e: read_array(e.trunc_npy), DataFormatError, "trunc.npy",
         "not a readable .npy"),
    case("npy-object-array", lambda e: read_array(e.object_npy), DataFormatError, "object.npy",
         "Object arrays"),
    case("tiff-junk", lambda e: read_array(e.dir / "junk.tif"), DataFormatError, "junk.tif",
         "cannot read TIFF"),
    case("hdf5-junk", lambda e: read_array(e.dir / "junk.h5"), DataFormatError, "junk.h5",
         "cannot open HDF5"),
    case("dicom-junk", lambda e: read_array(e.dir / "junk.dcm"), DataFormatError, "junk.dcm",
         "DICOM"),
    case("dicom-folder-without-images", lambda e: read_array(e.dir / "no_dicom"),
         DataFormatError, "no_dicom", "no DICOM image files"),
    case("unknown-suffix", lambda e: read_array(e.dir / "junk.xyz"), DataFormatError,
         "junk.xyz", "unknown suffix '.xyz'"),
    # -- saved results and evaluation ----------------------------------------------------
    case("result-truncated-npz", lambda e: UQResult.load(e.results.trunc_npz), DataFormatError,
         "trunc_npz/result.npz", "truncated or corrupt"),
    case("result-truncated-json", lambda e: UQResult.load(e.results.trunc_json),
         DataFormatError, "trunc_json/result.json", "not valid JSON"),
    case("result-without-std", lambda e: UQResult.load(e.results.no_std), DataFormatError,
         "no_std/result.npz", "no 'std' array"),
    case("result-std-shape", lambda e: UQResult.load(e.results.mismatch), DataFormatError,
         "mismatch", "std has shape (8, 8), the mean (16, 16)"),
    case("result-json-list", lambda e: UQResult.load(e.results.json_list), DataFormatError,
         "json_list/result.json", "expected a JSON object"),
    case("result-without-noise-var", lambda e: UQResult.load(e.results.no_noise_var),
         DataFormatError, "no_noise_var/result.json", "'noise_var'"),
    case("result-missing-directory", lambda e: UQResult.load(e.dir / "nowhere"),
         FileNotFoundError, "nowhere", "missing"),
    case("result-shapes", lambda e: UQResult(mean=torch.zeros(16, 16), std=torch.ones(8, 8),
                                             noise_var=1.0), ValueError, "(8, 8)", "(16, 16)"),
    case("evaluate-nan-ground-truth",
         lambda e: evaluate_uq(e.results.result, with_value(torch.ones(16, 16), (2, 2), NAN)),
         ValueError, "ground truth contains 1 NaN or infinite values (of 256)"),
    case("evaluate-inf-ground-truth",
         lambda e: evaluate_uq(e.results.result, with_value(torch.ones(16, 16), (2, 2), math.inf)),
         ValueError, "ground truth", "infinite"),
    case("evaluate-ground-truth-shape", lambda e: evaluate_uq(e.results.result, torch.ones(8, 8)),
         ValueError, "shapes differ", "(8, 8)", "(16, 16)"),
    case("evaluate-negative-delta",
         lambda e: evaluate_uq(e.results.result, torch.ones(16, 16), delta=-1.0), ValueError,
         "delta", "-1.0"),
    case("write-outputs-nan-ground-truth", lambda e: e.results.result.write_outputs(
        e.dir / "never", ground_truth=with_value(torch.ones(16, 16), (0, 0), NAN)), ValueError,
         "ground truth contains 1 NaN"),
    # -- fit_dip ---------------------------------------------------------------------------
    case("dip-lr-string", lambda e: fit_dip(Y, A, tv_weight=0, iterations=2, lr="x", **FAST),
         ValueError, "lr", "'x'"),
    case("dip-lr-zero", lambda e: fit_dip(Y, A, tv_weight=0, iterations=2, lr=0.0, **FAST),
         ValueError, "lr must be positive", "0.0"),
    case("dip-iterations-zero", lambda e: fit_dip(Y, A, tv_weight=0, iterations=0, **FAST),
         ValueError, "iterations must be a positive integer", "0"),
    case("dip-iterations-fraction", lambda e: fit_dip(Y, A, tv_weight=0, iterations=2.5, **FAST),
         ValueError, "iterations", "2.5"),
    case("dip-negative-tv", lambda e: fit_dip(Y, A, tv_weight=-1.0, iterations=2, **FAST),
         ValueError, "tv_weight", "-1.0"),
    case("dip-complex-sinogram",
         lambda e: fit_dip(Y.to(torch.complex64), A, tv_weight=0, iterations=2, **FAST),
         TypeError, "sinogram y must be real", "complex64"),
    case("dip-meta-sinogram", lambda e: fit_dip(Y.to("meta"), A, tv_weight=0, iterations=2, **FAST),
         ValueError, "sinogram y is on device 'meta'"),
    case("dip-nan-sinogram",
         lambda e: fit_dip(with_value(Y, (0, 0), NAN), A, tv_weight=0, iterations=2, **FAST),
         ValueError, "1 NaN or infinite values"),
    case("dip-empty-sinogram", lambda e: fit_dip(torch.zeros(0), A, tv_weight=0, iterations=2,
                                                 **FAST), ValueError, "(0,)", "(4, 12)"),
    case("dip-unknown-init", lambda e: fit_dip(Y, A, tv_weight=0, iterations=2, init="bogus",
                                               **FAST), ValueError, "init", "'bogus'"),
    case("dip-unknown-net", lambda e: fit_dip(Y, A, net="bogus", tv_weight=0, iterations=2,
                                              **FAST), ValueError, "preset 'bogus'"),
    case("dip-checkpoint-dir-is-file", lambda e: fit_dip(
        Y, A, tv_weight=0, iterations=2, checkpoint_dir=e.a_file, **FAST), CheckpointError,
         "checkpoint_dir", "a_file", "not a directory"),
    case("dip-resume-other-lr", lambda e: fit_dip(
        Y, A, net=tiny_net(), tv_weight=0.0, iterations=2, lr=1e-2, checkpoint_dir=e.dip_ckpt,
        resume=True, **FAST), CheckpointError, "cannot resume", "lr 0.01 vs 0.001"),
    case("dip-resume-without-dir", lambda e: fit_dip(Y, A, tv_weight=0, iterations=2,
                                                     resume=True, **FAST),
         ValueError, "resume=True needs a checkpoint_dir"),
    case("dip-nan-ground-truth", lambda e: fit_dip(
        Y, A, tv_weight=0, iterations=2, ground_truth=with_value(X, (0, 0), NAN), **FAST), ValueError,
         "ground_truth contains 1 NaN"),
    case("dip-generator-int", lambda e: fit_dip(Y, A, tv_weight=0, iterations=2, generator=5,
                                                **FAST), TypeError, "generator", "5"),
    case("dip-checkpoint-every-zero", lambda e: fit_dip(
        Y, A, tv_weight=0, iterations=2, checkpoint_every=0, **FAST), ValueError,
         "checkpoint_every", "0"),
    case("dip-no-operator", lambda e: fit_dip(Y, None, tv_weight=0, iterations=2, **FAST),
         TypeError, "operator NoneType has no call"),
    case("dip-nan-operator-output", lambda e: fit_dip(
        torch.ones(48), nan_matrix_operator(), tv_weight=0, iterations=2, **FAST),
         FloatingPointError, "network input", "operator's output"),
    case("dip-nan-operator-output-noise-init", lambda e: fit_dip(
        torch.ones(48), nan_matrix_operator(), net=tiny_net(), tv_weight=0, iterations=2,
        init="noise", **FAST), FloatingPointError, "operator's output contains NaN"),
    # -- reconstruct_with_uncertainty: every option before any work ----------------------
    case("uq-n-samples-zero", lambda e: reconstruct_with_uncertainty(Y, A, n_samples=0, **FAST),
         ValueError, "n_samples must be >= 1, got 0"),
    case("uq-unknown-option", lambda e: reconstruct_with_uncertainty(Y, A, bogus=1, **FAST),
         TypeError, "unknown option(s) ['bogus']"),
    case("uq-unknown-dip-setting",
         lambda e: reconstruct_with_uncertainty(Y, A, dip={"iters": 5}, **FAST), TypeError,
         "unknown DIP setting(s) ['iters']"),
    case("uq-dip-iterations-zero",
         lambda e: reconstruct_with_uncertainty(Y, A, dip={"iterations": 0}, **FAST), ValueError,
         "dip.iterations must be >= 1, got 0"),
    case("uq-holdout-one", lambda e: reconstruct_with_uncertainty(Y, A, holdout=1.0, **FAST),
         ValueError, "holdout", "1.0"),
    case("uq-unknown-solver", lambda e: reconstruct_with_uncertainty(Y, A, solver="bogus",
                                                                     **FAST),
         ValueError, "unknown solver 'bogus'"),
    case("uq-unknown-prior", lambda e: reconstruct_with_uncertainty(Y, A, prior="bogus", **FAST),
         ValueError, "unknown prior 'bogus'"),
    case("uq-em-cycles-zero", lambda e: reconstruct_with_uncertainty(Y, A, em_cycles=0, **FAST),
         ValueError, "em_cycles must be >= 1, got 0"),
    case("uq-em-samples-negative",
         lambda e: reconstruct_with_uncertainty(Y, A, em_samples=-1, **FAST), ValueError,
         "em_samples", "-1"),
    case("uq-dtype-float16", lambda e: reconstruct_with_uncertainty(Y, A, dtype="float16",
                                                                    **FAST),
         ValueError, "unknown dtype 'float16'"),
    case("uq-config-dict", lambda e: reconstruct_with_uncertainty(Y, A, {"n_samples": 2}, **FAST),
         TypeError, "config must be a UQConfig", "dict"),
    case("uq-dip-int", lambda e: reconstruct_with_uncertainty(Y, A, dip=5, **FAST), TypeError,
         "dip must be None", "int"),
    case("uq-complex-sinogram",
         lambda e: reconstruct_with_uncertainty(Y.to(torch.complex64), A, **FAST), TypeError,
         "sinogram y must be real", "complex64"),
    case("uq-meta-sinogram", lambda e: reconstruct_with_uncertainty(Y.to("meta"), A, **FAST),
         ValueError, "sinogram y is on device 'meta'"),
    case("uq-inf-sinogram",
         lambda e: reconstruct_with_uncertainty(with_value(Y, (1, 1), math.inf), A, **FAST),
         ValueError, "sinogram y contains NaN or infinite"),
    case("uq-sinogram-shape", lambda e: reconstruct_with_uncertainty(Y[:3], A, **FAST),
         ValueError, "sinogram/operator mismatch", "(4, 12)", "(3, 12)"),
    case("uq-checkpoint-dir-is-file",
         lambda e: reconstruct_with_uncertainty(Y, A, checkpoint_dir=e.a_file, **FAST),
         CheckpointError, "checkpoint_dir", "a_file", "not a directory"),
    case("uq-generator-int", lambda e: reconstruct_with_uncertainty(Y, A, generator=5, **FAST),
         TypeError, "generator", "5"),
    case("uq-net-input-ignored",
         lambda e: reconstruct_with_uncertainty(Y, A, net_input=torch.zeros(1, 1, 8, 8), **FAST),
         ValueError, "net_input", "ignored"),
    case("uq-network-output-shape", lambda e: reconstruct_with_uncertainty(
        Y, A, dip=tiny_net(), net_input=torch.zeros(1, 1, 4, 4), **TINY_UQ), ValueError,
         "network output shape (1, 1, 4, 4)", "(8, 8)"),
    case("uq-resume-other-prior", lambda e: reconstruct_with_uncertainty(
        Y, A, dip={"iterations": 2}, checkpoint_dir=e.uq_ckpt, **{**TINY_UQ, "prior": "normal"}),
         CheckpointError, "other settings", "prior: saved 'matern', now 'normal'"),
    # -- UQConfig ------------------------------------------------------------------------
    case("config-noise-probes-one", lambda e: UQConfig(noise_probes=1), ValueError,
         "noise_probes must be >= 2, got 1"),
    case("config-tied-string", lambda e: UQConfig(tied="yes"), ValueError, "tied", "'yes'"),
    case("config-solver-opts-int", lambda e: UQConfig(solver_opts=5), TypeError,
         "solver_opts must be a dict", "int"),
    case("config-unknown-dip-key", lambda e: UQConfig(dip={"iters": 5}), ValueError,
         "unknown DIP option", "iters"),
    case("config-keep-samples-int", lambda e: UQConfig(keep_samples=1), TypeError,
         "keep_samples must be True or False, got 1"),
    case("config-unknown-calibration", lambda e: UQConfig(calibration="bogus"), ValueError,
         "calibration", "'bogus'"),
    case("config-exact-estimator-needs-exact-solver", lambda e: UQConfig(em_estimator="exact"),
         ValueError, "em_estimator='exact'", "em_solver='exact'"),
    case("config-lengthscale-zero", lambda e: UQConfig(lengthscale=0), ValueError,
         "lengthscale", "0"),
    case("config-dip-init", lambda e: UQConfig(dip={"init": "bogus"}), ValueError,
         "dip.init", "'bogus'"),
    case("config-replace-unknown", lambda e: UQConfig().replace(bogus=1), TypeError,
         "unknown option(s) ['bogus']"),
    # -- the Laplace front door ----------------------------------------------------------
    case("laplace-float-labels",
         lambda e: fit_laplace("classification", X3, torch.full((8,), 2.29)), ValueError,
         "classification labels must be integer", "torch.float32"),
    case("laplace-bool-labels",
         lambda e: fit_laplace("classification", X3, torch.ones(8, dtype=torch.bool)), ValueError,
         "labels", "torch.bool"),
    case("laplace-labels-out-of-range",
         lambda e: fit_laplace("classification", X3, torch.full((8,), 3)), ValueError,
         "labels out of range", "[3, 3]", "3 classes"),
    case("laplace-targets-transposed", lambda e: fit_laplace("regression", X3, torch.randn(3, 8)),
         ValueError, "regression targets", "expected shape (8, 3)", "got (3, 8)"),
    case("laplace-nan-targets",
         lambda e: fit_laplace("regression", X3, with_value(torch.zeros(8, 3), (0, 0), NAN)), ValueError,
         "regression targets contain NaN"),
    case("laplace-empty-loader", lambda e: laplace(n_samples=2).fit([]), ValueError,
         "no data"),
    case("laplace-sample-zero", lambda e: e.la.sample(0), ValueError,
         "n_samples must be an integer >= 1, got 0"),
    case("laplace-sample-negative", lambda e: e.la.sample(-2), ValueError, "n_samples", "-2"),
    case("laplace-functional-samples-negative", lambda e: e.la.functional_samples(X3, -2),
         ValueError, "n_samples", "-2"),
    case("laplace-unknown-likelihood", lambda e: laplace("poisson"), ValueError,
         "unknown likelihood 'poisson'"),
    case("laplace-unknown-solver", lambda e: laplace(solver="bogus"), ValueError,
         "unknown solver 'bogus'"),
    case("laplace-unknown-prior", lambda e: laplace(prior="bogus"), ValueError,
         "unknown prior 'bogus'"),
    case("laplace-n-samples-zero", lambda e: laplace(n_samples=0), ValueError,
         "n_samples", "0"),
    case("laplace-negative-prior-precision", lambda e: laplace(prior_precision=-1.0),
         ValueError, "prior_precision", "-1.0"),
    case("laplace-sigma-noise-string", lambda e: laplace(sigma_noise="a"), ValueError,
         "sigma_noise", "'a'"),
    case("laplace-chunk-size-zero", lambda e: laplace(chunk_size=0), ValueError,
         "chunk_size", "0"),
    case("laplace-generator-int", lambda e: laplace(generator=5), TypeError, "generator", "5"),
    case("laplace-unknown-weights", lambda e: laplace(subset_of_weights="bogus"), ValueError,
         "subset_of_weights 'bogus'"),
    case("laplace-unknown-method", lambda e: e.la.optimize_prior_precision(method="bogus"),
         ValueError, "unknown method 'bogus'"),
    case("laplace-predict-before-fit", lambda e: laplace()(X3), RuntimeError, "fit"),
    # -- the command line: exit status 2, one line naming the problem --------------------
    case("cli-truncated-npz-sinogram",
         lambda e: cli(e, ["reconstruct", e.trunc_npz, "-g", e.geom, "-o", e.dir / "o"]),
         CLIExit, "dip-uq: error:", "trunc.npz", "truncated or corrupt"),
    case("cli-complex-sinogram",
         lambda e: cli(e, ["reconstruct", e.complex_sino, "-g", e.geom, "-o", e.dir / "o"]),
         CLIExit, "complex.npy", "real numbers", "complex64"),
    case("cli-out-is-a-file", lambda e: cli(e, reconstruct_argv(e, e.a_file)), CLIExit,
         "--out", "a_file", "not a directory"),
    case("cli-out-unwritable", lambda e: cli(e, reconstruct_argv(e, e.unwritable))
         if e.unwritable else pytest.skip("no unwritable place for this user"), CLIExit,
         "--out", "cannot write there"),
    case("cli-uncertainty-out-is-a-file",
         lambda e: cli(e, [*uncertainty_argv(e), "-o", e.a_file]), CLIExit, "--out", "a_file"),
    case("cli-nan-ground-truth",
         lambda e: cli(e, [*uncertainty_argv(e), "--ground-truth", e.gt_nan]), CLIExit,
         "gt_nan.npy", "ground truth contains 1 NaN"),
    case("cli-ground-truth-shape",
         lambda e: cli(e, [*uncertainty_argv(e), "--ground-truth", e.gt_small]), CLIExit,
         "gt_small.npy", "(4, 4)", "(8, 8)"),
    case("cli-iterations-zero", lambda e: cli(e, [*reconstruct_argv(e, e.dir / "o"),
                                                  "--iterations", "0"]),
         CLIExit, "--iterations must be a positive integer, got 0"),
    case("cli-negative-lr", lambda e: cli(e, [*reconstruct_argv(e, e.dir / "o"), "--lr", "-1"]),
         CLIExit, "--lr must be a positive finite number, got -1"),
    case("cli-checkpoint-every-zero",
         lambda e: cli(e, [*reconstruct_argv(e, e.dir / "o"), "--checkpoint-every", "0"]), CLIExit,
         "--checkpoint-every", "0"),
    case("cli-edip-images-zero", lambda e: cli(e, [*reconstruct_argv(e, e.dir / "o"),
                                                   "--edip-iterations", "5", "--edip-images",
                                                   "0"]),
         CLIExit, "--edip-images", "0"),
    case("cli-unknown-net", lambda e: cli(e, [*reconstruct_argv(e, e.dir / "o"), "--net", "bogus"]),
         CLIExit, "--net 'bogus'"),
    case("cli-npz-unknown-key",
         lambda e: cli(e, ["reconstruct", e.two_npz, "-g", e.geom, "-o", e.dir / "o", "--key",
                           "zz"]), CLIExit, "two.npz", "no array 'zz'"),
    case("cli-geometry-det-count-string", lambda e: cli(e, [
        "reconstruct", e.sino, "-o", e.dir / "o", "-g",
        geometry_json(e, "cli_count", {"det_count": "abc"})]), CLIExit,
         "cli_count.json", "det_count", "'abc'"),
    case("cli-geometry-source-inside", lambda e: cli(e, [
        "reconstruct", e.sino, "-o", e.dir / "o", "-g",
        geometry_json(e, "cli_inside", {"type": "fanbeam2d", "src_origin": 3, "origin_det": 5})]),
         CLIExit, "cli_inside.json", "source lies inside the volume"),
    case("cli-n-samples-zero", lambda e: cli(e, [*uncertainty_argv(e), "--n-samples", "0"]),
         CLIExit, "--n-samples must be >= 1, got 0"),
    case("cli-em-cycles-zero", lambda e: cli(e, [*uncertainty_argv(e), "--em-cycles", "0"]),
         CLIExit, "--em-cycles must be >= 1, got 0"),
    case("cli-holdout-above-one", lambda e: cli(e, [*uncertainty_argv(e), "--holdout", "1.5"]),
         CLIExit, "--holdout", "1.5"),
    case("cli-negative-tv-weight", lambda e: cli(e, [*uncertainty_argv(e), "--tv-weight", "-1"]),
         CLIExit, "--tv-weight", "-1"),
    case("cli-unknown-prior", lambda e: cli(e, [*uncertainty_argv(e), "--prior", "bogus"]), CLIExit,
         "--prior", "invalid choice: 'bogus'"),
    case("cli-iterations-not-a-number",
         lambda e: cli(e, [*uncertainty_argv(e), "--iterations", "abc"]), CLIExit,
         "--iterations", "invalid int value: 'abc'"),
    case("cli-unknown-flag", lambda e: cli(e, [*uncertainty_argv(e), "--bogus"]), CLIExit,
         "unrecognized arguments: --bogus"),
    case("cli-unknown-command", lambda e: cli(e, ["rebuild"]), CLIExit,
         "invalid choice: 'rebuild'"),
    case("cli-resume-other-lr",
         lambda e: cli(e, reconstruct_argv(e, e.cli_out, "--lr", "1e-2", "--resume")), CLIExit,
         "cannot resume", "lr 0.01 vs 0.001"),
]  # fmt: skip


def test_the_battery_is_large_and_its_ids_unique():
    assert len(CASES) >= 80
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("bad", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_named(bad: Case, env, capsys):
    env.capsys = capsys
    with pytest.raises(bad.error) as info:
        bad.call(env)
    message = str(info.value.args[0]) if isinstance(info.value, KeyError) else str(info.value)
    missing = [w for w in bad.words if w not in message]
    assert not missing, f"{bad.id}: {missing} not in the message:\n{message}"


# ------------------------------------------------------------------------------ beside the table
def test_callers_network_keeps_its_mode():
    """reconstruct_with_uncertainty puts the network passed as dip= in eval mode while it
    works; it leaves in the mode it came in, on success and on failure."""
    for mode in (True, False):
        net = tiny_net().train(mode)
        reconstruct_with_uncertainty(Y, A, dip=net, **TINY_UQ)
        assert all(m.training is mode for m in net.modules())
        with pytest.raises(ValueError, match="network output shape"):
            reconstruct_with_uncertainty(
                Y, A, dip=net, net_input=torch.zeros(1, 1, 4, 4), **TINY_UQ
            )
        assert all(m.training is mode for m in net.modules())
    net = tiny_net().train()
    next(net.children()).eval()  # a mixed state comes back as it was, module by module
    before = {name: m.training for name, m in net.named_modules()}
    reconstruct_with_uncertainty(Y, A, dip=net, **TINY_UQ)
    assert {name: m.training for name, m in net.named_modules()} == before


_WRITER = """
import sys, time
import torch
from dip_uq.io.atomic import atomic_torch_save


class Slow:  # pickled mid-write: the temporary file exists, the checkpoint is not replaced
    def __reduce__(self):
        print("writing", flush=True)
        time.sleep(60)
        return (int, ())


atomic_torch_save({"state": torch.zeros(3), "slow": Slow()}, sys.argv[1])
"""


def test_sigterm_during_a_checkpoint_write_is_cleaned_on_the_next_run(tmp_path):
    """A process killed by SIGTERM while it writes the DIP checkpoint leaves a hidden
    temporary file (the atomic writer cannot clean up after a signal): the next run removes
    it, and the completed checkpoint it left resumes bit for bit."""
    if not hasattr(signal, "SIGTERM") or os.name != "posix":
        pytest.skip("POSIX signals")
    kw = dict(tv_weight=0.0, iterations=4, lr=1e-2, checkpoint_every=2, **FAST)
    first = fit_dip(Y, A, net=tiny_net(), checkpoint_dir=tmp_path, **kw)
    ckpt = tmp_path / CHECKPOINT_NAME
    saved = ckpt.read_bytes()
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(ckpt)],
        stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        assert proc.stdout.readline().strip() == b"writing"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == -signal.SIGTERM
    finally:
        proc.kill()
        proc.stdout.close()
    orphans = list(tmp_path.glob(f".{CHECKPOINT_NAME}.*.tmp*"))
    assert len(orphans) == 1 and ckpt.read_bytes() == saved  # the checkpoint is intact
    again = fit_dip(Y, A, net=tiny_net(), checkpoint_dir=tmp_path, resume=True, **kw)
    assert not list(tmp_path.glob(".*.tmp*"))
    assert torch.equal(again.image, first.image)
