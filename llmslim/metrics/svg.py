"""Plots as inline SVG text, for the HTML report: scatter (with a Pareto front), dot plot with
error bars, heatmap. No plotting library: the output is a string a browser draws offline, and
every mark carries its exact value (``data-*`` attributes and a ``<title>`` tooltip)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from html import escape

# Tableau 10: distinct, colour-blind-tolerant, readable on white.
PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f",
           "#bab0ac")
# viridis, sampled: perceptually even, readable in grey.
VIRIDIS = ((0.0, (68, 1, 84)), (0.25, (59, 82, 139)), (0.5, (33, 145, 140)), (0.75, (94, 201, 98)),
           (1.0, (253, 231, 37)))
FONT = 'font-family="system-ui, sans-serif"'


def color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def fmt(x: float, digits: int = 4) -> str:
    """A short label: ``digits`` significant digits, no exponent for everyday magnitudes."""
    if x == 0:
        return "0"
    if 1e-4 <= abs(x) < 1e6:
        return f"{x:.{digits}g}"
    return f"{x:.2e}"


def attrs(d: dict) -> str:
    return "".join(f' {k}="{escape(str(v))}"' for k, v in d.items() if v is not None)


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round numbers (1, 2, 2.5, 5 x 10^k) covering [lo, hi], about ``n`` of them."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step + 1e-9) * step
    ticks, t = [], start
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 12))
        t += step
    if ticks[-1] < hi - 1e-12:
        ticks.append(round(t, 12))
    return ticks


def log_ticks(lo: float, hi: float) -> list[float]:
    """Powers of ten covering [lo, hi] (lo > 0)."""
    a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    if a == b:
        b += 1
    return [10.0 ** k for k in range(a, b + 1)]


@dataclass
class Point:
    x: float
    y: float
    label: str
    series: int  # colour index (the result's position in the report)
    front: bool = False  # on the Pareto front: filled; else hollow
    data: dict = field(default_factory=dict)  # extra data-* attributes


@dataclass
class Frame:
    """A plot area inside a ``width x height`` SVG, with linear scales."""

    width: int
    height: int
    left: int = 62
    right: int = 18
    top: int = 34
    bottom: int = 46
    x0: float = 0.0
    x1: float = 1.0
    y0: float = 0.0
    y1: float = 1.0

    def px(self, x: float) -> float:
        return self.left + (x - self.x0) / (self.x1 - self.x0) * (self.width - self.left - self.right)

    def py(self, y: float) -> float:
        return self.height - self.bottom - (y - self.y0) / (self.y1 - self.y0) * (self.height - self.top - self.bottom)


def _open(width: int, height: int, title: str, kind: str, title_x: float | None = None) -> list[str]:
    """The ``<svg>`` element and its title, centred (or starting at ``title_x``)."""
    where = (f'x="{width / 2:.1f}" text-anchor="middle"' if title_x is None
             else f'x="{title_x:.1f}" text-anchor="start"')
    return [f'<svg xmlns="http://www.w3.org/2000/svg" class="plot {kind}" viewBox="0 0 {width} {height}" '
            f'width="{width}" height="{height}" role="img" aria-label="{escape(title)}" {FONT} font-size="12">',
            f"<title>{escape(title)}</title>",
            f'<text {where} y="18" font-size="13" font-weight="600">{escape(title)}</text>']


def _axes(f: Frame, xticks: list[float], yticks: list[float], x_label: str, y_label: str,
          ylabels: list[str] | None = None) -> list[str]:
    out = [f'<rect class="frame" x="{f.left}" y="{f.top}" width="{f.width - f.left - f.right}" '
           f'height="{f.height - f.top - f.bottom}" fill="none" stroke="#999"/>']
    for t in xticks:
        x = f.px(t)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{f.top}" y2="{f.height - f.bottom}" stroke="#e5e5e5"/>')
        out.append(f'<text x="{x:.1f}" y="{f.height - f.bottom + 15}" text-anchor="middle">{fmt(t)}</text>')
    for i, t in enumerate(yticks):
        y = f.py(t)
        out.append(f'<line x1="{f.left}" x2="{f.width - f.right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e5e5e5"/>')
        label = ylabels[i] if ylabels else fmt(t)
        out.append(f'<text x="{f.left - 5}" y="{y + 4:.1f}" text-anchor="end">{escape(label)}</text>')
    out.append(f'<text x="{(f.left + f.width - f.right) / 2:.1f}" y="{f.height - 8}" text-anchor="middle">'
               f"{escape(x_label)}</text>")
    if y_label:
        cy = (f.top + f.height - f.bottom) / 2
        out.append(f'<text x="14" y="{cy:.1f}" text-anchor="middle" transform="rotate(-90 14 {cy:.1f})">'
                   f"{escape(y_label)}</text>")
    return out


def _padded(values: list[float], from_zero: bool = False) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    if from_zero:
        lo = min(0.0, lo)
    span = hi - lo or abs(hi) * 0.1 or 1.0
    return (lo if from_zero else lo - 0.08 * span), hi + 0.08 * span


def scatter(points: list[Point], title: str, x_label: str, y_label: str, x_from_zero: bool = False,
            y_bounds: tuple[float | None, float | None] = (None, None), width: int = 360, height: int = 300) -> str:
    """Points labelled by name; the Pareto-front points filled and joined by a dashed line.
    ``y_bounds``: the values the measure can take (e.g. 0 and 1 for a share), the axis stays inside."""
    f = Frame(width, height)
    f.x0, f.x1 = _padded([p.x for p in points], x_from_zero)
    f.y0, f.y1 = _padded([p.y for p in points])
    lo, hi = y_bounds
    f.y0, f.y1 = (f.y0 if lo is None else max(f.y0, lo)), (f.y1 if hi is None else min(f.y1, hi))
    if f.y1 <= f.y0:
        f.y0, f.y1 = f.y0 - 0.5, f.y0 + 0.5
    xt = nice_ticks(f.x0, f.x1)
    yt = [t for t in nice_ticks(f.y0, f.y1) if (lo is None or t >= lo - 1e-12) and (hi is None or t <= hi + 1e-12)]
    f.x0, f.x1 = min(f.x0, xt[0]), max(f.x1, xt[-1])
    if yt:
        f.y0, f.y1 = min(f.y0, yt[0]), max(f.y1, yt[-1])
    f.left = max(f.left, 30 + 7 * max((len(fmt(t)) for t in yt), default=0))  # room for the tick labels
    out = _open(width, height, title, "scatter") + _axes(f, xt, yt, x_label, y_label)
    front = sorted((p for p in points if p.front), key=lambda p: p.x)
    if len(front) > 1:
        path = " ".join(f"{f.px(p.x):.1f},{f.py(p.y):.1f}" for p in front)
        out.append(f'<polyline class="front" points="{path}" fill="none" stroke="#333" stroke-width="1.2" '
                   'stroke-dasharray="5 4"/>')
    placed: list[tuple[float, float, float]] = []  # labels so far: (x0, x1, y)
    for p in points:
        x, y = f.px(p.x), f.py(p.y)
        c = color(p.series)
        fill = c if p.front else "white"
        data = {"data-x": repr(p.x), "data-y": repr(p.y), "data-front": str(p.front).lower(), **p.data}
        tip = f"{p.label}: {x_label} {fmt(p.x)}, {y_label} {fmt(p.y)}{' (Pareto front)' if p.front else ''}"
        out.append(f'<circle class="point" cx="{x:.1f}" cy="{y:.1f}" r="5.5" fill="{fill}" stroke="{c}" '
                   f'stroke-width="2.2"{attrs(data)}><title>{escape(tip)}</title></circle>')
        right = x < width - f.right - 90
        w = 6.2 * len(p.label)
        x0 = x + 8 if right else x - 8 - w
        for dy in (-7, 15, -20, 28, -33, 41):  # the first spot no earlier label overlaps
            ly = y + dy
            if not any(a < x0 + w and x0 < b and abs(ly - c_) < 12 for a, b, c_ in placed):
                break
        placed.append((x0, x0 + w, ly))
        out.append(f'<text class="label" x="{x + (8 if right else -8):.1f}" y="{ly:.1f}" '
                   f'text-anchor="{"start" if right else "end"}" font-size="11">{escape(p.label)}</text>')
    out.append("</svg>")
    return "\n".join(out)


@dataclass
class Bar:
    label: str
    value: float
    err: float | None  # half-width of the error bar
    series: int
    data: dict = field(default_factory=dict)


def dot_errorbars(rows: list[Bar], title: str, x_label: str, lo: float = 0.0, hi: float = 1.0,
                  reference: float | None = None, reference_label: str = "", width: int = 360) -> str:
    """One row per model: a dot at the value, a bar of +-err, an optional dashed reference line."""
    row_h = 26
    label_w = min(max((len(r.label) for r in rows), default=4) * 7 + 16, 200)
    f = Frame(width, 44 + 46 + row_h * len(rows), left=label_w, right=18, top=44, x0=lo, x1=hi)
    xt = nice_ticks(lo, hi)
    f.x0, f.x1 = xt[0], xt[-1]
    out = _open(width, f.height, title, "errorbars") + _axes(f, xt, [], x_label, "")
    if reference is not None and f.x0 <= reference <= f.x1:
        x = f.px(reference)
        out.append(f'<line class="reference" x1="{x:.1f}" x2="{x:.1f}" y1="{f.top}" y2="{f.height - f.bottom}" '
                   f'stroke="#777" stroke-dasharray="4 3"><title>{escape(reference_label)}</title></line>')
        out.append(f'<text x="{x:.1f}" y="{f.top - 3}" text-anchor="middle" font-size="10" fill="#555">'
                   f"{escape(reference_label)}</text>")
    for i, r in enumerate(rows):
        y = f.top + row_h * (i + 0.5)
        c = color(r.series)
        out.append(f'<text x="{label_w - 8}" y="{y + 4:.1f}" text-anchor="end">{escape(r.label)}</text>')
        tip = f"{r.label}: {fmt(r.value)}" + (f" ± {fmt(r.err)}" if r.err is not None else "")
        if r.err is not None:
            a, b = f.px(max(r.value - r.err, f.x0)), f.px(min(r.value + r.err, f.x1))
            out.append(f'<line class="errorbar" x1="{a:.1f}" x2="{b:.1f}" y1="{y:.1f}" y2="{y:.1f}" stroke="{c}" '
                       f'stroke-width="2"/>')
            for e in (a, b):
                out.append(f'<line class="cap" x1="{e:.1f}" x2="{e:.1f}" y1="{y - 5:.1f}" y2="{y + 5:.1f}" '
                           f'stroke="{c}" stroke-width="2"/>')
        data = {"data-value": repr(r.value), "data-err": repr(r.err) if r.err is not None else None, **r.data}
        out.append(f'<circle class="point" cx="{f.px(r.value):.1f}" cy="{y:.1f}" r="5" fill="{c}"{attrs(data)}>'
                   f"<title>{escape(tip)}</title></circle>")
    out.append("</svg>")
    return "\n".join(out)


def ramp(t: float) -> str:
    """viridis at ``t`` in [0, 1]."""
    t = min(max(t, 0.0), 1.0)
    for (a, ca), (b, cb) in zip(VIRIDIS, VIRIDIS[1:], strict=False):
        if t <= b:
            u = (t - a) / (b - a)
            r, g, bl = (round(x + (y - x) * u) for x, y in zip(ca, cb, strict=True))
            return f"#{r:02x}{g:02x}{bl:02x}"
    return "#fde725"


def heatmap(rows: list[str], cols: list[str], cells: dict[tuple[str, str], float], title: str,
            value_label: str, log: bool = False, lo: float | None = None, hi: float | None = None,
            tips: dict[tuple[str, str], str] | None = None, width: int = 960) -> str:
    """A ``rows x cols`` grid coloured by value (missing cells blank), with a colour bar."""
    values = [v for v in cells.values() if v is not None and math.isfinite(v) and (v > 0 or not log)]
    if lo is None:
        lo = min(values) if values else 0.0
    if hi is None:
        hi = max(values) if values else 1.0
    if hi <= lo:
        hi = lo * 10 if log and lo > 0 else lo + 1.0

    def scale(v: float) -> float:
        if log:
            return (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)) if v > 0 else 0.0
        return (v - lo) / (hi - lo)

    label_w = min(max((len(r) for r in rows), default=4) * 7 + 14, 190)
    cell_w = max(min((width - label_w - 20) / max(len(cols), 1), 56), 6)
    cell_h = 20
    grid_w = cell_w * len(cols)
    bw = min(260, max(grid_w, 160))
    legend = f"{value_label}{' (log scale)' if log else ''}"
    width = int(max(label_w + grid_w + 20, label_w + bw + 16 + 6.5 * len(legend), 16 + 7.5 * len(title)))
    height = 34 + cell_h * len(rows) + 28 + 46
    out = _open(width, height, title, "heatmap", title_x=8)
    top = 34
    for i, r in enumerate(rows):
        out.append(f'<text x="{label_w - 6}" y="{top + cell_h * i + 14}" text-anchor="end" font-size="11">'
                   f"{escape(r)}</text>")
    every = max(1, math.ceil(len(cols) / (grid_w / 28)))
    for j, c in enumerate(cols):
        if j % every == 0:
            out.append(f'<text x="{label_w + cell_w * (j + 0.5):.1f}" y="{top + cell_h * len(rows) + 13}" '
                       f'text-anchor="middle" font-size="10">{escape(c)}</text>')
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            v = cells.get((r, c))
            if v is None:
                continue
            fill = ramp(scale(v)) if math.isfinite(v) else "#ccc"
            tip = (tips or {}).get((r, c)) or f"{r} [{c}]: {fmt(v)}"
            out.append(f'<rect class="cell" x="{label_w + cell_w * j:.1f}" y="{top + cell_h * i}" '
                       f'width="{cell_w:.1f}" height="{cell_h}" fill="{fill}" stroke="white" stroke-width="0.5" '
                       f'data-row="{escape(r)}" data-col="{escape(c)}" data-value="{v!r}">'
                       f"<title>{escape(tip)}</title></rect>")
    # colour bar
    by = top + cell_h * len(rows) + 22
    steps = 32
    for k in range(steps):
        out.append(f'<rect class="colorbar" x="{label_w + bw * k / steps:.1f}" y="{by}" width="{bw / steps + 0.5:.1f}" '
                   f'height="10" fill="{ramp(k / (steps - 1))}"/>')
    out.append(f'<text x="{label_w}" y="{by + 24}" font-size="10">{fmt(lo)}</text>')
    out.append(f'<text x="{label_w + bw}" y="{by + 24}" font-size="10" text-anchor="end">{fmt(hi)}</text>')
    out.append(f'<text x="{label_w + bw + 10}" y="{by + 9}" font-size="11">{escape(legend)}</text>')
    out.append("</svg>")
    return "\n".join(out)
