"""A small line chart as a PNG with Pillow only (no plotting library is a dependency): log-x axis, several
series with markers, a legend. Enough for "metric against sampling steps" figures in RESULTS.md."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

COLORS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (140, 86, 75))


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    span = (hi - lo) or abs(hi) or 1.0
    step = 10 ** math.floor(math.log10(span / n))
    for m in (1, 2, 5, 10):
        if span / (step * m) <= n:
            step *= m
            break
    start = math.floor(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step) + 2) if start + i * step <= hi + 1e-9 * span]


def line_chart(series: dict[str, tuple[Sequence[float], Sequence[float]]], path: str | Path, *, title: str,
               xlabel: str, ylabel: str, logx: bool = True, size: tuple[int, int] = (720, 440)) -> Path:
    """Write ``series`` (name -> (xs, ys)) as a PNG line chart at ``path``; returns the path."""
    if not series:
        raise ValueError("series: expected at least one (xs, ys) pair, got none")
    W, H = size
    left, right, top, bottom = 70, 200, 40, 55
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    xs_all = [x for xs, _ in series.values() for x in xs]
    ys_all = [y for _, ys in series.values() for y in ys if math.isfinite(y)]
    fx = (lambda v: math.log10(v)) if logx else (lambda v: v)
    x0, x1 = fx(min(xs_all)), fx(max(xs_all))
    pad = 0.05 * ((x1 - x0) or 1.0)
    x0, x1 = x0 - pad, x1 + pad
    y0, y1 = min(ys_all), max(ys_all)
    ypad = 0.08 * ((y1 - y0) or abs(y1) or 1.0)
    y0, y1 = max(0.0, y0 - ypad) if y0 >= 0 else y0 - ypad, y1 + ypad

    def px(x: float, y: float) -> tuple[float, float]:
        return (left + (fx(x) - x0) / (x1 - x0) * (W - left - right),
                H - bottom - (y - y0) / (y1 - y0) * (H - top - bottom))

    d.rectangle([left, top, W - right, H - bottom], outline="black")
    for y in _nice_ticks(y0, y1):
        if y0 <= y <= y1:
            _, py = px(min(xs_all), y)
            d.line([left, py, W - right, py], fill=(225, 225, 225))
            d.text((left - 6, py), f"{y:g}", fill="black", font=font, anchor="rm")
    xticks = sorted(set(xs_all))
    for x in xticks:
        qx, _ = px(x, y0)
        d.line([qx, top, qx, H - bottom], fill=(235, 235, 235))
        d.text((qx, H - bottom + 6), f"{x:g}", fill="black", font=font, anchor="mt")
    d.text(((left + W - right) / 2, H - 18), xlabel, fill="black", font=font, anchor="mm")
    d.text((10, top - 22), ylabel, fill="black", font=font, anchor="lm")
    d.text(((left + W - right) / 2, 14), title, fill="black", font=font, anchor="mm")
    for k, (name, (xs, ys)) in enumerate(series.items()):
        color = COLORS[k % len(COLORS)]
        pts = [px(x, y) for x, y in sorted(zip(xs, ys)) if math.isfinite(y)]
        if len(pts) > 1:
            d.line(pts, fill=color, width=2)
        for qx, qy in pts:
            d.ellipse([qx - 3, qy - 3, qx + 3, qy + 3], fill=color)
        ly = top + 10 + 18 * k
        d.line([W - right + 12, ly, W - right + 32, ly], fill=color, width=2)
        d.text((W - right + 38, ly), name, fill="black", font=font, anchor="lm")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG", optimize=True)
    return path
