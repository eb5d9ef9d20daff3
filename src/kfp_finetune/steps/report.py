"""A loss curve as self-contained HTML (inline SVG), which the KFP UI renders.

The y axis starts at 0 (or below the lowest loss, if one is negative), so a run whose loss
moves from 6.14 to 6.09 looks like the small change it is, not like a cliff; the values
themselves are printed under the chart and on each point's tooltip. With a held-out
evaluation, the base and the fine-tuned model's held-out loss are drawn as labelled dashed
horizontal lines across the chart.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable

LOSS_CURVE_FILE = "loss_curve.html"
Scale = Callable[[float], float]
_W, _H, _LEFT, _RIGHT, _TOP, _BOTTOM = 640, 340, 64, 24, 20, 52
_REFERENCE_COLOURS = ("#d62728", "#2ca02c", "#9467bd", "#8c564b")


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values (1, 2 or 5 times a power of ten) covering low..high.

    Args:
        low: Smallest value to cover.
        high: Largest value to cover.
        count: Wanted number of intervals.

    Returns:
        Ascending ticks; the first is <= low and the last >= high.
    """
    if not high > low:
        high = low + 1
    raw = (high - low) / max(count, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(low / step) * step
    ticks = [first]
    while ticks[-1] < high - 1e-12 * step:
        ticks.append(first + len(ticks) * step)
    return [round(t, 12) for t in ticks]


def _label(value: float) -> str:
    return f"{value:g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.1e}"


def _axes(xticks: list[float], yticks: list[float], sx: Scale, sy: Scale) -> list[str]:
    """Axis lines, ticks, tick labels, grid lines and axis titles."""
    x_left, x_right, y_bottom = _LEFT, _W - _RIGHT, _H - _BOTTOM
    parts = [
        f'<line x1="{x_left}" y1="{y_bottom}" x2="{x_right}" y2="{y_bottom}" stroke="#444"/>',
        f'<line x1="{x_left}" y1="{_TOP}" x2="{x_left}" y2="{y_bottom}" stroke="#444"/>',
    ]
    for t in xticks:
        x = sx(t)
        parts.append(f'<line x1="{x:.1f}" y1="{y_bottom}" x2="{x:.1f}" y2="{y_bottom + 5}" '
                     'stroke="#444"/>')
        parts.append(f'<text x="{x:.1f}" y="{y_bottom + 18}" font-size="11" '
                     f'text-anchor="middle">{_label(t)}</text>')
    for t in yticks:
        y = sy(t)
        parts.append(f'<line x1="{x_left}" y1="{y:.1f}" x2="{x_right}" y2="{y:.1f}" '
                     'stroke="#eee"/>')
        parts.append(f'<line x1="{x_left - 5}" y1="{y:.1f}" x2="{x_left}" y2="{y:.1f}" '
                     'stroke="#444"/>')
        parts.append(f'<text x="{x_left - 8}" y="{y + 4:.1f}" font-size="11" '
                     f'text-anchor="end">{_label(t)}</text>')
    parts.append(f'<text x="{(x_left + x_right) / 2:.1f}" y="{_H - 12}" font-size="12" '
                 'text-anchor="middle">step</text>')
    parts.append(f'<text x="16" y="{(_TOP + y_bottom) / 2:.1f}" font-size="12" '
                 f'text-anchor="middle" transform="rotate(-90 16 {(_TOP + y_bottom) / 2:.1f})">'
                 'loss</text>')
    return parts


def _references(lines: dict[str, float], sy: Scale) -> str:
    """Labelled dashed horizontal lines (e.g. the held-out losses)."""
    parts = []
    for (label, value), colour in zip(lines.items(), _REFERENCE_COLOURS * 4, strict=False):
        y, text = sy(value), html.escape(f"{label}: {value:.4f}")
        parts.append(f'<line x1="{_LEFT}" y1="{y:.1f}" x2="{_W - _RIGHT}" y2="{y:.1f}" '
                     f'stroke="{colour}" stroke-width="1.5" stroke-dasharray="6 4">'
                     f"<title>{text}</title></line>")
        parts.append(f'<text x="{_W - _RIGHT - 4}" y="{y - 4:.1f}" font-size="11" '
                     f'text-anchor="end" fill="{colour}">{text}</text>')
    return "".join(parts)


def _chart(losses: list[tuple[int, float]], title: str,
           references: dict[str, float] | None = None) -> str:
    references = {k: v for k, v in (references or {}).items() if math.isfinite(v)}
    steps = [s for s, _ in losses]
    values = [v for _, v in losses if math.isfinite(v)] + list(references.values()) or [0.0]
    xticks = nice_ticks(min(steps), max(steps)) if max(steps) > min(steps) else [steps[0]]
    yticks = nice_ticks(min(0.0, min(values)), max(values))
    x0, x1 = xticks[0], xticks[-1] if xticks[-1] > xticks[0] else xticks[0] + 1
    y0, y1 = yticks[0], yticks[-1]

    def sx(step: float) -> float:
        return _LEFT + (step - x0) / (x1 - x0) * (_W - _LEFT - _RIGHT)

    def sy(value: float) -> float:
        return _H - _BOTTOM - (value - y0) / (y1 - y0) * (_H - _TOP - _BOTTOM)

    shown = [(s, v) for s, v in losses if math.isfinite(v)]
    line = " ".join(f"{sx(s):.1f},{sy(v):.1f}" for s, v in shown)
    dots = "".join(f'<circle cx="{sx(s):.1f}" cy="{sy(v):.1f}" r="2.5" fill="#1f77b4">'
                   f"<title>step {s}: loss {v:.4f}</title></circle>" for s, v in shown)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" '
        f'viewBox="0 0 {_W} {_H}" role="img" aria-label="{html.escape(title)}">'
        f'<rect width="{_W}" height="{_H}" fill="white"/>'
        + "".join(_axes(xticks, yticks, sx, sy))
        + f'<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="{line}"/>{dots}'
        + _references(references, sy)
        + "</svg>"
    )


