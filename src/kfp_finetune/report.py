"""A loss curve as self-contained HTML (inline SVG), which the KFP UI renders."""

from __future__ import annotations

import html


def loss_curve_html(losses: list[tuple[int, float]], title: str = "Training loss") -> str:
    """Render ``(step, loss)`` pairs as an HTML page with an SVG line chart.

    Args:
        losses: Steps and losses, in step order.
        title: Heading of the page.

    Returns:
        The HTML text (no scripts, no external resources).
    """
    width, height, pad = 640, 320, 48
    if not losses:
        body = "<p>No training step was logged.</p>"
    else:
        steps = [s for s, _ in losses]
        values = [v for _, v in losses]
        x0, x1 = min(steps), max(steps)
        y0, y1 = min(values), max(values)
        xspan, yspan = (x1 - x0) or 1, (y1 - y0) or 1

        def point(step: int, value: float) -> str:
            x = pad + (step - x0) / xspan * (width - 2 * pad)
            y = height - pad - (value - y0) / yspan * (height - 2 * pad)
            return f"{x:.1f},{y:.1f}"

        line = " ".join(point(s, v) for s, v in losses)
        body = (
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(title)}">'
            f'<rect width="{width}" height="{height}" fill="white"/>'
            f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" '
            'stroke="#888"/>'
            f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#888"/>'
            f'<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="{line}"/>'
            f'<text x="{pad}" y="{pad - 10}" font-size="12">{y1:.4f}</text>'
            f'<text x="{pad}" y="{height - pad + 16}" font-size="12">{y0:.4f} @ step {x0}</text>'
            f'<text x="{width - pad}" y="{height - pad + 16}" font-size="12" '
            f'text-anchor="end">step {x1}</text></svg>'
            f"<p>{len(losses)} steps; first loss {values[0]:.4f}, final {values[-1]:.4f}, "
            f"best {min(values):.4f}.</p>"
        )
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title></head>"
        f"<body style='font-family:sans-serif'><h3>{html.escape(title)}</h3>{body}</body></html>"
    )
