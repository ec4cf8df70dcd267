"""Draws a sandbox creature from its attributes, so every image has exact ground truth.

Shapes are drawn in the creature's own unit coordinates and mapped through one pose transform
(position, scale, tilt), at 4x resolution and then downsampled with LANCZOS for antialiasing.
Classes are chosen to stay distinguishable at 32 px: saturated colours, a dark outline around
the body, thick facial strokes.
"""

from __future__ import annotations

import math
from typing import Any

from PIL import Image, ImageDraw

__all__ = [
    "ATTRIBUTE_VALUES",
    "COLORS",
    "IDENTITY_ATTRIBUTES",
    "IMAGE_ATTRIBUTES",
    "render",
]

RGB = tuple[int, int, int]

COLORS: dict[str, RGB] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (245, 220, 40),
    "green": (40, 170, 60),
    "teal": (20, 170, 170),
    "blue": (40, 80, 225),
    "purple": (140, 60, 200),
    "pink": (250, 130, 190),
    "black": (25, 25, 25),
    "white": (250, 250, 250),
}

ATTRIBUTE_VALUES: dict[str, list[str]] = {
    "body_shape": ["circle", "square", "triangle", "diamond", "pill"],
    "body_color": ["red", "orange", "yellow", "green", "teal", "blue", "purple", "pink"],
    "eyes": ["dot", "wide", "sleepy"],
    "accessory": ["hat", "bow", "scarf", "glasses", "none"],
    "accessory_color": ["black", "white", "red", "blue", "yellow", "green"],
    "expression": ["happy", "sad", "surprised", "angry"],
    "pose": ["left", "center", "right", "small", "large"],
    "scene": ["beach", "forest", "night", "snow", "room"],
}
IDENTITY_ATTRIBUTES = ("body_shape", "body_color", "eyes", "accessory", "accessory_color")
IMAGE_ATTRIBUTES = ("expression", "pose", "scene")

_SUPERSAMPLE = 4
_INK: RGB = (20, 20, 20)
# pose -> (centre x, centre y, radius) as fractions of the canvas, and tilt in degrees
_POSES: dict[str, tuple[float, float, float, float]] = {
    "left": (0.30, 0.56, 0.25, -12.0),
    "center": (0.50, 0.56, 0.28, 0.0),
    "right": (0.70, 0.56, 0.25, 12.0),
    "small": (0.50, 0.62, 0.17, 0.0),
    "large": (0.50, 0.60, 0.36, 0.0),
}


class _Pose:
    """Maps the creature's unit coordinates (body radius 1, y down) onto the canvas."""

    def __init__(self, pose: str, canvas: int):
        cx, cy, r, tilt = _POSES[pose]
        self.cx, self.cy, self.r = cx * canvas, cy * canvas, r * canvas
        self.cos, self.sin = math.cos(math.radians(tilt)), math.sin(math.radians(tilt))

    def pt(self, u: float, v: float) -> tuple[float, float]:
        return (self.cx + self.r * (u * self.cos - v * self.sin), self.cy + self.r * (u * self.sin + v * self.cos))

    def pts(self, points: list[tuple[float, float]]) -> list[tuple[float, float]]:
        return [self.pt(u, v) for u, v in points]

    def width(self, w: float) -> int:
        return max(1, round(w * self.r))


def _ellipse(cu: float, cv: float, ru: float, rv: float, n: int = 28, start: float = 0.0, end: float = 360.0):
    """Points on an ellipse arc (degrees, y down), so ellipses rotate with the pose like polygons."""
    steps = n if end - start >= 360 else max(2, round(n * (end - start) / 360))
    full = end - start >= 360
    count = steps if full else steps + 1
    return [
        (cu + ru * math.cos(math.radians(start + (end - start) * i / steps)),
         cv + rv * math.sin(math.radians(start + (end - start) * i / steps)))
        for i in range(count)
    ]


