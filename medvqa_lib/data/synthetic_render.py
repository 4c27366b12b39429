"""Procedural geometry and drawing of the synthetic radiology images.

Coordinates are fractions of the image side: ``x`` grows to the image right, ``y`` downwards.
Images follow the radiological convention: the patient's right is on the image left, so the
layout entry ``right_lung`` has ``x < 0.5`` and ``left_kidney`` has ``x > 0.5``. Axial slices
are seen from the feet with the anterior side at the top; chest X-rays are frontal PA views.

A *layout* maps an organ name to ``[cx, cy, rx, ry, angle, taper]`` (an ellipse whose width
grows by ``taper`` towards its lower end). Lesions are dicts with ``x``, ``y`` and radius ``r``.
The random generator passed to :func:`render_image` only varies grey levels, textures, noise
and small shape wobbles; every position that answers a question is in the attributes.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image

Shape = list[float]

#: Anatomy templates per scene, before per-image jitter (see the module docstring).
BASE_LAYOUTS: dict[str, dict[str, Shape]] = {
    "ct_chest": {
        "body": [0.5, 0.52, 0.44, 0.32, 0.0, 0.0],
        "right_lung": [0.31, 0.48, 0.145, 0.205, 0.1, 0.0],
        "left_lung": [0.69, 0.48, 0.145, 0.205, -0.1, 0.0],
        "heart": [0.56, 0.43, 0.12, 0.095, -0.35, 0.0],
        "aorta": [0.56, 0.615, 0.032, 0.032, 0.0, 0.0],
        "spine": [0.5, 0.71, 0.052, 0.046, 0.0, 0.0],
    },
    "ct_abdomen": {
        "body": [0.5, 0.52, 0.43, 0.34, 0.0, 0.0],
        "liver": [0.35, 0.43, 0.2, 0.165, 0.25, 0.0],
        "spleen": [0.74, 0.5, 0.07, 0.11, -0.4, 0.0],
        "stomach": [0.61, 0.34, 0.1, 0.065, -0.2, 0.0],
        "right_kidney": [0.37, 0.665, 0.06, 0.085, 0.35, 0.0],
        "left_kidney": [0.63, 0.665, 0.06, 0.085, -0.35, 0.0],
        "aorta": [0.53, 0.6, 0.028, 0.028, 0.0, 0.0],
        "spine": [0.5, 0.72, 0.055, 0.05, 0.0, 0.0],
    },
    "mri_axial": {
        "head": [0.5, 0.5, 0.37, 0.45, 0.0, 0.0],
        "brain": [0.5, 0.5, 0.315, 0.395, 0.0, 0.0],
        "right_ventricle": [0.455, 0.45, 0.024, 0.1, -0.35, 0.0],
        "left_ventricle": [0.545, 0.45, 0.024, 0.1, 0.35, 0.0],
    },
    "mri_coronal": {
        "head": [0.5, 0.45, 0.38, 0.41, 0.0, 0.0],
        "brain": [0.5, 0.43, 0.33, 0.33, 0.0, -0.12],
        "right_ventricle": [0.455, 0.4, 0.028, 0.07, -0.45, 0.0],
        "left_ventricle": [0.545, 0.4, 0.028, 0.07, 0.45, 0.0],
        "brainstem": [0.5, 0.77, 0.06, 0.1, 0.0, 0.0],
    },
    "xray_chest": {
        "body": [0.5, 0.6, 0.56, 0.62, 0.0, 0.0],
        "right_lung": [0.31, 0.48, 0.15, 0.3, 0.05, 0.35],
        "left_lung": [0.69, 0.48, 0.145, 0.29, -0.05, 0.35],
        "heart": [0.555, 0.64, 0.14, 0.115, -0.2, 0.0],
        "spine": [0.5, 0.5, 0.035, 0.6, 0.0, 0.0],
    },
}

SCENES: tuple[str, ...] = tuple(BASE_LAYOUTS)


# --------------------------------------------------------------------------- geometry


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates as fractions of the side (read-only)."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    x, y = np.meshgrid(c, c)
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


def _local(x: Any, y: Any, shape: Shape) -> tuple[Any, Any, Any]:
    """Coordinates in the ellipse frame and the (tapered) half-width at each point."""
    cx, cy, rx, ry, ang, taper = shape
    dx, dy = x - cx, y - cy
    c, s = math.cos(ang), math.sin(ang)
    u = dx * c + dy * s
    v = -dx * s + dy * c
    rx_eff = rx * (1.0 + taper * np.clip(v / ry, -1.0, 1.0)) if taper else rx
    return u, v, rx_eff


def shape_rho(x: Any, y: Any, shape: Shape, wobble: tuple = ()) -> Any:
    """Normalised radius: < 1 inside the shape, 1 on its border (works on scalars and grids)."""
    u, v, rx_eff = _local(x, y, shape)
    rho = np.sqrt((u / rx_eff) ** 2 + (v / shape[3]) ** 2)
    if wobble:
        theta = np.arctan2(v / shape[3], u / rx_eff)
        rho = rho / (1.0 + sum(a * np.sin(k * theta + p) for a, k, p in wobble))
    return rho


def resized(shape: Shape, dr: float) -> Shape:
    """The shape with both half-axes grown by ``dr`` (shrunk when negative)."""
    cx, cy, rx, ry, ang, taper = shape
    return [cx, cy, max(rx + dr, 1e-3), max(ry + dr, 1e-3), ang, taper]


def scaled(shape: Shape, k: float) -> Shape:
    """The shape with both half-axes multiplied by ``k``."""
    cx, cy, rx, ry, ang, taper = shape
    return [cx, cy, rx * k, ry * k, ang, taper]


def point_rho(x: float, y: float, shape: Shape) -> float:
    """:func:`shape_rho` of one point, in plain floats."""
    cx, cy, rx, ry, ang, taper = shape
    dx, dy = x - cx, y - cy
    c, s = math.cos(ang), math.sin(ang)
    u, v = dx * c + dy * s, -dx * s + dy * c
    if taper:
        rx *= 1.0 + taper * min(1.0, max(-1.0, v / ry))
    return math.hypot(u / rx, v / ry)


def disc_inside(shape: Shape, x: float, y: float, r: float) -> bool:
    """Whether a disc of radius ``r`` lies (approximately) inside ``shape``."""
    return point_rho(x, y, resized(shape, -r)) < 1.0


def disc_overlaps(shape: Shape, x: float, y: float, r: float) -> bool:
    """Whether a disc of radius ``r`` touches ``shape``."""
    return point_rho(x, y, resized(shape, r)) < 1.0


def sample_layout(scene: str, rng: np.random.Generator) -> dict[str, Shape]:
    """A jittered copy of the scene's anatomy template (global scale/shift, per-organ jitter)."""
    scale = rng.uniform(0.93, 1.04)
    shift = rng.uniform(-0.018, 0.018, size=2)
    layout = {}
    for name, (cx, cy, rx, ry, ang, taper) in BASE_LAYOUTS[scene].items():
        jx, jy = rng.uniform(-0.007, 0.007, size=2)
        kx, ky = rng.uniform(0.94, 1.06, size=2)
        layout[name] = [
            round(0.5 + (cx - 0.5) * scale + shift[0] + jx, 4),
            round(0.5 + (cy - 0.5) * scale + shift[1] + jy, 4),
            round(rx * scale * kx, 4),
            round(ry * scale * ky, 4),
            round(ang + rng.uniform(-0.06, 0.06), 4),
            taper,
        ]
    return layout


