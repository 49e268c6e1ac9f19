"""Line charts to PNG for the benchmark scripts: matplotlib when it is installed, else a small PIL
rasteriser (PIL is a dependency of the project; matplotlib is not).

    from pngplot import Panel, Series, save_chart
    save_chart(path, [Panel("images/s vs GPUs", "GPUs", "images/s", [Series("async", xs, ys)], logx=True)])
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path

from vgrpo.report import nice_ticks

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


@dataclass
class Series:
    name: str
    x: list[float]
    y: list[float]
    dashed: bool = False


@dataclass
class Panel:
    title: str
    xlabel: str
    ylabel: str
    series: list[Series] = field(default_factory=list)
    logx: bool = False
    hline: float | None = None  # e.g. a target score


def save_chart(path: Path, panels: list[Panel], width: int = 1100, panel_height: int = 420) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _save_pil(path, panels, width, panel_height)
    fig, axes = plt.subplots(len(panels), 1, figsize=(width / 100, panel_height * len(panels) / 100))
    for ax, p in zip(list(axes) if len(panels) > 1 else [axes], panels, strict=True):
        for i, s in enumerate(p.series):
            ax.plot(s.x, s.y, "--" if s.dashed else "-", marker="o", ms=3, color=COLORS[i % 8], label=s.name)
        if p.hline is not None:
            ax.axhline(p.hline, color="grey", lw=0.8, ls=":")
        if p.logx:
            ax.set_xscale("log", base=2)
        ax.set_title(p.title)
        ax.set_xlabel(p.xlabel)
        ax.set_ylabel(p.ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _label(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000 or abs(v) < 0.01:
        return f"{v:.3g}"
    return f"{v:g}"


def _save_pil(path: Path, panels: list[Panel], width: int, panel_height: int) -> Path:
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (width, panel_height * len(panels)), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    left, right, top, bottom = 80, 30, 34, 50
    for k, p in enumerate(panels):
        y0 = k * panel_height
        x_a, x_b = left, width - right
        y_a, y_b = y0 + top, y0 + panel_height - bottom
        xs = [x for s in p.series for x in s.x if x is not None]
        ys = [y for s in p.series for y in s.y if y is not None and math.isfinite(y)]
        if p.hline is not None:
            ys.append(p.hline)
        if not xs or not ys:
            draw.text((x_a, y_a), f"{p.title}: no data", fill="black", font=font)
            continue
        x_lo, x_hi = min(_tx(x, p.logx) for x in xs), max(_tx(x, p.logx) for x in xs)
        if not p.logx and x_lo > 0:
            x_lo = 0.0  # linear axes (seconds, steps) start at 0
        if x_hi == x_lo:
            x_hi = x_lo + 1
        y_top = max(ys) * 1.05 if max(ys) > 0 else 1.0
        y_ticks = nice_ticks(min(0.0, min(ys)), y_top)
        y_lo, y_hi = y_ticks[0], max(y_ticks[-1], y_top)

        px = _Scale(x_a, x_b, x_lo, x_hi, p.logx)
        py = _Scale(y_b, y_a, y_lo, y_hi, False)

        for yt in y_ticks:  # grid and y labels
            draw.line([(x_a, py(yt)), (x_b, py(yt))], fill="#e6e6e6")
            draw.text((x_a - 8 - 6 * len(_label(yt)), py(yt) - 6), _label(yt), fill="black", font=font)
        x_ticks = (
            sorted(set(xs))
            if p.logx
            else [t for t in nice_ticks(min(xs), max(xs)) if x_lo <= t <= x_hi + 1e-9]
        )
        if len(x_ticks) > 12:
            x_ticks = x_ticks[:: math.ceil(len(x_ticks) / 12)]
        for xt in x_ticks:
            draw.line([(px(xt), y_b), (px(xt), y_b + 4)], fill="black")
            draw.text((px(xt) - 3 * len(_label(xt)), y_b + 6), _label(xt), fill="black", font=font)
        draw.rectangle([x_a, y_a, x_b, y_b], outline="black")
        if p.hline is not None:
            for xd in range(int(x_a), int(x_b), 8):
                draw.line([(xd, py(p.hline)), (xd + 3, py(p.hline))], fill="grey")
        for i, s in enumerate(p.series):
            color = COLORS[i % len(COLORS)]
            pts = [
                (px(x), py(y))
                for x, y in zip(s.x, s.y, strict=True)
                if x is not None and y is not None and math.isfinite(y)
            ]
            for a, b in itertools.pairwise(pts):
                if s.dashed:
                    _dashed(draw, a, b, color)
                else:
                    draw.line([a, b], fill=color, width=2)
            for x, y in pts:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
            ly = y_a + 8 + 14 * i  # legend
            draw.line([(x_b - 170, ly + 6), (x_b - 145, ly + 6)], fill=color, width=3)
            draw.text((x_b - 140, ly), s.name[:26], fill="black", font=font)
        draw.text((x_a, y0 + 10), p.title, fill="black", font=font)
        draw.text(((x_a + x_b) / 2 - 3 * len(p.xlabel), y_b + 24), p.xlabel, fill="black", font=font)
        draw.text((8, y_a - 20), p.ylabel, fill="black", font=font)
    img.save(path)
    return path


def _tx(v: float, log: bool) -> float:
    return math.log2(v) if log else v


@dataclass
class _Scale:
    """Data -> pixel along one axis (pixel a at value lo, b at hi)."""

    a: float
    b: float
    lo: float
    hi: float
    log: bool

    def __call__(self, v: float) -> float:
        return self.a + (_tx(v, self.log) - self.lo) / ((self.hi - self.lo) or 1) * (self.b - self.a)


def _dashed(draw: object, a: tuple[float, float], b: tuple[float, float], color: str) -> None:
    n = max(1, int(math.dist(a, b) / 6))
    for j in range(0, n, 2):
        p0 = (a[0] + (b[0] - a[0]) * j / n, a[1] + (b[1] - a[1]) * j / n)
        p1 = (a[0] + (b[0] - a[0]) * (j + 1) / n, a[1] + (b[1] - a[1]) * (j + 1) / n)
        draw.line([p0, p1], fill=color, width=2)  # type: ignore[attr-defined]
