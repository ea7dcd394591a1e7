"""Synthetic candidate patches: nodule-like positives and their hard mimics, in 2D or 3D.

Every structure is a soft-edged occupancy field computed on coordinate grids for a whole
batch of one kind at once (parameters broadcast as [n, 1, 1(, 1)]), so a batch costs a few
dozen numpy operations, not a Python loop over samples. The picture is
`background + (tissue - background) * occupancy + texture`, blurred, then noised. There is
ONE tissue intensity per scan, shared by every structure, so brightness never gives the
label away; only shape and extent do.

Why the task needs context (as real false-positive reduction does): a large nodule and a
point inside a big soft-tissue mass are both "all tissue" in the 16 crop, and a
juxtapleural nodule and a ridge on the wall both look like a thick bright wall there. Only
the 32/48 crops show whether the bright region ends in a round border. The vessel mimics
(crossings, bifurcations, bulges) and small nodules are told apart by local shape instead.
"""

from __future__ import annotations

import numpy as np

POSITIVE_KINDS = {
    "small_nodule": 0.18,
    "vessel_nodule": 0.17,
    "juxtapleural_nodule": 0.25,
    "large_nodule": 0.40,
}
NEGATIVE_KINDS = {
    "vessel_crossing": 0.10,
    "vessel_bifurcation": 0.08,
    "vessel_bulge": 0.12,
    "mass_interior": 0.38,
    "wall_ridge": 0.22,
    "background": 0.10,
}
KINDS = tuple(POSITIVE_KINDS) + tuple(NEGATIVE_KINDS)
# Voxels rendered per chunk: bounds memory (3D) while keeping numpy calls large (2D).
_CHUNK_VOXELS = 1 << 18
_TEXTURE_STEP = 4  # lung texture is drawn on a grid 4x coarser, then smoothly upsampled
_BLUR_SIGMA = 0.8  # scanner point-spread, in pixels


def _col(values: np.ndarray, dims: int) -> np.ndarray:
    """[n] -> [n, 1, ..., 1] so per-sample parameters broadcast over the grid."""
    return np.asarray(values, dtype=np.float32).reshape((-1,) + (1,) * dims)


