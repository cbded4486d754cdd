"""Render a laid-out :class:`~slipform_plugin.synthetic.scene.Scene` to an RGB image with PIL and numpy.

What each attribute looks like:

- shape: the silhouette (circle, square, triangle, diamond, five-pointed star, cross);
- colour: the base RGB of the fill (:data:`~slipform_plugin.synthetic.scene.COLOURS`);
- size: the radius (``small`` 7.5% of the image side, ``large`` 12.5%);
- texture: ``solid`` fill, ``striped`` (diagonal dark stripes) or ``dotted`` (a grid of dark dots);
- material: ``matte`` (flat, with a dark outline) or ``metallic`` (a light-to-dark diagonal shading plus a
  white specular highlight).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from slipform_plugin.synthetic.scene import COLOURS, Placed, Scene

_DARK = 0.3  # brightness of the pattern's dark parts relative to the base colour
TEXTURE_PERIOD_FRACTION = 1 / 16  # stripe/dot period as a fraction of the image side (at least 4 pixels)


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "square":
        h = r * 0.85
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "star":
        pts = []
        for i in range(10):
            a = -math.pi / 2 + i * math.pi / 5
            rr = r if i % 2 == 0 else r * 0.45
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return pts
    if shape == "cross":
        w = r * 0.36
        return [
            (cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w), (cx + w, cy + w),
            (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w), (cx - r, cy - w), (cx - w, cy - w),
        ]  # fmt: skip
    return None  # circle


def _mask(shape: str, cx: float, cy: float, radius: float, n: int) -> np.ndarray:
    """Boolean ``[n, n]`` silhouette of ``shape`` centred at ``(cx, cy)`` in an ``n``-pixel box."""
    img = Image.new("L", (n, n), 0)
    draw = ImageDraw.Draw(img)
    poly = _polygon(shape, cx, cy, radius)
    if poly is None:
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=255)
    else:
        draw.polygon(poly, fill=255)
    return np.asarray(img) > 127


_SUBPIXEL = 4  # object centres are rendered on a 1/4-pixel grid, so sprites can be cached


@lru_cache(maxsize=8192)
def _sprite(
    shape: str, radius: float, texture: str, material: str, fx: float, fy: float, period: int
) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """Colour-free rendering of one object in a box of side ``2 * half + 1`` whose centre pixel is the
    object's integer position; ``(fx, fy)`` is the sub-pixel offset of the true centre.

    Returns ``(half, mask, factor, white)``: the pixel colour is ``factor * rgb`` where ``mask`` is set,
    except pure white where ``white`` is set (the metallic highlight).
    """
    half = math.ceil(radius) + 3
    n = 2 * half + 1
    cx, cy = half + fx, half + fy
    mask = _mask(shape, cx, cy, radius, n)
    ys, xs = np.mgrid[0:n, 0:n]
    factor = np.ones((n, n), dtype=np.float32)
    dark_half = max(1, period // 2)
    if texture == "striped":  # diagonal stripes, ``period // 2`` pixels wide
        factor[((xs + ys) // dark_half) % 2 == 1] = _DARK
    elif texture == "dotted":  # ``period // 2``-pixel square dots every ``period`` pixels
        factor[((xs % period) < dark_half) & ((ys % period) < dark_half)] = _DARK
    white = np.zeros((n, n), dtype=bool)
    if material == "metallic":
        # light from the top left: brightness 1.35 at the top-left edge to 0.55 at the bottom-right edge
        t = ((xs - cx) + (ys - cy)) / (2 * radius)
        factor *= np.clip(0.95 - 0.4 * t, 0.55, 1.35).astype(np.float32)
        hx, hy = cx - 0.4 * radius, cy - 0.4 * radius
        white = mask & ((xs - hx) ** 2 + (ys - hy) ** 2 <= (0.22 * radius + 0.5) ** 2)
    else:
        # matte: a one-pixel dark outline
        inner = mask.copy()
        inner[1:, :] &= mask[:-1, :]
        inner[:-1, :] &= mask[1:, :]
        inner[:, 1:] &= mask[:, :-1]
        inner[:, :-1] &= mask[:, 1:]
        factor[mask & ~inner] = 0.45
    for array in (mask, factor, white):
        array.setflags(write=False)
    return half, mask, factor, white


def _draw_object(canvas: np.ndarray, obj: Placed, period: int) -> None:
    size = canvas.shape[0]
    ix, iy = math.floor(obj.x), math.floor(obj.y)
    fx = round((obj.x - ix) * _SUBPIXEL) / _SUBPIXEL
    fy = round((obj.y - iy) * _SUBPIXEL) / _SUBPIXEL
    half, mask, factor, white = _sprite(obj.shape, obj.radius, obj.texture, obj.material, fx, fy, period)
    # the sprite's box on the canvas, clipped to the canvas
    x0, y0 = ix - half, iy - half
    cx0, cy0 = max(0, x0), max(0, y0)
    cx1, cy1 = min(size, x0 + mask.shape[1]), min(size, y0 + mask.shape[0])
    if cx1 <= cx0 or cy1 <= cy0:
        return
    window = (slice(cy0 - y0, cy1 - y0), slice(cx0 - x0, cx1 - x0))
    m, f, wh = mask[window], factor[window], white[window]
    rgb = np.asarray(COLOURS[obj.colour], dtype=np.float32)
    region = canvas[cy0:cy1, cx0:cx1]
    region[m] = np.minimum(f[m, None] * rgb, 255.0)
    region[wh] = 255.0


def render_objects(objects: Sequence[Placed], image_size: int, background: int = 30) -> np.ndarray:
    """``uint8 [image_size, image_size, 3]`` rendering of placed objects, in order, on a dark grey background."""
    canvas = np.full((image_size, image_size, 3), float(background), dtype=np.float32)
    period = max(4, round(image_size * TEXTURE_PERIOD_FRACTION))
    for obj in objects:
        _draw_object(canvas, obj, period)
    return canvas.astype(np.uint8)


def render_array(scene: Scene, image_size: int, background: int = 30) -> np.ndarray:
    """``uint8 [image_size, image_size, 3]`` rendering of a laid-out scene (see :func:`render_objects`)."""
    if not scene.objects:
        raise ValueError("scene has no laid-out objects; call layout_scene first")
    return render_objects(scene.objects, image_size, background)


def render(scene: Scene, image_size: int, background: int = 30) -> Image.Image:
    """PIL RGB rendering of a laid-out scene (see :func:`render_array`)."""
    return Image.fromarray(render_array(scene, image_size, background), "RGB")