def _sample_point(rng: np.random.Generator, shape: Shape) -> tuple[float, float]:
    reach = 1.4 * max(shape[2], shape[3])
    x, y = shape[0] + rng.uniform(-reach, reach), shape[1] + rng.uniform(-reach, reach)
    return float(x), float(y)


def place_lesions(
    rng: np.random.Generator,
    layout: dict[str, Shape],
    sites: list[tuple],
    r_range: tuple[float, float],
    fit: float,
    avoid: list[str],
    tries: int = 80,
) -> list[dict] | None:
    """Non-overlapping lesion discs, one per ``(side, layout key, half)`` site, or ``None``.

    A disc must lie inside its organ (``fit`` = the share of its radius that must), in the
    requested image half (``"image_left"``/``"image_right"``, for brain hemispheres) and away
    from the ``avoid`` organs.
    """
    placed: list[dict] = []
    for side, key, half in sites:
        organ = layout[key]
        r = float(rng.uniform(*r_range))
        for _ in range(tries):
            x, y = _sample_point(rng, organ)
            ok = disc_inside(organ, x, y, r * fit + 0.008) and r < x < 1 - r and r < y < 1 - r
            if half == "image_left":
                ok = ok and x + r + 0.012 < organ[0]
            elif half == "image_right":
                ok = ok and x - r - 0.012 > organ[0]
            ok = ok and not any(disc_overlaps(layout[k], x, y, r + 0.008) for k in avoid)
            ok = ok and all(math.hypot(x - p["x"], y - p["y"]) > r + p["r"] + 0.015 for p in placed)
            if ok:
                zone = "upper" if y < organ[1] else "lower"
                placed.append(
                    {
                        "x": round(x, 4),
                        "y": round(y, 4),
                        "r": round(r, 4),
                        "side": side,
                        "zone": zone,
                        "layout_key": key,
                    }
                )
                break
        else:
            return None
    return placed


