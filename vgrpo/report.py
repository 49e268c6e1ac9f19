"""``report.html``: a one-page, self-contained summary of a run directory.

Why self-contained: the report is what people attach to a message or open from a cluster's shared disk
on a laptop with no network; so images are data URIs, styles are inline and charts are inline SVG drawn
here (no JavaScript, no CDN). It is written from the run directory alone (``config.yaml``,
``metrics.jsonl``, ``samples/step_N/``), so ``vgrpo report --run-dir D`` rebuilds it for any run,
finished, interrupted or still going.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("vgrpo.report")

PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777", "#4b5563"]
PHASES = [  # the step's wall-clock phases (DESIGN.md), stacked in the breakdown chart
    ("time/rollout", "rollout (wait)"),
    ("time/reward", "reward"),
    ("time/learner", "learner"),
    ("time/weight_sync", "weight sync"),
]
MAX_SAMPLE_STEPS = 12  # sample grids shown: first, last and evenly spread between (keeps the file small)
MAX_POINTS = 1500  # points per curve: long runs are strided so the SVG stays light

Series = dict[str, list[tuple[float, float]]]


@dataclass
class Chart:
    """One chart of the report: ``id`` is stable (tests and links use it), ``svg`` is inline markup."""

    id: str
    title: str
    svg: str
    note: str = ""


# ----------------------------------------------------------------------------------------------- inputs


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl rows in step order; a torn last line (a run killed mid-write) is skipped."""
    path = run_dir / "metrics.jsonl"
    rows: dict[int, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows[row["step"]] = row  # a resumed run may rewrite a step: the last one wins
    return [rows[k] for k in sorted(rows)]


def series(rows: list[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    out = [(float(r["step"]), float(r[key])) for r in rows if _finite(r.get(key))]
    if len(out) > MAX_POINTS:
        stride = math.ceil(len(out) / MAX_POINTS)
        out = out[::stride] + ([out[-1]] if (len(out) - 1) % stride else [])
    return out


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def sample_steps(run_dir: Path) -> list[tuple[int, Path]]:
    """samples/step_N/ folders holding a grid.png, in step order, thinned to MAX_SAMPLE_STEPS."""
    root = run_dir / "samples"
    found = sorted(
        (int(p.name[5:]), p)
        for p in (root.iterdir() if root.is_dir() else [])
        if p.name.startswith("step_") and p.name[5:].isdigit() and (p / "grid.png").is_file()
    )
    if len(found) <= MAX_SAMPLE_STEPS:
        return found
    idx = sorted({round(i * (len(found) - 1) / (MAX_SAMPLE_STEPS - 1)) for i in range(MAX_SAMPLE_STEPS)})
    return [found[i] for i in idx]


# ----------------------------------------------------------------------------------------------- SVG charts


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round ticks (steps of 1, 2, 2.5 or 5 x 10^k) from at or below ``lo`` to about ``hi``
    (the charts of the report and of benchmarks/pngplot.py)."""
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks, t = [], start
    while t <= hi + step * 0.5:
        ticks.append(round(t, 12))
        t += step
    return ticks


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e6 or a < 1e-3:
        return f"{v:.1e}"
    if a >= 100:
        return f"{v:.0f}"
    return f"{v:.3g}"


class _Frame:
    """Axes of one chart: data → pixel mapping, grid lines, tick labels."""

    W, H, L, R, T, B = 560, 260, 58, 14, 12, 34

    def __init__(self, xs: Sequence[float], ys: Sequence[float], y_zero: bool = False):
        x0, x1 = (min(xs), max(xs)) if xs else (0.0, 1.0)
        y0, y1 = (min(ys), max(ys)) if ys else (0.0, 1.0)
        if y_zero:
            y0 = min(0.0, y0)
        if y1 - y0 < 1e-12:
            pad = abs(y0) * 0.1 or 1.0
            y0, y1 = y0 - pad, y1 + pad
        if x1 - x0 < 1e-12:
            x0, x1 = x0 - 1, x1 + 1
        self.yt = nice_ticks(y0, y1)
        self.y0, self.y1 = min(self.yt[0], y0), max(self.yt[-1], y1)
        self.xt = [t for t in nice_ticks(x0, x1, 6) if x0 <= t <= x1 and float(t).is_integer()] or [x0, x1]
        self.x0, self.x1 = x0, x1

    def px(self, x: float) -> float:
        return self.L + (x - self.x0) / (self.x1 - self.x0) * (self.W - self.L - self.R)

    def py(self, y: float) -> float:
        return self.H - self.B - (y - self.y0) / (self.y1 - self.y0) * (self.H - self.T - self.B)

    def axes(self, xlabel: str = "step") -> list[str]:
        out = []
        for t in self.yt:
            y = self.py(t)
            out.append(f'<line x1="{self.L}" x2="{self.W - self.R}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
            out.append(f'<text x="{self.L - 6}" y="{y + 4:.1f}" text-anchor="end">{_fmt(t)}</text>')
        for t in self.xt:
            x = self.px(t)
            out.append(f'<text x="{x:.1f}" y="{self.H - self.B + 16}" text-anchor="middle">{_fmt(t)}</text>')
        out.append(
            f'<line x1="{self.L}" x2="{self.L}" y1="{self.T}" y2="{self.H - self.B}" class="axis"/>'
            f'<line x1="{self.L}" x2="{self.W - self.R}" y1="{self.H - self.B}" y2="{self.H - self.B}" class="axis"/>'
            f'<text x="{(self.L + self.W - self.R) / 2:.0f}" y="{self.H - 4}" text-anchor="middle" '
            f'class="label">{html.escape(xlabel)}</text>'
        )
        return out


def _svg(body: list[str], legend: list[tuple[str, str]]) -> str:
    leg = "".join(
        f'<span class="key"><i style="background:{c}"></i>{html.escape(name)}</span>' for name, c in legend
    )
    return (
        f'<svg viewBox="0 0 {_Frame.W} {_Frame.H}" role="img">'
        + "".join(body)
        + "</svg>"
        + (f'<div class="legend">{leg}</div>' if legend else "")
    )


def line_chart(
    lines: Series, band: tuple[list[float], list[float]] | None = None, y_zero: bool = False
) -> str:
    """Curves over steps; points carry a <title> tooltip; an optional shaded band (mean ± std) under
    the first curve. A single point is drawn as a marker (a 1-step run still shows its value)."""
    xs = [x for pts in lines.values() for x, _ in pts]
    ys = [y for pts in lines.values() for _, y in pts]
    if band is not None:
        ys += band[0] + band[1]
    f = _Frame(xs, ys, y_zero)
    body = f.axes()
    legend = []
    for i, (name, pts) in enumerate(lines.items()):
        color = PALETTE[i % len(PALETTE)]
        legend.append((name, color))
        if band is not None and i == 0 and len(pts) == len(band[0]):
            upper = [f"{f.px(x):.1f},{f.py(h):.1f}" for (x, _), h in zip(pts, band[1], strict=True)]
            lower = [f"{f.px(x):.1f},{f.py(lo):.1f}" for (x, _), lo in zip(pts, band[0], strict=True)]
            body.append(f'<polygon points="{" ".join(upper + lower[::-1])}" fill="{color}" opacity="0.15"/>')
        if len(pts) > 1:
            path = " ".join(f"{f.px(x):.1f},{f.py(y):.1f}" for x, y in pts)
            body.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
        if len(pts) <= 60:
            for x, y in pts:
                body.append(
                    f'<circle cx="{f.px(x):.1f}" cy="{f.py(y):.1f}" r="3" fill="{color}">'
                    f"<title>{html.escape(name)} @ step {x:.0f}: {y:.6g}</title></circle>"
                )
    return _svg(body, legend)


def stacked_bars(rows: list[dict[str, Any]], parts: Sequence[tuple[str, str]]) -> str:
    """Per step, the phases stacked: where each step's wall-clock time went."""
    rows = [r for r in rows if any(_finite(r.get(k)) for k, _ in parts)]
    if len(rows) > MAX_POINTS:
        rows = rows[:: math.ceil(len(rows) / MAX_POINTS)]
    totals = [sum(float(r.get(k, 0.0)) for k, _ in parts if _finite(r.get(k))) for r in rows]
    steps = [float(r["step"]) for r in rows]
    f = _Frame([s - 0.5 for s in steps] + [s + 0.5 for s in steps], [*totals, 0.0], y_zero=True)
    body = f.axes()
    width = max(1.0, (f.px(steps[0] + 1) - f.px(steps[0])) * 0.8) if steps else 1.0
    for r, s in zip(rows, steps, strict=True):
        acc = 0.0
        for i, (k, name) in enumerate(parts):
            v = float(r[k]) if _finite(r.get(k)) else 0.0
            y_top, y_bot = f.py(acc + v), f.py(acc)
            body.append(
                f'<rect x="{f.px(s) - width / 2:.1f}" y="{y_top:.1f}" width="{width:.1f}" '
                f'height="{max(0.0, y_bot - y_top):.1f}" fill="{PALETTE[i]}">'
                f"<title>step {s:.0f} {html.escape(name)}: {v:.3f} s</title></rect>"
            )
            acc += v
    return _svg(body, [(name, PALETTE[i]) for i, (_, name) in enumerate(parts)])


# ----------------------------------------------------------------------------------------------- sections


def _role_throughput(rows: list[dict[str, Any]]) -> Series:
    """images/s per role for each step: the step's images over the seconds each role spent on them
    (rollout = sampling compute, reward = scoring, learner = the update), beside the end-to-end rate."""
    out: Series = {"end-to-end": series(rows, "images_per_s")}
    for key, name in (
        ("time/sample_compute", "rollout"),
        ("time/reward", "reward"),
        ("time/learner", "learner"),
    ):
        pts = []
        for r in rows:
            if (
                _finite(r.get(key))
                and r[key] > 0
                and _finite(r.get("images_per_s"))
                and _finite(r.get("time/step"))
            ):
                pts.append((float(r["step"]), r["images_per_s"] * r["time/step"] / r[key]))
        if pts:
            out[name] = pts
    return out


def build_charts(rows: list[dict[str, Any]]) -> list[Chart]:
    """Every chart the rows support, in reading order (a key absent from every row drops its chart)."""
    charts: list[Chart] = []
    keys = {k for r in rows for k in r}

    def add(cid: str, title: str, lines: Series, note: str = "", **kw: Any) -> None:
        lines = {k: v for k, v in lines.items() if v}
        if lines:
            charts.append(Chart(cid, title, line_chart(lines, **kw), note))

    reward = series(rows, "reward_mean")
    if reward:
        stds = {r["step"]: float(r.get("reward_std", 0.0)) for r in rows if _finite(r.get("reward_mean"))}
        band = (
            [y - stds.get(int(x), 0.0) for x, y in reward],
            [y + stds.get(int(x), 0.0) for x, y in reward],
        )
        add(
            "chart-reward",
            "Reward (weighted total, mean ± std over the batch)",
            {"reward_mean": reward},
            band=band,
        )
    per_reward = {k[7:]: series(rows, k) for k in sorted(keys) if k.startswith("reward/")}
    add("chart-rewards", "Reward per reward function (batch mean)", per_reward)
    evals = {k[5:]: series(rows, k) for k in sorted(keys) if k.startswith("eval/")}
    add("chart-eval", "Held-out evaluation", evals, "overall = mean over task families")
    add("chart-loss", "Loss", {"loss": series(rows, "loss")})
    add("chart-grad-norm", "Gradient norm", {"grad_norm": series(rows, "grad_norm")}, y_zero=True)
    add(
        "chart-throughput",
        "Throughput (images/s, per role)",
        _role_throughput(rows),
        "per role: the step's images over that role's seconds; end-to-end: over the whole step",
        y_zero=True,
    )
    if any(k in keys for k, _ in PHASES):
        charts.append(
            Chart(
                "chart-phases",
                "Phase breakdown (seconds per step)",
                stacked_bars(rows, [p for p in PHASES if p[0] in keys]),
                "rollout = waiting for samples (near 0 when sampling overlaps the update)",
            )
        )
    add(
        "chart-staleness",
        "Staleness and policy version",
        {"staleness": series(rows, "staleness"), "policy_version": series(rows, "policy_version")},
        y_zero=True,
    )
    add(
        "chart-weight-sync",
        "Weight sync (seconds)",
        {"time/weight_sync": series(rows, "time/weight_sync")},
        _bytes_note(rows),
        y_zero=True,
    )
    learner = {k[8:]: series(rows, k) for k in sorted(keys) if k.startswith("learner/")}
    add("chart-learner", "Learner diagnostics", learner)
    extra = {k: series(rows, k) for k in ("adv/zero_std_frac", "reward_retries", "lr") if k in keys}
    add(
        "chart-health",
        "Advantage and reward health",
        {k: v for k, v in extra.items() if k != "lr"},
        y_zero=True,
    )
    return charts


def _bytes_note(rows: list[dict[str, Any]]) -> str:
    sizes = [r["weight_sync_bytes"] for r in rows if _finite(r.get("weight_sync_bytes"))]
    return f"update size {sizes[-1] / 2**20:.2f} MiB per step" if sizes else ""


def _summary(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    if not rows:
        return [("steps", "0 (no metrics.jsonl rows yet)")]
    last = rows[-1]
    rewards = [r["reward_mean"] for r in rows if _finite(r.get("reward_mean"))]
    wall = sum(r.get("time/step", 0.0) for r in rows if _finite(r.get("time/step")))
    ips = [r["images_per_s"] for r in rows if _finite(r.get("images_per_s"))]
    out = [
        ("steps", f"{last['step']} (policy version {last.get('policy_version', '?')})"),
        ("reward, first → last", f"{rewards[0]:.4f} → {rewards[-1]:.4f}" if rewards else "–"),
        ("best reward", f"{max(rewards):.4f}" if rewards else "–"),
        ("loss, last", _fmt(float(last["loss"])) if _finite(last.get("loss")) else "–"),
        ("images/s, mean", f"{sum(ips) / len(ips):.2f}" if ips else "–"),
        ("training wall-clock", f"{wall:.1f} s"),
        ("max staleness seen", str(max(int(r.get("staleness", 0)) for r in rows))),
    ]
    if _finite(last.get("eval/overall")):
        out.append(("held-out eval, last", f"{last['eval/overall']:.4f}"))
    return out


def _samples_html(run_dir: Path) -> str:
    blocks = []
    for step, folder in sample_steps(run_dir):
        uri = "data:image/png;base64," + base64.b64encode((folder / "grid.png").read_bytes()).decode()
        rows_html = ""
        meta = folder / "samples.json"
        if meta.is_file():
            try:
                items = json.loads(meta.read_text())
            except json.JSONDecodeError:
                items = []
            for i, it in enumerate(items):
                rs = [float(x) for x in it.get("rewards", [])]
                mean = f"{sum(rs) / len(rs):.3f}" if rs else "–"
                each = " ".join(f"{x:.2f}" for x in rs)
                rows_html += (
                    f"<tr><td>{i + 1}</td><td>{html.escape(str(it.get('prompt', '')))}</td>"
                    f"<td class='num'>{mean}</td><td class='each'>{each}</td></tr>"
                )
        table = (
            "<table class='prompts'><tr><th>row</th><th>prompt</th><th>mean</th><th>per image</th></tr>"
            f"{rows_html}</table>"
            if rows_html
            else ""
        )
        blocks.append(
            f"<div class='sample' id='samples-step-{step}'><h3>step {step}</h3>"
            f"<img class='grid' alt='samples of step {step}' src='{uri}'>{table}</div>"
        )
    if not blocks:
        return "<p class='muted'>no sample grids in samples/ yet</p>"
    return "\n".join(blocks)


CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#111827;background:#f3f4f6}
header{background:#111827;color:#f9fafb;padding:18px 28px}header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;color:#9ca3af}main{padding:18px 28px;max-width:1800px}
h2{font-size:17px;margin:26px 0 10px;border-bottom:1px solid #d1d5db;padding-bottom:4px}
.cards{display:flex;flex-wrap:wrap;gap:10px}.card{background:#fff;border-radius:8px;padding:10px 14px;
box-shadow:0 1px 2px #0001;min-width:150px}.card b{display:block;font-size:18px}.card span{color:#6b7280;font-size:12px}
.charts{display:grid;grid-template-columns:repeat(auto-fill,minmax(520px,1fr));gap:14px}
figure.chart{background:#fff;margin:0;border-radius:8px;padding:10px 12px;box-shadow:0 1px 2px #0001}
figure.chart figcaption{font-weight:600;margin-bottom:4px}figure.chart .note{color:#6b7280;font-size:12px}
svg{width:100%;height:auto;font-size:11px;fill:#374151}svg .grid{stroke:#e5e7eb}svg .axis{stroke:#9ca3af}
svg .label{fill:#6b7280}.legend{display:flex;flex-wrap:wrap;gap:4px 14px;font-size:12px;margin-top:2px}
.key i{display:inline-block;width:12px;height:4px;margin-right:5px;vertical-align:middle;border-radius:2px}
.samples{display:grid;grid-template-columns:repeat(auto-fill,minmax(420px,1fr));gap:14px}
.sample{background:#fff;border-radius:8px;padding:10px 12px;box-shadow:0 1px 2px #0001}.sample h3{margin:0 0 6px;font-size:14px}
img.grid{width:100%;image-rendering:pixelated;border-radius:4px}
table.prompts{border-collapse:collapse;width:100%;font-size:12px;margin-top:6px}
table.prompts td,table.prompts th{border-top:1px solid #e5e7eb;padding:2px 6px;text-align:left;vertical-align:top}
td.num{font-variant-numeric:tabular-nums}td.each{color:#6b7280;font-family:ui-monospace,monospace;font-size:11px}
pre.config{background:#fff;border-radius:8px;padding:12px;overflow:auto;font-size:12px;box-shadow:0 1px 2px #0001}
.muted{color:#6b7280}
"""


def render(run_dir: Path) -> str:
    """The report's HTML text for ``run_dir`` (see :func:`write_report`)."""
    rows = read_metrics(run_dir)
    charts = build_charts(rows)
    config_path = run_dir / "config.yaml"
    config = config_path.read_text() if config_path.is_file() else "(no config.yaml)"
    cards = "".join(
        f"<div class='card'><span>{html.escape(k)}</span><b>{html.escape(v)}</b></div>"
        for k, v in _summary(rows)
    )
    figures = "\n".join(
        f"<figure class='chart' id='{c.id}'><figcaption>{html.escape(c.title)}</figcaption>{c.svg}"
        + (f"<div class='note'>{html.escape(c.note)}</div>" if c.note else "")
        + "</figure>"
        for c in charts
    )
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    title = f"vgrpo run · {run_dir.resolve().name}"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<meta name="viewport" content="width=device-width,initial-scale=1"><style>{CSS}</style></head>
<body><header><h1>{html.escape(title)}</h1>
<p>{html.escape(str(run_dir.resolve()))} · written {now} · {len(rows)} logged steps</p></header>
<main>
<section id="summary"><h2>Summary</h2><div class="cards">{cards}</div></section>
<section id="curves"><h2>Curves</h2><div class="charts">
{figures or "<p class='muted'>no metrics yet</p>"}
</div></section>
<section id="samples"><h2>Samples across steps</h2>
<p class="muted">each grid: one row per prompt, one column per image of its group; rewards per image below</p>
<div class="samples">{_samples_html(run_dir)}</div></section>
<section id="config"><h2>Resolved configuration (config.yaml)</h2>
<pre class="config">{html.escape(config)}</pre></section>
</main></body></html>
"""


def write_report(run_dir: str | os.PathLike[str]) -> Path:
    """Write ``run_dir/report.html`` (atomically: a reader never sees half a file) and return its path."""
    root = Path(run_dir)
    text = render(root)
    out = root / "report.html"
    tmp = root / "report.html.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out)
    return out


def try_write_report(run_dir: str | os.PathLike[str]) -> Path | None:
    """:func:`write_report` for the end of a run: a failure is logged, never raised, so that it cannot
    mask the run's own outcome (an interrupt, a role's error)."""
    try:
        return write_report(run_dir)
    except Exception as e:
        log.warning("report.html not written: %s: %s", type(e).__name__, e)
        return None
