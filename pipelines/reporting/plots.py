"""Inline SVG plots (no plotting library, no scripts): histograms and line charts."""
from __future__ import annotations

import math

import numpy as np

from saliency_audit.pipelines.reporting.html import Raw, esc, number

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
           "#7f7f7f", "#bcbd22", "#393b79", "#637939", "#8c6d31")
_FONT = 'font-family="system-ui,sans-serif" font-size="11"'


def _finite(values) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


class Bins:
    """A histogram's counts over fixed edges, filled a batch at a time, with the count and sum of
    the finite values that went in (the panel's n and mean): the values themselves are not kept."""

    def __init__(self, value_range: tuple[float, float], bins: int = 20):
        low, high = value_range
        if high <= low:
            low, high = low - 0.5, high + 0.5
        self.low, self.high = low, high
        self.edges = np.linspace(low, high, bins + 1)
        self.counts = np.zeros(bins, dtype=np.int64)
        self.n, self.total = 0, 0.0

    def add(self, values) -> None:
        values = np.asarray(values, dtype=np.float64)
        values = values[np.isfinite(values)]
        self.counts += np.histogram(np.clip(values, self.low, self.high), self.edges)[0]
        self.n += len(values)
        self.total += float(np.sum(values))

    @property
    def mean(self) -> float | None:
        return self.total / self.n if self.n else None


def histogram(values: Bins, reference: Bins | None = None, *, title: str, width: int = 220,
              height: int = 120) -> Raw:
    """One panel: the values' histogram, and ``reference`` (e.g. the random order, binned alike) as
    a grey outline."""
    counts, low, high, bins = values.counts, values.low, values.high, len(values.counts)
    reference = reference if reference is not None and reference.n else None
    ref_counts = reference.counts if reference is not None else np.zeros(bins)
    left, right, top, bottom = 8, width - 8, 30, height - 18
    peak = max(counts.max(initial=0), ref_counts.max(initial=0), 1)
    bar = (right - left) / bins

    def y(count):
        return bottom - (bottom - top) * count / peak

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">',
             f'<title>{esc(title)}</title>',
             f'<text x="{left}" y="12" {_FONT} font-weight="600">{esc(title)}</text>',
             f'<text x="{left}" y="25" {_FONT} fill="#555">n {values.n}, mean {esc(number(values.mean))}</text>']
    for i, count in enumerate(counts):
        if count:
            parts.append(f'<rect x="{left + i * bar:.1f}" y="{y(count):.1f}" width="{max(bar - 1, 1):.1f}" '
                         f'height="{bottom - y(count):.1f}" fill="{PALETTE[0]}" fill-opacity="0.8"/>')
    if reference is not None:
        steps = " ".join(f"{left + i * bar:.1f},{y(c):.1f} {left + (i + 1) * bar:.1f},{y(c):.1f}"
                         for i, c in enumerate(ref_counts))
        parts.append(f'<polyline points="{steps}" fill="none" stroke="#777" stroke-width="1.2"/>')
    parts += [f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#333"/>',
              f'<text x="{left}" y="{height - 4}" {_FONT}>{esc(number(low))}</text>',
              f'<text x="{right}" y="{height - 4}" {_FONT} text-anchor="end">{esc(number(high))}</text>', "</svg>"]
    return Raw("".join(parts))


def line_chart(x_labels: list[str], series: dict[str, list[float | None]], *, title: str, y_label: str,
               y_range: tuple[float, float] | None = None, width: int = 420, height: int = 240) -> Raw:
    """Lines over categorical x positions, one colour per series, with a legend."""
    every = _finite(v for values in series.values() for v in values)
    low, high = y_range or ((min(every), max(every)) if every else (0.0, 1.0))
    if high <= low:
        low, high = low - 0.5, high + 0.5
    left, right, top, bottom = 44, width - 120, 24, height - 36
    n = max(len(x_labels), 2)

    def px(i):
        return left + (right - left) * i / (n - 1)

    def py(v):
        return bottom - (bottom - top) * (v - low) / (high - low)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">',
             f'<title>{esc(title)}</title>',
             f'<text x="{left}" y="14" {_FONT} font-weight="600">{esc(title)}</text>',
             f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#333"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{bottom}" stroke="#333"/>',
             f'<text x="{left - 4}" y="{py(high) + 4:.1f}" {_FONT} text-anchor="end">{esc(number(high))}</text>',
             f'<text x="{left - 4}" y="{py(low) + 4:.1f}" {_FONT} text-anchor="end">{esc(number(low))}</text>',
             f'<text x="10" y="{(top + bottom) / 2:.1f}" {_FONT} transform="rotate(-90 10 {(top + bottom) / 2:.1f})" '
             f'text-anchor="middle">{esc(y_label)}</text>']
    if low < 0 < high:
        parts.append(f'<line x1="{left}" y1="{py(0):.1f}" x2="{right}" y2="{py(0):.1f}" stroke="#bbb" '
                     f'stroke-dasharray="3 3"/>')
    label_every = max(1, math.ceil(len(x_labels) / 8))
    for i, label in enumerate(x_labels):
        if i % label_every == 0 or i == len(x_labels) - 1:
            parts.append(f'<text x="{px(i):.1f}" y="{bottom + 14}" {_FONT} text-anchor="middle">{esc(label)}</text>')
    for k, (name, values) in enumerate(series.items()):
        colour = PALETTE[k % len(PALETTE)]
        points = " ".join(f"{px(i):.1f},{py(v):.1f}" for i, v in enumerate(values)
                          if v is not None and math.isfinite(v))
        parts.append(f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="2"/>')
        parts.append(f'<text x="{right + 10}" y="{top + 14 * k + 8}" {_FONT} fill="{colour}">{esc(name)}</text>')
    parts.append("</svg>")
    return Raw("".join(parts))