def _body_outline(shape: str) -> list[tuple[float, float]]:
    if shape == "circle":
        return _ellipse(0, 0, 1, 1, n=40)
    if shape == "square":
        return [(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)]
    if shape == "triangle":
        return [(0.0, -1.15), (1.1, 0.85), (-1.1, 0.85)]
    if shape == "diamond":
        return [(0.0, -1.15), (1.05, 0.0), (0.0, 1.15), (-1.05, 0.0)]
    return _ellipse(-0.6, 0, 0.6, 0.6, 20, 90, 270) + _ellipse(0.6, 0, 0.6, 0.6, 20, -90, 90)  # pill


def _draw_background(draw: ImageDraw.ImageDraw, scene: str, s: int) -> None:
    def rect(x0: float, y0: float, x1: float, y1: float, color: RGB) -> None:
        draw.rectangle([x0 * s, y0 * s, x1 * s, y1 * s], fill=color)

    if scene == "beach":
        rect(0, 0, 1, 0.45, (135, 205, 250))
        rect(0, 0.45, 1, 0.62, (30, 120, 200))
        rect(0, 0.62, 1, 1, (240, 215, 150))
        draw.ellipse([0.78 * s, 0.06 * s, 0.94 * s, 0.22 * s], fill=(255, 235, 90))
    elif scene == "forest":
        rect(0, 0, 1, 1, (120, 170, 110))
        for x in (0.05, 0.3, 0.55, 0.8):
            draw.polygon([(x * s, 0.7 * s), ((x + 0.1) * s, 0.08 * s), ((x + 0.2) * s, 0.7 * s)], fill=(25, 90, 40))
        rect(0, 0.78, 1, 1, (110, 75, 40))
    elif scene == "night":
        rect(0, 0, 1, 1, (15, 20, 60))
        for x, y in ((0.1, 0.1), (0.35, 0.2), (0.6, 0.08), (0.88, 0.3), (0.15, 0.45), (0.72, 0.5)):
            draw.ellipse([(x - 0.015) * s, (y - 0.015) * s, (x + 0.015) * s, (y + 0.015) * s], fill=(255, 255, 220))
        draw.ellipse([0.72 * s, 0.05 * s, 0.9 * s, 0.23 * s], fill=(240, 240, 200))
        draw.ellipse([0.77 * s, 0.03 * s, 0.95 * s, 0.21 * s], fill=(15, 20, 60))
    elif scene == "snow":
        rect(0, 0, 1, 1, (195, 210, 230))
        rect(0, 0.72, 1, 1, (245, 248, 255))
        for x, y in ((0.1, 0.15), (0.4, 0.08), (0.7, 0.2), (0.9, 0.45), (0.2, 0.5), (0.55, 0.35)):
            draw.ellipse([(x - 0.02) * s, (y - 0.02) * s, (x + 0.02) * s, (y + 0.02) * s], fill=(255, 255, 255))
    else:  # room
        rect(0, 0, 1, 0.75, (225, 200, 160))
        rect(0, 0.75, 1, 1, (140, 90, 50))
        rect(0.06, 0.1, 0.3, 0.38, (150, 200, 240))
        rect(0.17, 0.1, 0.19, 0.38, (90, 60, 40))


def _draw_eyes(draw: ImageDraw.ImageDraw, p: _Pose, eyes: str) -> None:
    for side in (-1, 1):
        u, v = 0.36 * side, -0.15
        if eyes == "dot":
            draw.polygon(p.pts(_ellipse(u, v, 0.12, 0.12, 16)), fill=_INK)
        elif eyes == "wide":
            draw.polygon(p.pts(_ellipse(u, v, 0.24, 0.24, 20)), fill=(255, 255, 255), outline=_INK, width=p.width(0.04))
            draw.polygon(p.pts(_ellipse(u, v, 0.1, 0.1, 14)), fill=_INK)
        else:  # sleepy: a closed lid
            draw.line(p.pts(_ellipse(u, v - 0.06, 0.2, 0.12, 16, 0, 180)), fill=_INK, width=p.width(0.09))