def _unit(rng: np.random.Generator, n: int, dims: int) -> np.ndarray:
    v = rng.standard_normal((n, dims)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _perpendicular(rng: np.random.Generator, u: np.ndarray) -> np.ndarray:
    """A random unit vector orthogonal to each row of `u` (Gram-Schmidt on a random one)."""
    v = _unit(rng, len(u), u.shape[1])
    v -= (v * u).sum(1, keepdims=True) * u
    norm = np.linalg.norm(v, axis=1, keepdims=True)
    # A random draw parallel to u is vanishingly rare, but would divide by zero.
    fallback = np.roll(u, 1, axis=1) * np.array([-1.0] + [1.0] * (u.shape[1] - 1), np.float32)
    return np.where(norm > 1e-3, v / np.maximum(norm, 1e-6), fallback)


def _rotate(u: np.ndarray, w: np.ndarray, angle: np.ndarray) -> np.ndarray:
    """Turn `u` by `angle` (radians) towards the orthogonal unit vector `w`."""
    return np.cos(angle)[:, None] * u + np.sin(angle)[:, None] * w


class Grid:
    """Coordinate axes of one patch, shaped to broadcast against [n, S, S(, S)]."""

    def __init__(self, dims: int, size: int) -> None:
        self.dims, self.size = dims, size
        axis = np.arange(size, dtype=np.float32)
        self.axes = [
            axis.reshape((1,) + tuple(size if i == k else 1 for i in range(dims)))
            for k in range(dims)
        ]

    def diff(self, point: np.ndarray) -> list[np.ndarray]:
        return [a - _col(point[:, k], self.dims) for k, a in enumerate(self.axes)]

    def project(self, diff: list[np.ndarray], u: np.ndarray) -> np.ndarray:
        return sum(d * _col(u[:, k], self.dims) for k, d in enumerate(diff))

    @staticmethod
    def norm2(diff: list[np.ndarray]) -> np.ndarray:
        return sum(d * d for d in diff)


def _soft(distance: np.ndarray, radius: np.ndarray, edge: np.ndarray, dims: int) -> np.ndarray:
    """Occupancy 1 inside `radius`, 0 outside, with a linear ramp `edge` pixels wide."""
    return np.clip(0.5 + (_col(radius, dims) - distance) / _col(edge, dims), 0.0, 1.0)


def ellipsoid(
    g: Grid, c: np.ndarray, u: np.ndarray, radius: np.ndarray, elong: np.ndarray, edge: np.ndarray
) -> np.ndarray:
    """Spheroid about axis `u`: semi-axis radius*elong along u, radius across.

    The metric is scaled to the shorter semi-axis, so the soft edge is `edge` pixels wide
    where the surface is flattest: a thin plate must not look sharper than a nodule.
    """
    d = g.diff(c)
    along = g.project(d, u)
    semi_along = radius * elong
    short = np.minimum(radius, semi_along)
    k_across, k_along = np.square(short / radius), np.square(short / semi_along)
    metric2 = _col(k_across, g.dims) * g.norm2(d) + _col(k_along - k_across, g.dims) * along * along
    return _soft(np.sqrt(np.maximum(metric2, 0.0)), short, edge, g.dims)


def tube(
    g: Grid, p: np.ndarray, u: np.ndarray, radius: np.ndarray, edge: np.ndarray, ray: bool = False
) -> np.ndarray:
    """A vessel: infinite tube (line with width in 2D) through p along u, or a ray from p."""
    d = g.diff(p)
    if g.dims == 2 and not ray:  # a line's distance is one projection: no square root
        return _soft(np.abs(g.project(d, np.stack([-u[:, 1], u[:, 0]], 1))), radius, edge, 2)
    along = g.project(d, u)
    if ray:
        along = np.maximum(along, 0.0)  # behind p the distance is to p itself: a round cap
    return _soft(np.sqrt(np.maximum(g.norm2(d) - along * along, 0.0)), radius, edge, g.dims)


def wall(
    g: Grid,
    c: np.ndarray,
    normal: np.ndarray,
    dist: np.ndarray,
    curvature: np.ndarray,
    edge: np.ndarray,
) -> np.ndarray:
    """Chest wall: tissue outside a big sphere whose surface passes `dist` from c along `normal`."""
    centre = c + normal * (dist - curvature)[:, None]
    outside = np.sqrt(g.norm2(g.diff(centre))) - _col(curvature, g.dims)
    return np.clip(0.5 + outside / _col(edge, g.dims), 0.0, 1.0)


def plate(
    g: Grid,
    c: np.ndarray,
    normal: np.ndarray,
    thickness: np.ndarray,
    extent: np.ndarray,
    edge: np.ndarray,
) -> np.ndarray:
    """Flat spheroid (plaque/ridge): semi-axis `thickness` along normal, `extent` across."""
    return ellipsoid(g, c, normal, extent, thickness / extent, edge)


def _render_kind(
    kind: str, g: Grid, rng: np.random.Generator, c: np.ndarray, edge: np.ndarray
) -> np.ndarray:
    """Occupancy [n, S...] of the structure a candidate of `kind` sits on, centred at c."""
    n, dims = c.shape
    u = _unit(rng, n, dims)
    w = _perpendicular(rng, u)
    U = rng.uniform
    if kind == "small_nodule":
        return ellipsoid(g, c, u, U(2.0, 5.5, n), U(0.75, 1.35, n), edge)
    if kind == "large_nodule":  # wider than the 16 crop: inside it, it is all tissue
        return ellipsoid(g, c, u, U(14.0, 19.0, n), U(0.9, 1.15, n), edge)
    if kind == "vessel_nodule":
        r = U(3.0, 6.5, n)
        axis = c + w * (r * U(0.3, 1.0, n))[:, None]
        return np.maximum(
            ellipsoid(g, c, u, r, U(0.85, 1.2, n), edge), tube(g, axis, u, U(1.0, 2.2, n), edge)
        )
    if kind == "juxtapleural_nodule":
        r = U(5.0, 12.0, n)
        nodule = ellipsoid(g, c, u, r, U(0.85, 1.2, n), edge)
        return np.maximum(nodule, wall(g, c, w, r * U(0.2, 0.8, n), U(60, 200, n), edge))
    if kind == "wall_ridge":  # same wall and thickness as the nodule, but it runs on past 16 px
        t = U(5.0, 12.0, n)
        ridge = plate(g, c, w, t, U(18.0, 36.0, n), edge)
        return np.maximum(ridge, wall(g, c, w, t * U(0.2, 0.8, n), U(60, 200, n), edge))
    if kind == "mass_interior":  # the candidate is 12-22 px deep inside a lobulated mass
        radius = U(28.0, 50.0, n)
        centre = c + u * (radius - U(12.0, 22.0, n))[:, None]
        lobe = centre + _unit(rng, n, dims) * (0.5 * radius)[:, None]
        return np.maximum(
            ellipsoid(g, centre, _unit(rng, n, dims), radius, U(1.0, 1.4, n), edge),
            ellipsoid(g, lobe, u, radius * U(0.5, 0.8, n), np.ones(n, np.float32), edge),
        )
    if kind == "vessel_crossing":  # two tubes crossing give a bright blob at the centre
        r1, r2 = U(1.5, 3.5, n), U(1.5, 3.5, n)
        u2 = _rotate(u, w, U(0.5, 1.57, n))
        axis2 = c + _perpendicular(rng, u2) * U(0.0, 1.0, n)[:, None]
        return np.maximum(tube(g, c, u, r1, edge), tube(g, axis2, u2, r2, edge))
    if kind == "vessel_bifurcation":
        r = U(1.5, 3.0, n)
        spread = U(0.35, 0.9, n)
        child = r * U(0.65, 0.9, n)
        parts = [
            tube(g, c, -u, r, edge, ray=True),
            ellipsoid(g, c, u, r * 1.15, np.ones(n, np.float32), edge),
        ]
        for sign in (1.0, -1.0):
            parts.append(tube(g, c, _rotate(u, w, sign * spread), child, edge, ray=True))
        return np.maximum.reduce(parts)
    if kind == "vessel_bulge":  # a locally thicker, spindle-shaped stretch of one vessel
        rb = U(2.8, 5.5, n)
        return np.maximum(
            tube(g, c, u, U(1.2, 2.6, n), edge), ellipsoid(g, c, u, rb, U(1.4, 2.6, n), edge)
        )
    if kind == "background":
        return np.zeros((n,) + (g.size,) * dims, np.float32)
    raise ValueError(f"unknown candidate kind {kind!r}")


def _clutter(g: Grid, rng: np.random.Generator, c: np.ndarray, edge: np.ndarray) -> np.ndarray:
    """Stray vessels that pass the candidate by, and sometimes a distant wall, in every kind."""
    n, dims = c.shape
    occ = np.zeros((n,) + (g.size,) * dims, np.float32)
    for slot, chance in enumerate((0.8, 0.5, 0.3, 0.3)):
        u = _unit(rng, n, dims)
        offset = _perpendicular(rng, u) * rng.uniform(9.0, 30.0, n)[:, None]
        radius = rng.uniform(0.8, 2.0, n)
        far, curvature = rng.uniform(16.0, 40.0, n), rng.uniform(60.0, 200.0, n)
        # Everything is drawn for all n, then only the present ones are rendered (speed).
        idx = np.flatnonzero(rng.random(n) < chance)
        if len(idx) == 0:
            continue
        ci, ei = c[idx], edge[idx]
        if slot < 3:  # a vessel whose closest approach stays 9-30 px off the centre
            part = tube(g, ci + offset[idx], u[idx], radius[idx], ei)
        else:  # a wall 16-40 px away: walls alone must not mean "juxtapleural"
            part = wall(g, ci, u[idx], far[idx], curvature[idx], ei)
        occ[idx] = np.maximum(occ[idx], part)
    return occ


def _blur(x: np.ndarray, dims: int, sigma: float = _BLUR_SIGMA) -> np.ndarray:
    """Separable Gaussian blur by shifted adds, renormalised at the borders.

    Plain numpy on purpose: small BLAS products spin up OpenBLAS threads in every worker,
    which oversubscribes the cores (far slower in 3D on a busy machine).
    """
    radius = max(1, int(np.ceil(2.5 * sigma)))
    weights = np.exp(-0.5 * (np.arange(radius + 1) / sigma) ** 2).astype(np.float32)
    scratch = np.empty_like(x)
    for axis in range(1, dims + 1):
        size = x.shape[axis]
        out = x * weights[0]
        total = np.full(size, weights[0], np.float32)
        for shift in range(1, min(radius, size - 1) + 1):
            head = [slice(None)] * x.ndim
            tail = [slice(None)] * x.ndim
            head[axis], tail[axis] = slice(shift, None), slice(None, -shift)
            head, tail = tuple(head), tuple(tail)
            for dst, src in ((head, tail), (tail, head)):
                tmp = np.multiply(x[src], weights[shift], out=scratch[dst])
                out[dst] += tmp
            total[shift:] += weights[shift]
            total[:-shift] += weights[shift]
        out /= total.reshape((size,) + (1,) * (x.ndim - axis - 1))
        x = out
    return x


def _upsample(x: np.ndarray, size: int, dims: int) -> np.ndarray:
    """Linear interpolation of [n, c...] onto [n, size...], one axis at a time."""
    for axis in range(1, dims + 1):
        coarse = x.shape[axis]
        position = np.linspace(0.0, coarse - 1.0, size, dtype=np.float32)
        low = np.minimum(position.astype(np.int64), coarse - 2)
        frac = (position - low).reshape((size,) + (1,) * (x.ndim - axis - 1))
        below, above = np.take(x, low, axis=axis), np.take(x, low + 1, axis=axis)
        x = below + frac * (above - below)
    return x


def render(
    rng: np.random.Generator,
    kinds: np.ndarray,
    dims: int,
    size: int,
    tissue: np.ndarray,
    background: np.ndarray,
    texture: np.ndarray,
    noise: np.ndarray,
    offset: tuple[float, float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Patches uint8 [n, 1, S...] and structure centres [n, dims] for the given kinds.

    `tissue`, `background`, `texture` and `noise` are per-sample intensities (callers repeat
    one scan's values for all of its candidates). `offset` = (lo, hi): each structure sits
    a distance U(lo, hi) from the patch centre in a random direction, as a detector's
    candidate centres miss the finding; None = the small jitter of the easy demo
    (N(0, 1.5) per axis, clipped to +-4).
    """
    if dims not in (2, 3):
        raise ValueError(f"dims must be 2 or 3, got {dims}")
    n = len(kinds)
    g = Grid(dims, size)
    patches = np.empty((n, 1) + (size,) * dims, np.uint8)
    if offset is None:  # drawn exactly as before: the easy demo's bytes must not change
        jitter = np.clip(rng.normal(0.0, 1.5, (n, dims)), -4.0, 4.0)
    else:
        jitter = _unit(rng, n, dims) * rng.uniform(offset[0], offset[1], n)[:, None]
    centres = ((size - 1) / 2 + jitter).astype(np.float32)
    coarse = max(2, size // _TEXTURE_STEP)
    chunk = max(1, _CHUNK_VOXELS // size**dims)
    for kind in KINDS:
        members = np.flatnonzero(kinds == kind)
        for start in range(0, len(members), chunk):
            idx = members[start : start + chunk]
            c, m = centres[idx], len(idx)
            edge = rng.uniform(0.8, 2.0, m).astype(np.float32)
            occ = np.maximum(_render_kind(kind, g, rng, c, edge), _clutter(g, rng, c, edge))
            lo = _col(background[idx], dims)
            img = occ * (_col(tissue[idx], dims) - lo)
            img += lo
            tex = _upsample(
                rng.standard_normal((m,) + (coarse,) * dims, dtype=np.float32), size, dims
            )
            tex *= _col(texture[idx], dims)
            img += tex
            img = _blur(img, dims)
            noise_field = rng.standard_normal(img.shape, dtype=np.float32)
            noise_field *= _col(noise[idx], dims)
            img += noise_field
            img += 0.5  # round half up by truncation below; clip first so no value wraps
            patches[idx, 0] = np.clip(img, 0.0, 255.0, out=img).astype(np.uint8)
    return patches, centres
