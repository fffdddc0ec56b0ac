"""The loss curve next to the adapter: `loss.csv` (every step) and `loss.svg`, a plain line plot.

SVG is text, so the plot needs no plotting library (jalora does not depend on one) and any browser
shows it.
"""

from __future__ import annotations

import os
from xml.sax.saxutils import escape

W, H, PAD = 640, 360, 48


def write_csv(path: str, train: list[tuple[int, float]], evals: list[tuple[int, float]]) -> None:
    rows = sorted([(s, "train", v) for s, v in train] + [(s, "eval", v) for s, v in evals])
    with open(path, "w") as f:
        f.write("step,split,loss\n")
        f.writelines(f"{s},{split},{v:.6g}\n" for s, split, v in rows)


def write_svg(path: str, train: list[tuple[int, float]], evals: list[tuple[int, float]], title: str) -> None:
    points = train + evals
    if not points:
        return
    x_max = max(max(s for s, _ in points), 1)
    y_lo, y_hi = min(v for _, v in points), max(v for _, v in points)
    if y_hi - y_lo < 1e-9:
        y_lo, y_hi = y_lo - 0.5, y_hi + 0.5

    def xy(step, value):
        return (PAD + (W - 2 * PAD) * step / x_max, H - PAD - (H - 2 * PAD) * (value - y_lo) / (y_hi - y_lo))

    def line(series, color):
        pts = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(s, v) for s, v in series))
        return f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{pts}"/>'

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
        f'<rect width="{W}" height="{H}" fill="white"/>',
        f'<text x="{W / 2}" y="20" text-anchor="middle">{escape(title)}</text>',
        f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - PAD}" y2="{H - PAD}" stroke="black"/>',
        f'<line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{H - PAD}" stroke="black"/>',
        f'<text x="{W / 2}" y="{H - 12}" text-anchor="middle">optimizer step (0 .. {x_max})</text>',
        f'<text x="{PAD - 4}" y="{PAD}" text-anchor="end">{y_hi:.3g}</text>',
        f'<text x="{PAD - 4}" y="{H - PAD}" text-anchor="end">{y_lo:.3g}</text>',
        line(train, "steelblue"),
        f'<text x="{W - PAD}" y="{PAD - 8}" text-anchor="end" fill="steelblue">train loss</text>',
    ]
    if evals:
        parts.append(line(evals, "darkorange"))
        parts += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="darkorange"/>' for x, y in
                  (xy(s, v) for s, v in evals)]  # fmt: skip
        parts.append(f'<text x="{W - PAD}" y="{PAD + 8}" text-anchor="end" fill="darkorange">eval loss</text>')
    parts.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(parts) + "\n")


def write_curve(out_dir: str, train, evals, title: str) -> None:
    write_csv(os.path.join(out_dir, "loss.csv"), train, evals)
    write_svg(os.path.join(out_dir, "loss.svg"), train, evals, title)