def _draw_expression(draw: ImageDraw.ImageDraw, p: _Pose, expression: str) -> None:
    stroke = p.width(0.1)
    if expression == "happy":
        draw.line(p.pts(_ellipse(0, 0.2, 0.36, 0.26, 20, 0, 180)), fill=_INK, width=stroke, joint="curve")
    elif expression == "sad":
        draw.line(p.pts(_ellipse(0, 0.62, 0.34, 0.2, 20, 180, 360)), fill=_INK, width=stroke, joint="curve")
        for side in (-1, 1):  # brows raised towards the middle
            draw.line(p.pts([(0.2 * side, -0.44), (0.52 * side, -0.34)]), fill=_INK, width=stroke)
    elif expression == "surprised":
        draw.polygon(p.pts(_ellipse(0, 0.45, 0.15, 0.2, 18)), fill=_INK)
    else:  # angry
        draw.line(p.pts([(-0.3, 0.48), (0.3, 0.48)]), fill=_INK, width=stroke)
        for side in (-1, 1):  # brows slanted down towards the middle
            draw.line(p.pts([(0.14 * side, -0.32), (0.56 * side, -0.5)]), fill=_INK, width=stroke)


def _draw_accessory(draw: ImageDraw.ImageDraw, p: _Pose, accessory: str, color: RGB, top: float) -> None:
    edge = p.width(0.05)
    if accessory == "hat":
        draw.polygon(p.pts([(-0.75, top + 0.05), (0.75, top + 0.05), (0.75, top - 0.1), (-0.75, top - 0.1)]),
                     fill=color, outline=_INK, width=edge)
        draw.polygon(p.pts([(-0.45, top - 0.1), (0.45, top - 0.1), (0.45, top - 0.65), (-0.45, top - 0.65)]),
                     fill=color, outline=_INK, width=edge)
    elif accessory == "bow":
        for side in (-1, 1):
            draw.polygon(p.pts([(0.0, top + 0.05), (0.65 * side, top - 0.4), (0.65 * side, top + 0.5)]),
                         fill=color, outline=_INK, width=edge)
        draw.polygon(p.pts(_ellipse(0, top + 0.05, 0.17, 0.17, 12)), fill=color, outline=_INK, width=edge)
    elif accessory == "scarf":
        draw.polygon(p.pts([(-0.95, 0.62), (0.95, 0.62), (0.95, 0.86), (-0.95, 0.86)]), fill=color, outline=_INK, width=edge)
        draw.polygon(p.pts([(0.35, 0.8), (0.65, 0.8), (0.7, 1.3), (0.4, 1.3)]), fill=color, outline=_INK, width=edge)
    elif accessory == "glasses":
        for side in (-1, 1):
            draw.line(p.pts(_ellipse(0.36 * side, -0.15, 0.3, 0.28, 20)) + [p.pt(0.36 * side + 0.3, -0.15)],
                      fill=color, width=p.width(0.1))
        draw.line(p.pts([(-0.08, -0.18), (0.08, -0.18)]), fill=color, width=p.width(0.1))


def render(attrs: dict[str, Any], size: int = 32) -> Image.Image:
    """An RGB `size`x`size` image of the creature described by `attrs` (every key of ATTRIBUTE_VALUES)."""
    bad = [f"{k}={attrs.get(k)!r}" for k, values in ATTRIBUTE_VALUES.items() if attrs.get(k) not in values]
    if bad:
        raise ValueError(f"cannot render {', '.join(bad)}; allowed values: {ATTRIBUTE_VALUES}")
    canvas = size * _SUPERSAMPLE
    image = Image.new("RGB", (canvas, canvas))
    draw = ImageDraw.Draw(image)
    _draw_background(draw, attrs["scene"], canvas)
    pose = _Pose(attrs["pose"], canvas)
    outline = _body_outline(attrs["body_shape"])
    draw.polygon(pose.pts(outline), fill=COLORS[attrs["body_color"]], outline=_INK, width=pose.width(0.07))
    _draw_eyes(draw, pose, attrs["eyes"])
    _draw_expression(draw, pose, attrs["expression"])
    top = min(v for _, v in outline)
    _draw_accessory(draw, pose, attrs["accessory"], COLORS[attrs["accessory_color"]], top)
    return image.resize((size, size), Image.Resampling.LANCZOS)
