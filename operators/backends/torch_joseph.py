"""Pure-torch Joseph projector: the embedded default, every geometry, 2D and 3D, CPU and GPU.

Each ray ``o + t d`` (index space) is sampled once per voxel plane perpendicular to its
dominant axis (the axis where ``|d|`` is largest). On a plane the sample is a bilinear
interpolation of that plane's 2D slice (zero outside the volume), weighted by the ray length
between planes. All planes of one axis are processed as one batched ``grid_sample`` call:
the planes are the batch, the rays are the sampling grid.

The adjoint calls ``grid_sample``'s own input-gradient kernel with the same grid, so it is the
exact transpose of the forward map (up to float rounding): the backend is *matched*.

A 2D problem is a 3D problem with one z-slice and rays in the xy-plane. Views are processed
in chunks so that memory stays near volume + sinogram + one chunk.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..geometry import ProjectionGeometry, VolumeGeometry
from . import _parallel2d_adjoint as par2d

__all__ = ["TorchJoseph"]


class TorchJoseph:
    name = "torch"
    matched = True

    def __init__(
        self,
        volume: VolumeGeometry,
        geometry: ProjectionGeometry,
        *,
        chunk_bytes: int = 96 * 2**20,
        grid_cache_bytes: int | None = None,
        gather_adjoint: bool = True,
    ) -> None:
        self.volume = volume
        self.geometry = geometry
        self.chunk_bytes = int(chunk_bytes)
        # Cached sampling grids trade memory for speed in training loops. 2D grids are small
        # relative to the work they save; in 3D the default keeps peak memory near
        # volume + sinogram + one chunk, caching only small problems.
        if grid_cache_bytes is None:
            grid_cache_bytes = (384 if geometry.ndim == 2 else 128) * 2**20
        self.grid_cache_bytes = int(grid_cache_bytes)
        vec = geometry.to_vec()
        if geometry.ndim == 2:
            # Lift to 3D rows: (src|ray, d, u, v) with z = 0 and a unit v along z.
            n = vec.shape[0]
            z = np.zeros((n, 1))
            vec = np.concatenate(
                [vec[:, 0:2], z, vec[:, 2:4], z, vec[:, 4:6], z, np.tile([0.0, 0.0, 1.0], (n, 1))],
                1,
            )
            self._vol_shape3 = (1, *volume.shape)  # (D, H, W)
            self._vs = np.array([volume.voxel_size[1], volume.voxel_size[0], 1.0])  # x, y, z
            self._lo = np.array([volume.min_pt[1], volume.min_pt[0], -0.5])
            self._det = (1, geometry.det_shape[0])
        else:
            self._vol_shape3 = tuple(volume.shape)
            vz, vy, vx = volume.voxel_size
            self._vs = np.array([vx, vy, vz])
            lo = volume.min_pt
            self._lo = np.array([lo[2], lo[1], lo[0]])
            self._det = tuple(geometry.det_shape)
        self._vec = vec  # (views, 12) float64, world units
        self._cache: dict[tuple, torch.Tensor] = {}
        # 2D parallel beam: a gather-form adjoint (same linear map, faster than the scatter).
        self._par_plans = None
        if gather_adjoint and geometry.ndim == 2 and not geometry.is_cone:
            self._par_plans = par2d.plan_views(
                vec, self._vs, self._lo, tuple(volume.shape), geometry.det_shape[0]
            )

    # ------------------------------------------------------------------ helpers
    def check_tensor(self, t: torch.Tensor) -> None:
        if t.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"torch backend supports float32 and float64 tensors, got {t.dtype}")

    def _vec_on(self, device: torch.device) -> torch.Tensor:
        key = ("vec", device)
        if key not in self._cache:
            self._cache[key] = torch.as_tensor(self._vec, dtype=torch.float64, device=device)
        return self._cache[key]

    def _rays(self, v0: int, v1: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        """Origins and directions in index space (x, y, z), and world length per unit t,
        for the rays of views ``v0:v1`` in (view, row, col) order. float64 for accuracy."""
        vec = self._vec_on(device)[v0:v1]
        rows, cols = self._det
        i = torch.arange(rows, device=device, dtype=torch.float64) - (rows - 1) / 2
        j = torch.arange(cols, device=device, dtype=torch.float64) - (cols - 1) / 2
        src, d, u, v = vec[:, 0:3], vec[:, 3:6], vec[:, 6:9], vec[:, 9:12]
        pix = (
            d[:, None, None, :]
            + j[None, None, :, None] * u[:, None, None, :]
            + i[None, :, None, None] * v[:, None, None, :]
        ).reshape(-1, 3)
        if self.geometry.is_cone:
            origin = src.repeat_interleave(rows * cols, 0)
            direction = pix - origin
        else:
            origin = pix
            direction = src.repeat_interleave(rows * cols, 0)
        vs = torch.as_tensor(self._vs, device=device)
        lo = torch.as_tensor(self._lo, device=device)
        o_idx = (origin - lo) / vs - 0.5
        d_idx = direction / vs
        world_len = direction.norm(dim=1)
        return o_idx, d_idx, world_len

    def _views_per_chunk(self, batch: int, itemsize: int) -> int:
        rays_per_view = self._det[0] * self._det[1]
        planes = max(self._vol_shape3)
        per_view = rays_per_view * planes * (2 + batch) * itemsize
        # float64 ray set-up: ~10 doubles per ray
        per_view += rays_per_view * 80
        return int(max(1, min(self.geometry.n_views, self.chunk_bytes // max(per_view, 1))))

    # Plane axis a in (x=0, y=1, z=2): permutation of the (N, D, H, W) volume to
    # (planes, N, H', W'), and which ray coordinates feed grid[..., 0] (-> W') and grid[..., 1].
    _AXES = {
        0: ((3, 0, 1, 2), 1, 2),  # planes along W; slice (D, H): W' = y, H' = z
        1: ((2, 0, 1, 3), 0, 2),  # planes along H; slice (D, W): W' = x, H' = z
        2: ((1, 0, 2, 3), 0, 1),  # planes along D; slice (H, W): W' = x, H' = y
    }

    def _plane_grid(
        self, a: int, o: torch.Tensor, d: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        """Grid ``(n_planes, R, 1, 2)`` of normalised (align_corners=False) sample positions.

        On plane ``k`` the ray is at ``t = (k - o_a) / d_a``, so each grid coordinate is
        affine in ``k``: ``g = A + k * B`` with per-ray ``A, B``. One fused ``addcmul``
        builds the whole grid; this dominates the cost of a projection otherwise.
        """
        D, H, W = self._vol_shape3
        size_xyz = (W, H, D)
        _, c0, c1 = self._AXES[a]
        scale = torch.tensor(
            [2.0 / size_xyz[c0], 2.0 / size_xyz[c1]], dtype=torch.float64, device=o.device
        )
        shift = torch.tensor(
            [1.0 / size_xyz[c0] - 1, 1.0 / size_xyz[c1] - 1], dtype=torch.float64, device=o.device
        )
        slope = d[:, [c0, c1]] / d[:, a : a + 1]  # (R, 2) index units per plane
        start = o[:, [c0, c1]] - o[:, a : a + 1] * slope  # position at plane k = 0
        A = (start * scale + shift).to(dtype)
        B = (slope * scale).to(dtype)
        k = torch.arange(size_xyz[a], device=o.device, dtype=dtype)
        return torch.addcmul(A[None], k[:, None, None], B[None]).unsqueeze(2)

    def _groups(self, v0: int, v1: int, device: torch.device):
        o, d, wl = self._rays(v0, v1, device)
        dom = d.abs().argmax(dim=1)
        for a in (0, 1, 2):
            idx = (dom == a).nonzero(as_tuple=True)[0]
            if idx.numel() == 0:
                continue
            oa, da = o[idx], d[idx]
            step = wl[idx] / da[:, a].abs()  # world length between consecutive planes
            yield a, idx, oa, da, step

    def _chunks(self, n: int, dtype: torch.dtype, device: torch.device):
        """Yield ``(first_ray, [(axis, ray_index, grid, step), ...])`` per chunk of views.

        Grids depend only on the geometry; when all of them fit in ``grid_cache_bytes`` they
        are kept, so repeated projections (a DIP training loop) skip their construction.
        """
        views = self.geometry.n_views
        rows, cols = self._det
        itemsize = torch.empty((), dtype=dtype).element_size()
        per = self._views_per_chunk(n, itemsize)
        key = ("grids", device, dtype, per)
        if key in self._cache:
            yield from self._cache[key]
            return
        total = views * rows * cols * max(self._vol_shape3) * 2 * itemsize
        keep = total <= self.grid_cache_bytes
        built = []
        for v0 in range(0, views, per):
            v1 = min(views, v0 + per)
            groups = [
                (a, idx, self._plane_grid(a, oa, da, dtype), step.to(dtype))
                for a, idx, oa, da, step in self._groups(v0, v1, device)
            ]
            item = (v0 * rows * cols, groups)
            if keep:
                built.append(item)
            yield item
        if keep:
            self._cache[key] = built

    # ------------------------------------------------------------------ maps
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        vol = x.reshape(n, *self._vol_shape3)
        views = self.geometry.n_views
        rows, cols = self._det
        out = x.new_zeros(n, views * rows * cols)
        permuted = {}
        for base, groups in self._chunks(n, x.dtype, x.device):
            for a, idx, grid, step in groups:
                if a not in permuted:
                    permuted[a] = vol.permute(*self._AXES[a][0]).contiguous()
                samples = F.grid_sample(
                    permuted[a], grid, mode="bilinear", padding_mode="zeros", align_corners=False
                )  # (planes, N, R, 1)
                out[:, base + idx] = samples.sum(0).squeeze(-1) * step
        out = out.reshape(n, views, rows, cols)
        if self.geometry.ndim == 2:
            return out[:, :, 0, :]
        return out.permute(0, 2, 1, 3).contiguous()  # (N, rows, views, cols)

    def _par2d_chunks(self, dtype: torch.dtype, device: torch.device):
        """Chunks of gather-adjoint grids for 2D parallel beam (cached like the forward's)."""
        H, W = self.volume.shape
        views = self.geometry.n_views
        itemsize = torch.empty((), dtype=dtype).element_size()
        per_view = H * W * 88  # float64 temporaries while building dominate
        per = int(max(1, min(views, self.chunk_bytes // per_view)))
        key = ("par2d", device, dtype, per)
        if key in self._cache:
            yield from self._cache[key]
            return
        keep = views * H * W * 3 * itemsize <= self.grid_cache_bytes
        built = []
        for v0 in range(0, views, per):
            groups = par2d.build_grids(
                self._par_plans, range(v0, min(views, v0 + per)), self._det[1], views, dtype, device
            )
            if keep:
                built.append(groups)
            yield groups
        if keep:
            self._cache[key] = built

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        if self._par_plans is not None:
            out = y.new_zeros(y.shape[0], *self.volume.shape)
            for groups in self._par2d_chunks(y.dtype, y.device):
                par2d.backproject(y, groups, tuple(self.volume.shape), out)
            return out
        n = y.shape[0]
        views = self.geometry.n_views
        rows, cols = self._det
        if self.geometry.ndim == 2:
            rays = y.reshape(n, views * cols)
        else:
            rays = y.reshape(n, rows, views, cols).permute(0, 2, 1, 3).reshape(n, -1)
        D, H, W = self._vol_shape3
        acc: dict[int, torch.Tensor] = {}
        for base, groups in self._chunks(n, y.dtype, y.device):
            for a, idx, grid, step in groups:
                perm = self._AXES[a][0]
                shape_p = tuple((n, D, H, W)[p] for p in perm)  # (planes, N, H', W')
                g = (rays[:, base + idx] * step)[None, :, :, None]
                g = g.expand(shape_p[0], n, idx.numel(), 1).contiguous()
                # Only the input gradient is requested, so ``input`` is read for its shape.
                dummy = y.new_empty(shape_p)
                gin, _ = torch.ops.aten.grid_sampler_2d_backward(
                    g, dummy, grid, 0, 0, False, [True, False]
                )
                acc[a] = gin if a not in acc else acc[a] + gin
        out = y.new_zeros(n, D, H, W)
        for a, gin in acc.items():
            inv = np.argsort(self._AXES[a][0]).tolist()
            out = out + gin.permute(*inv)
        return out.reshape(n, *self.volume.shape)