# --------------------------------------------------------------------------- painting


class Canvas:
    """A float image in [0, 1] with soft-edged painting operations."""

    def __init__(self, size: int, fill: float = 0.0):
        self.size = size
        self.x, self.y = _grid(size)
        self.img = np.full((size, size), fill, dtype=np.float32)

    def _window(self, shape: Shape, edge_px: float) -> tuple[slice, slice]:
        """Rows and columns that can be touched by ``shape`` (with room for wobble)."""
        cx, cy, rx, ry, _, taper = shape
        reach = 1.3 * max(rx * (1 + abs(taper)), ry) + (edge_px + 1) / self.size
        return self._span(cy, reach), self._span(cx, reach)

    def _span(self, centre: float, reach: float) -> slice:
        lo = max(0, int((centre - reach) * self.size))
        return slice(lo, max(lo, min(self.size, int((centre + reach) * self.size) + 2)))

    def _soft(self, rho: np.ndarray, shape: Shape, edge_px: float) -> np.ndarray:
        width = min(shape[2], shape[3]) * self.size / max(edge_px, 1e-3)
        return np.clip((1.0 - rho) * width + 0.5, 0.0, 1.0)

    def mask(self, shape: Shape, edge_px: float = 1.0, wobble: tuple = ()) -> np.ndarray:
        """Soft mask of ``shape`` (about ``edge_px`` pixels of anti-aliased border)."""
        return self._soft(shape_rho(self.x, self.y, shape, wobble), shape, edge_px)

    def paint(self, mask: np.ndarray, value: Any) -> None:
        """Blend towards ``value`` (scalar or array) where ``mask`` is 1."""
        self.img += mask * (value - self.img)

    def fill(self, shape: Shape, value: Any, edge_px: float = 1.0, wobble: tuple = ()) -> None:
        """Paint ``shape`` with ``value``, computing only the window the shape can cover."""
        win = self._window(shape, edge_px)
        rho = shape_rho(self.x[win], self.y[win], shape, wobble)
        m = self._soft(rho, shape, edge_px)
        if isinstance(value, np.ndarray):
            value = value[win]
        self.img[win] += m * (value - self.img[win])