def loss_curve_html(losses: list[tuple[int, float]], title: str = "Training loss",
                    references: dict[str, float] | None = None) -> str:
    """Render ``(step, loss)`` pairs as an HTML page with an SVG line chart.

    Args:
        losses: Steps and losses, in step order.
        title: Heading of the page.
        references: Labelled losses drawn as horizontal lines and printed under the chart,
            e.g. ``{"base eval loss": 5.1, "fine-tuned eval loss": 3.2}`` (None: none).

    Returns:
        The HTML text (no scripts, no external resources): axes with ticks and titles
        (step, loss), the y axis from 0, and the first, final and best loss in figures.
    """
    if not losses:
        body = "<p>No training step was logged.</p>"
    else:
        values = [v for _, v in losses]
        finite = [v for v in values if math.isfinite(v)]
        best = f"{min(finite):.4f}" if finite else "n/a"
        change = values[-1] - values[0]
        body = (
            _chart(losses, title, references)
            + f"<p>{len(losses)} steps; first loss {values[0]:.4f}, final {values[-1]:.4f} "
            f"(change {change:+.4f}), best {best}.</p>"
        )
    if references:
        body += "<p>" + "; ".join(html.escape(f"{k}: {v:.4f}")
                                  for k, v in references.items()) + ".</p>"
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title></head>"
        f"<body style='font-family:sans-serif'><h3>{html.escape(title)}</h3>{body}</body></html>"
    )


def eval_references(metrics: dict[str, float | int | None]) -> dict[str, float] | None:
    """The held-out losses of the fine-tune step's Metrics as chart lines, or None."""
    if metrics.get("eval_loss") is None or metrics.get("eval_loss_base") is None:
        return None
    return {"base eval loss": float(metrics["eval_loss_base"] or 0.0),
            "fine-tuned eval loss": float(metrics["eval_loss"] or 0.0)}
