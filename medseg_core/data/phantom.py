"""Anatomy-like phantoms with lesions: the synthetic sites' images (no downloads).

Each case is an anatomy-like phantom on a [0, 1] scale: a body ellipse of soft
tissue (~0.3) holding a mid-grey target organ (~0.6), a small bright organ
(~0.9) and a dark structure (~0.12), with a smooth texture. Lesions are 1-3
smooth elliptic blobs inside the target organ (radii 3-8 px at 64 px for the
first, 3-6 px for the others, kept 2 px apart), darker than the organ in 75 %
of cases (0.3-0.45 below it), otherwise brighter (0.28-0.36 above). Dark
lesions are as dark as soft tissue or the dark structure and bright ones as
bright as the bright organ, so no intensity threshold finds them: the model
needs the organ context. In 3D, lesions are ellipsoids spanning 1-5
consecutive slices (typically 3).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = ["render_phantom"]


@dataclass(frozen=True)
class _Ellipse:
    cx: float  # centre, normalised coordinates in [-1, 1]
    cy: float
    ra: float  # radii, normalised
    rb: float
    theta: float  # rotation, radians
    rz: float = np.inf  # half-extent along depth, normalised (3D)
    drift: float = 0.0  # centre drift per unit depth (3D)


def _occupancy(e: _Ellipse, u: np.ndarray, v: np.ndarray, z: float, px: float,
               edge_px: float = 1.0) -> np.ndarray:
    """Soft (anti-aliased) inside-ellipse indicator at depth ``z`` in [-1, 1]."""
    scale_z = 1.0 - (z / e.rz) ** 2 if np.isfinite(e.rz) else 1.0
    if scale_z <= 0:
        return np.zeros_like(u)
    s = np.sqrt(scale_z)
    ra, rb = e.ra * s, e.rb * s
    cx, cy = e.cx + e.drift * z, e.cy - 0.5 * e.drift * z
    c, sn = np.cos(e.theta), np.sin(e.theta)
    du, dv = u - cx, v - cy
    a = (c * du + sn * dv) / ra
    b = (-sn * du + c * dv) / rb
    r = np.sqrt(a * a + b * b)
    # (1 - r) * min radius ~ signed distance to the boundary, in pixels
    dist_px = (1.0 - r) * min(ra, rb) / px
    return np.clip(0.5 + dist_px / edge_px, 0.0, 1.0)


def _smooth_noise(shape: tuple[int, ...], rng: np.random.Generator, sigma: float) -> np.ndarray:
    sig = (sigma, sigma) + ((1.0,) if len(shape) == 3 else ())
    n = ndimage.gaussian_filter(rng.normal(size=shape), sigma=sig, mode="wrap")
    return n / max(float(n.std()), 1e-8)


def render_phantom(
    rng: np.random.Generator, size: int, depth: int | None, with_lesion: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Render one phantom and its lesion mask on the full-resolution grid.

    Parameters
    ----------
    rng
        Anatomy random source (all draws come from it).
    size
        In-plane size ``S`` (lesion radii scale with ``S / 64``).
    depth
        ``None`` for a 2D image, else the number of slices ``D``.
    with_lesion
        Whether to place 1-3 lesions.

    Returns
    -------
    image : np.ndarray
        ``(S, S)`` or ``(S, S, D)`` float64, roughly in ``[0, 1]``.
    mask : np.ndarray
        Same shape, uint8, 1 = lesion.
    """
    px = 2.0 / size  # one pixel in normalised units
    coords = (np.arange(size) + 0.5) * px - 1.0
    u, v = np.meshgrid(coords, coords, indexing="ij")
    zs = [0.0] if depth is None else list(np.linspace(-1.0, 1.0, depth) if depth > 1 else [0.0])

    body = _Ellipse(rng.uniform(-0.05, 0.05), rng.uniform(-0.05, 0.05),
                    rng.uniform(0.8, 0.9), rng.uniform(0.62, 0.75), rng.uniform(-0.2, 0.2))
    side = rng.choice([-1.0, 1.0])
    target = _Ellipse(body.cx + side * rng.uniform(0.2, 0.35), body.cy + rng.uniform(-0.12, 0.12),
                      rng.uniform(0.36, 0.46), rng.uniform(0.3, 0.38), rng.uniform(-np.pi, np.pi),
                      rz=rng.uniform(1.2, 1.6), drift=rng.uniform(-0.08, 0.08))
    bright = _Ellipse(body.cx - side * rng.uniform(0.35, 0.5), body.cy + rng.uniform(0.1, 0.3),
                      rng.uniform(0.12, 0.18), rng.uniform(0.08, 0.12), rng.uniform(-np.pi, np.pi),
                      rz=rng.uniform(0.8, 1.3))
    dark = _Ellipse(body.cx - side * rng.uniform(0.2, 0.4), body.cy - rng.uniform(0.1, 0.35),
                    rng.uniform(0.08, 0.14), rng.uniform(0.06, 0.1), rng.uniform(-np.pi, np.pi),
                    rz=rng.uniform(0.9, 1.5))
    i_body = rng.uniform(0.27, 0.33)
    i_target = rng.uniform(0.56, 0.64)
    i_bright = rng.uniform(0.86, 0.94)
    i_dark = rng.uniform(0.08, 0.16)

    shape = (size, size) if depth is None else (size, size, depth)
    texture = _smooth_noise(shape, rng, sigma=2.0 * size / 64)
    fine = _smooth_noise(shape, rng, sigma=0.7)

    n_lesions = int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2])) if with_lesion else 0
    lesion_draws = []
    for j in range(n_lesions):
        r_px = rng.uniform(3.0, 8.0 if j == 0 else 6.0) * size / 64
        polarity = -1.0 if rng.uniform() < 0.75 else 1.0
        contrast = rng.uniform(0.3, 0.45) if polarity < 0 else rng.uniform(0.28, 0.36)
        lesion_draws.append(
            {"r_px": r_px, "aspect": rng.uniform(0.7, 1.0),
             "theta": rng.uniform(-np.pi, np.pi), "polarity": polarity,
             "contrast": contrast, "pick": rng.uniform(),
             "z_centre": rng.uniform(0.15, 0.85), "rz_slices": rng.uniform(1.3, 2.5)}
        )

    image = np.zeros(shape, dtype=np.float64)
    mask = np.zeros(shape, dtype=np.uint8)
    target_occ = np.zeros(shape, dtype=np.float64)
    for k, z in enumerate(zs):
        sl = (slice(None), slice(None)) if depth is None else (slice(None), slice(None), k)
        x = np.zeros_like(u)
        occ_b = _occupancy(body, u, v, z, px)
        x = x * (1 - occ_b) + i_body * occ_b
        occ_t = _occupancy(target, u, v, z, px) * occ_b
        x = x * (1 - occ_t) + i_target * occ_t
        visible_t = occ_t.copy()
        for organ, val in ((bright, i_bright), (dark, i_dark)):
            occ = _occupancy(organ, u, v, z, px) * occ_b
            x = x * (1 - occ) + val * occ
            visible_t *= 1 - occ
        image[sl] = x
        target_occ[sl] = visible_t

    n_slices = 1 if depth is None else depth
    planes = [(target_occ if depth is None else target_occ[..., k]) >= 0.5
              for k in range(n_slices)]
    taken = [np.zeros((size, size), dtype=bool) for _ in range(n_slices)]
    min_r = 3.0 * size / 64
    for j, d in enumerate(lesion_draws):
        k_c = 0 if depth is None else round(d["z_centre"] * (depth - 1))
        inside = ndimage.distance_transform_edt(planes[k_c] & ~taken[k_c])
        r_px = d["r_px"]
        candidates = np.argwhere(inside >= r_px + 1.0)
        while len(candidates) == 0 and r_px > min_r:  # shrink to fit
            r_px = max(min_r, 0.8 * r_px)
            candidates = np.argwhere(inside >= r_px + 1.0)
        if len(candidates) == 0 and j == 0:  # a positive case always gets a lesion
            candidates = np.argwhere(inside >= max(float(inside.max()) * 0.6, 1.0))
        if len(candidates) == 0:
            continue
        ci, cj = candidates[int(d["pick"] * len(candidates)) % len(candidates)]
        r = r_px * px
        value = i_target + d["polarity"] * d["contrast"]
        for k in range(n_slices):
            dz = 0.0 if depth is None else (k - k_c) / d["rz_slices"]
            if abs(dz) >= 1.0:
                continue
            shrink = np.sqrt(1.0 - dz * dz)  # ellipsoid cross-section
            les = _Ellipse(coords[ci], coords[cj], r * shrink, r * d["aspect"] * shrink,
                           d["theta"])
            sl = (slice(None), slice(None)) if depth is None else (slice(None), slice(None), k)
            occ = _occupancy(les, u, v, 0.0, px, edge_px=1.5) * target_occ[sl]
            image[sl] = image[sl] * (1 - occ) + value * occ
            mask[sl] |= (occ >= 0.5).astype(np.uint8)
            # keep later lesions apart (2 px gap) so lesions stay separate blobs
            disc = _occupancy(_Ellipse(coords[ci], coords[cj], r * shrink + 2 * px,
                                       r * shrink + 2 * px, 0.0), u, v, 0.0, px) > 0
            taken[k] |= disc

    body_occ = image > 0.02
    image = image * (1.0 + 0.05 * texture * body_occ) + 0.015 * fine * body_occ
    return image, mask