def _texture(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth zero-mean noise with about ``cells`` blobs across the image."""
    g = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(g).resize((size, size), Image.BICUBIC))


def _blur(img: np.ndarray, sigma_px: float) -> np.ndarray:
    """Separable Gaussian blur with edge padding."""
    radius = max(1, int(math.ceil(2.5 * sigma_px)))
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma_px) ** 2).astype(np.float32)
    k /= k.sum()
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (radius, radius)
        p = np.pad(img, pad, mode="edge")
        n = img.shape[axis]
        img = sum(w * np.take(p, range(i, i + n), axis=axis) for i, w in enumerate(k))
    return img


def _wobble(rng: np.random.Generator, amp: float, freqs: tuple[int, ...] = (3, 5)) -> tuple:
    return tuple((amp * rng.uniform(0.4, 1.0), k, rng.uniform(0, 2 * math.pi)) for k in freqs)


def _lesion_shape(les: dict, rng: np.random.Generator) -> Shape:
    aspect = rng.uniform(0.85, 1.0)
    return [les["x"], les["y"], les["r"], les["r"] * aspect, rng.uniform(0, math.pi), 0.0]


def _vertebra(cv: Canvas, spine: Shape, bone: float, marrow: float, canal: float) -> None:
    cx, cy, rx, ry = spine[:4]
    cv.fill(spine, bone)
    cv.fill(scaled(spine, 0.72), marrow)
    cv.fill([cx, cy + ry + 0.028, 0.024, 0.02, 0.0, 0.0], bone)
    cv.fill([cx, cy + ry + 0.028, 0.015, 0.013, 0.0, 0.0], canal)
    cv.fill([cx, cy + ry + 0.07, 0.011, 0.035, 0.0, 0.0], bone)
    for side in (-1, 1):
        cv.fill([cx + side * 0.045, cy + ry + 0.035, 0.028, 0.01, side * 0.6, 0.0], bone)


# --------------------------------------------------------------------------- scenes


def _draw_ct_chest(cv: Canvas, attrs: dict, rng: np.random.Generator) -> None:
    lay = attrs["layout"]
    body = lay["body"]
    cv.fill(body, 0.30 + 0.02 * rng.standard_normal())
    cv.fill(resized(body, -0.03), 0.45 + 0.02 * rng.standard_normal(), edge_px=2)
    lung_tex = 0.05 + 0.015 * _texture(rng, cv.size, 12)
    for name in ("right_lung", "left_lung"):
        lung = lay[name]
        for t in np.linspace(-0.9, 0.9, 5) + rng.uniform(-0.1, 0.1):
            side = 1 if lung[0] < 0.5 else -1
            ang = math.pi + t if side > 0 else t
            rib_x = lung[0] + 1.12 * lung[2] * math.cos(ang)
            rib_y = lung[1] + 1.08 * lung[3] * math.sin(ang)
            cv.fill([rib_x, rib_y, 0.018, 0.009, ang, 0.0], 0.85)
        cv.fill(lung, lung_tex, edge_px=1.2, wobble=_wobble(rng, 0.02))
    heart = lay["heart"]
    cv.fill(resized(heart, 0.012), 0.32)
    cv.fill(heart, 0.53 + 0.02 * rng.standard_normal())
    cv.fill(lay["aorta"], 0.66 + 0.03 * rng.standard_normal())
    _vertebra(cv, lay["spine"], 0.88, 0.72, 0.4)
    for les in attrs.get("lesions", []):
        cv.fill(_lesion_shape(les, rng), rng.uniform(0.52, 0.62), 0.8, _wobble(rng, 0.08))
    _table(cv, body)


def _table(cv: Canvas, body: Shape) -> None:
    y0 = body[1] + body[3] + 0.05
    band = (np.abs(cv.y - y0) < 0.01) & (np.abs(cv.x - 0.5) < 0.42)
    cv.paint(band.astype(np.float32), 0.22)


def _draw_ct_abdomen(cv: Canvas, attrs: dict, rng: np.random.Generator) -> None:
    lay = attrs["layout"]
    body = lay["body"]
    cv.fill(body, 0.30 + 0.02 * rng.standard_normal())
    cv.fill(resized(body, -0.03), 0.46, edge_px=2)
    cv.fill(resized(body, -0.05), 0.31 + 0.02 * rng.standard_normal(), edge_px=2)
    for _ in range(rng.integers(4, 8)):
        bx, by = rng.uniform(0.4, 0.68), rng.uniform(0.42, 0.58)
        r = rng.uniform(0.025, 0.04)
        cv.fill([bx, by, r, r * 0.8, rng.uniform(0, 3), 0.0], 0.5)
        cv.fill([bx, by, r * 0.65, r * 0.5, 0.0, 0.0], rng.choice([0.05, 0.38]))
    cv.fill(lay["liver"], 0.58 + 0.02 * rng.standard_normal() + 0.01 * _texture(rng, cv.size, 10))
    cv.fill(lay["spleen"], 0.55 + 0.02 * rng.standard_normal())
    stomach = lay["stomach"]
    cv.fill(stomach, 0.42)
    air = cv.mask(stomach) * (cv.y < stomach[1] - 0.015)
    cv.paint(air.astype(np.float32), 0.03)
    for name in ("right_kidney", "left_kidney"):
        kid = lay[name]
        cv.fill(kid, 0.74 + 0.02 * rng.standard_normal())
        medial = 1 if kid[0] < 0.5 else -1
        cv.fill([kid[0] + medial * 0.025, kid[1], 0.022, 0.035, kid[4], 0.0], 0.4)
    aorta = lay["aorta"]
    cv.fill(aorta, 0.8)
    cv.fill([aorta[0] - 0.07, aorta[1] - 0.01, 0.03, 0.024, 0.0, 0.0], 0.62)
    _vertebra(cv, lay["spine"], 0.9, 0.72, 0.4)
    for les in attrs.get("lesions", []):
        if attrs.get("abnormality") == "kidney cyst":
            cv.fill(_lesion_shape(les, rng), rng.uniform(0.24, 0.32), 0.7)
        else:
            cv.fill(_lesion_shape(les, rng), rng.uniform(0.34, 0.42), 1.3, _wobble(rng, 0.07))
    _table(cv, body)


_MR_GREYS = {
    "t1": {
        "scalp": 0.72,
        "skull": 0.08,
        "csf": 0.12,
        "gm": 0.45,
        "wm": 0.68,
        "core": 0.22,
        "rim": 0.8,
        "edema": 0.36,
    },
    "t2": {
        "scalp": 0.5,
        "skull": 0.06,
        "csf": 0.93,
        "gm": 0.6,
        "wm": 0.4,
        "core": 0.88,
        "rim": 0.45,
        "edema": 0.74,
    },
}


def _brain_base(cv: Canvas, attrs: dict, rng: np.random.Generator) -> dict[str, float]:
    lay = attrs["layout"]
    g = {k: v + 0.025 * rng.standard_normal() for k, v in _MR_GREYS[attrs["weighting"]].items()}
    brain = lay["brain"]
    cv.fill(lay["head"], g["scalp"], edge_px=1.5)
    cv.fill(resized(lay["head"], -0.022), g["skull"])
    cv.fill(resized(brain, 0.014), g["csf"])
    cv.fill(brain, g["gm"], wobble=_wobble(rng, 0.015, (13, 21)))
    cv.fill(scaled(brain, 0.8), g["wm"], edge_px=1.5, wobble=_wobble(rng, 0.035, (7, 12, 17, 23)))
    return g


def _brain_tumours(cv: Canvas, attrs: dict, rng: np.random.Generator, g: dict) -> None:
    for les in attrs.get("lesions", []):
        shape = _lesion_shape(les, rng)
        wob = _wobble(rng, 0.08)
        cv.fill(shape, g["edema"], 2.0, wob)
        cv.fill(scaled(shape, 0.7), g["rim"], 1.0, wob)
        cv.fill(scaled(shape, 0.55), g["core"], 1.0, wob)


def _draw_mri_axial(cv: Canvas, attrs: dict, rng: np.random.Generator) -> None:
    lay = attrs["layout"]
    g = _brain_base(cv, attrs, rng)
    cx, cy, _, ry = lay["brain"][:4]
    fissure = (np.abs(cv.x - cx) < 0.006) & (np.abs(cv.y - cy) > 0.22 * ry)
    cv.paint((fissure * cv.mask(lay["brain"])).astype(np.float32), g["csf"])
    for name in ("right_ventricle", "left_ventricle"):
        cv.fill(lay[name], g["csf"])
    _brain_tumours(cv, attrs, rng, g)


def _draw_mri_coronal(cv: Canvas, attrs: dict, rng: np.random.Generator) -> None:
    lay = attrs["layout"]
    head = lay["head"]
    cv.fill(
        [head[0], head[1] + head[3] + 0.02, 0.2, 0.16, 0.0, 0.0], 0.5 * _MR_GREYS["t1"]["wm"], 3
    )
    g = _brain_base(cv, attrs, rng)
    cx, cy, rx, ry = lay["brain"][:4]
    cv.fill(lay["brainstem"], g["wm"], edge_px=1.5)
    falx = (np.abs(cv.x - cx) < 0.006) & (cv.y < cy - 0.1)
    cv.paint((falx * cv.mask(lay["brain"])).astype(np.float32), g["csf"])
    inside = cv.mask(resized(lay["brain"], -0.01))
    for side in (-1, 1):
        fissure = cv.mask([cx + side * 0.72 * rx, cy + 0.32 * ry, 0.1, 0.008, side * 0.25, 0.0])
        cv.paint(fissure * inside, g["csf"])
    for name in ("right_ventricle", "left_ventricle"):
        cv.fill(lay[name], g["csf"])
    cv.fill([cx, cy + 0.12, 0.007, 0.04, 0.0, 0.0], g["csf"])
    _brain_tumours(cv, attrs, rng, g)


def _ribs(cv: Canvas, lung: Shape, rng: np.random.Generator) -> np.ndarray:
    """A mask of posterior rib shadows crossing one lung."""
    side = -1 if lung[0] < 0.5 else 1
    top = lung[1] - lung[3]
    d = np.abs(cv.x - 0.5)
    out = np.zeros_like(cv.img)
    for k in range(9):
        y0 = top + 0.02 + k * (0.062 + 0.004 * rng.standard_normal())
        curve = y0 - 0.25 * d + 1.1 * d * d
        out = np.maximum(out, np.clip(1.0 - np.abs(cv.y - curve) / 0.011, 0.0, 1.0))
    return out * (side * (cv.x - 0.5) > 0.03)


def _opacity(cv: Canvas, les: dict, rng: np.random.Generator) -> np.ndarray:
    """A fluffy consolidation (a few Gaussian puffs) of extent about ``r`` around its centre."""
    r = les["r"]
    blob = np.zeros_like(cv.img)
    for k in range(4):
        a, d = rng.uniform(0, 2 * math.pi), (0.0 if k == 0 else rng.uniform(0.25, 0.45) * r)
        sigma = rng.uniform(0.36, 0.44) * r
        d2 = (cv.x - les["x"] - d * math.cos(a)) ** 2 + (cv.y - les["y"] - d * math.sin(a)) ** 2
        blob = np.maximum(blob, np.exp(-0.5 * d2 / sigma**2))
    return blob * (0.85 + 0.15 * _texture(rng, cv.size, 24))


def _effusion(cv: Canvas, lung: Shape) -> np.ndarray:
    lateral = np.abs(cv.x - lung[0]) / lung[2]
    level = lung[1] + 0.45 * lung[3] - 0.12 * lateral * lateral
    return cv.mask(lung) * np.clip((cv.y - level) / 0.02, 0.0, 1.0)


def _draw_xray(cv: Canvas, attrs: dict, rng: np.random.Generator) -> None:
    lay = attrs["layout"]
    soft = 0.5 + 0.03 * rng.standard_normal()
    cv.fill(lay["body"], soft + 0.02 * _texture(rng, cv.size, 6), edge_px=3)
    cv.fill([0.5, 0.02, 0.13, 0.12, 0.0, 0.0], soft, edge_px=3)
    cv.fill(lay["spine"], soft + 0.12, edge_px=2)
    lung_grey = 0.16 + 0.03 * rng.standard_normal() + 0.03 * _texture(rng, cv.size, 20)
    for name in ("right_lung", "left_lung"):
        cv.fill(lay[name], lung_grey, edge_px=2.0)
    hx, hy = lay["heart"][:2]
    hilum = np.exp(-(((cv.x - 0.5) ** 2) + ((cv.y - hy + 0.15) ** 2)) / 0.02)
    cv.img += 0.08 * hilum * (cv.img < 0.3)
    for name in ("right_lung", "left_lung"):
        cv.img += 0.07 * _ribs(cv, lay[name], rng) * (cv.img < soft + 0.2)
    for side in (-1, 1):
        cv.img += 0.12 * cv.mask([0.5 + side * 0.17, 0.17, 0.15, 0.012, side * 0.25, 0.0], 1.5)
    cv.fill([0.5, 0.17, 0.014, 0.14, 0.0, 0.0], 0.3, edge_px=2)
    cv.fill(lay["heart"], soft + 0.1, edge_px=1.5)
    left = lay["left_lung"]
    cv.fill([left[0], left[1] + left[3] + 0.04, 0.045, 0.025, 0.0, 0.0], 0.28, edge_px=2)
    _xray_findings(cv, attrs, rng)


def _xray_findings(cv: Canvas, attrs: dict, rng: np.random.Generator) -> None:
    kind = attrs.get("abnormality")
    lay = attrs["layout"]
    for les in attrs.get("lesions", []):
        if kind == "pneumonia":
            lung = cv.mask(lay[les["layout_key"]], 2.0)
            cv.img += rng.uniform(0.36, 0.45) * _opacity(cv, les, rng) * lung
        else:
            cv.img += rng.uniform(0.25, 0.32) * cv.mask(
                _lesion_shape(les, rng), 1.0, _wobble(rng, 0.06)
            )
    if kind == "pleural effusion":
        key = "left_lung" if attrs["location"].startswith("left") else "right_lung"
        cv.paint(_effusion(cv, lay[key]), 0.62)


_DRAWERS = {
    "ct_chest": _draw_ct_chest,
    "ct_abdomen": _draw_ct_abdomen,
    "mri_axial": _draw_mri_axial,
    "mri_coronal": _draw_mri_coronal,
    "xray_chest": _draw_xray,
}


def _finish(img: np.ndarray, modality: str, rng: np.random.Generator) -> np.ndarray:
    """Blur, acquisition noise and a random grey-level window."""
    size = img.shape[0]
    blur = {"x-ray": 1.0, "ct": 0.6, "mri": 0.7}[modality] * rng.uniform(0.8, 1.2) * size / 128
    img = _blur(img, max(blur, 0.3))
    sigma = rng.uniform(0.012, 0.03)
    if modality == "mri":
        bias = 1.0 + 0.08 * _texture(rng, size, 3)
        noisy = img * bias + sigma * rng.standard_normal(img.shape, dtype=np.float32)
        img = np.sqrt(noisy**2 + (sigma * rng.standard_normal(img.shape, dtype=np.float32)) ** 2)
    else:
        img = img + sigma * rng.standard_normal(img.shape, dtype=np.float32)
    contrast, bright, gamma = (
        rng.uniform(0.9, 1.1),
        rng.uniform(-0.03, 0.03),
        rng.uniform(0.85, 1.15),
    )
    return np.clip(img * contrast + bright, 0.0, 1.0) ** gamma


def render_image(attributes: dict, image_size: int, rng: np.random.Generator) -> Image.Image:
    """Draw one grayscale (mode ``"L"``) image from its ground-truth attributes.

    ``attributes`` needs ``scene`` (one of :data:`SCENES`) and ``modality``; ``layout``
    (sampled from ``rng`` when absent), ``lesions``, ``abnormality`` and, for MRI,
    ``weighting`` (``"t1"``/``"t2"``) are optional. ``rng`` only changes grey levels,
    textures and noise, so the answers to every question stay those of ``attributes``.
    """
    attrs = dict(attributes)
    scene = attrs["scene"]
    if scene not in _DRAWERS:
        from medvqa_lib.errors import unknown_name

        raise unknown_name("scene", scene, SCENES)
    if "layout" not in attrs:
        attrs["layout"] = sample_layout(scene, rng)
    attrs["weighting"] = attrs.get("weighting") or "t1"
    cv = Canvas(image_size)
    _DRAWERS[scene](cv, attrs, rng)
    img = _finish(cv.img, attrs["modality"], rng)
    return Image.fromarray((img * 255.0 + 0.5).astype(np.uint8))
