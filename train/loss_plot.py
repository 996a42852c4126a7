"""``plot_loss(run_dir)``: the loss curve of a run as ``<run_dir>/loss.png``.

matplotlib is not a dependency, so the chart is drawn with PIL (always installed): the per-step loss in
light blue, its centred moving average in dark blue, labelled axes with round tick values. Lines that
carry a ``stage`` (the demo's all-stages file) get a dashed grey line and the stage's name where each
stage starts. Held-out evaluations (``eval`` events) are points, one colour per held-out set, at their
``loss_sqrt`` (the training objective, the same quantity as the training loss). When matplotlib is installed
it is used instead.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterator

from PIL import Image, ImageDraw, ImageFont

PLOT_FILE = "loss.png"


STAGE_COLOUR = (128, 128, 128)
EVAL_COLOURS = ((230, 85, 13), (49, 163, 84), (117, 107, 177), (214, 39, 40), (140, 86, 75))  # one per held-out set


def _records(run_dir: Path) -> Iterator[dict]:
    """The lines of ``metrics.jsonl`` that parse (a line cut by a crash is passed over)."""
    path = run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            yield json.loads(line)
        except json.JSONDecodeError:
            continue


def eval_points(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Held-out set -> (step, loss_sqrt) of its evaluations with a finite loss, in file order."""
    found: dict[str, list[tuple[int, float]]] = {}
    for record in _records(run_dir):
        loss = record.get("loss_sqrt")
        if record.get("event") == "eval" and loss is not None and math.isfinite(loss):
            found.setdefault(str(record["dataset"]), []).append((int(record["step"]), float(loss)))
    return found


def _load_points(run_dir: Path) -> tuple[list[tuple[int, float]], list[tuple[int, str]]]:
    """(step, loss) of the finite losses, and (first step, name) of each stage the lines name."""
    points, starts = [], []
    for record in _records(run_dir):
        if "event" in record:
            continue
        stage = record.get("stage")
        if stage is not None and (not starts or starts[-1][1] != stage):
            starts.append((int(record["step"]), str(stage)))
        loss = record.get("loss")
        if loss is not None and math.isfinite(loss):
            points.append((int(record["step"]), float(loss)))
    return points, starts


def _smooth(values: list[float]) -> list[float]:
    """Centred moving average over ~2% of the points (no lag, unlike an EMA)."""
    half = max(1, len(values) // 50)
    out = []
    for i in range(len(values)):
        window = values[max(0, i - half): i + half + 1]
        out.append(sum(window) / len(window))
    return out


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2, 5 × 10^k steps) covering [lo, hi]."""
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / count
    base = 10 ** math.floor(math.log10(raw))
    step = next(m * base for m in (1, 2, 5, 10) if m * base >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def plot_loss(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Draw the loss of ``<run_dir>/metrics.jsonl``; returns the PNG path (a chart even with no points)."""
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / PLOT_FILE
    points, starts = _load_points(run_dir)
    evals = eval_points(run_dir)
    try:
        import matplotlib  # noqa: F401  # lazy: matplotlib is optional (PIL draws without it)
    except ImportError:
        _draw_with_pil(points, starts, out, title=f"loss - {run_dir.name}", evals=evals)
    else:
        _draw_with_matplotlib(points, starts, out, title=f"loss - {run_dir.name}", evals=evals)
    return out


def _draw_with_matplotlib(points: list[tuple[int, float]], starts: list[tuple[int, str]], out: Path,
                          title: str, evals: dict[str, list[tuple[int, float]]] | None = None) -> None:
    import matplotlib  # lazy: matplotlib is optional and heavy, only for plots

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: optional, and only after matplotlib.use("Agg")

    fig, ax = plt.subplots(figsize=(9, 5), dpi=100)
    if points:
        steps, losses = zip(*points)
        ax.plot(steps, losses, color="#9ecae1", lw=1, label="loss")
        ax.plot(steps, _smooth(list(losses)), color="#08519c", lw=2, label="moving average")
        for step, name in starts:
            ax.axvline(step, color="#808080", ls="--", lw=1)
            ax.annotate(name, (step, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -12),
                        textcoords="offset points", color="#808080")
    for (name, found), colour in zip((evals or {}).items(), _cycle(EVAL_COLOURS)):
        ax.scatter(*zip(*found), color="#%02x%02x%02x" % colour, s=25, zorder=3, label=f"eval {name}")
    if points or evals:
        ax.legend()
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.grid(alpha=0.3)
    fig.savefig(out)
    plt.close(fig)


def _cycle(colours):
    while True:
        yield from colours


def _draw_with_pil(points: list[tuple[int, float]], starts: list[tuple[int, str]], out: Path, title: str,
                   evals: dict[str, list[tuple[int, float]]] | None = None) -> None:
    width, height = 900, 500
    left, right, top, bottom = 80, 30, 50, 60
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    draw.text((width // 2 - 6 * len(title) // 2, 15), title, fill="black", font=font)
    x0, x1, y0, y1 = left, width - right, height - bottom, top  # y grows downwards
    evals = evals or {}
    every_eval = [p for found in evals.values() for p in found]
    if points or every_eval:
        steps = [s for s, _ in points + every_eval]
        losses = [v for _, v in points + every_eval]
        s_lo, s_hi = min(steps), max(max(steps), min(steps) + 1)
        l_lo, l_hi = min(losses), max(losses)
        pad = 0.05 * (l_hi - l_lo or 1.0)
        l_lo, l_hi = l_lo - pad, l_hi + pad

        def xy(step: float, loss: float) -> tuple[float, float]:
            return (x0 + (step - s_lo) / (s_hi - s_lo) * (x1 - x0),
                    y0 - (loss - l_lo) / (l_hi - l_lo) * (y0 - y1))

        for tick in _nice_ticks(l_lo, l_hi):
            _, y = xy(s_lo, tick)
            draw.line([(x0, y), (x1, y)], fill="#eeeeee")
            draw.text((8, y - 6), f"{tick:.4g}", fill="black", font=font)
        for tick in _nice_ticks(s_lo, s_hi, count=8):
            if tick == int(tick):
                x, _ = xy(tick, l_lo)
                draw.line([(x, y0), (x, y0 + 5)], fill="black")
                draw.text((x - 3 * len(str(int(tick))), y0 + 8), str(int(tick)), fill="black", font=font)
        for step, name in starts:
            x, _ = xy(step, l_lo)
            for y in range(y1, y0, 8):  # dashed
                draw.line([(x, y), (x, min(y + 4, y0))], fill=STAGE_COLOUR)
            draw.text((x + 3, y1 + 2), name, fill=STAGE_COLOUR, font=font)
        raw = [xy(s, v) for s, v in points]
        smooth = [xy(s, v) for s, v in zip([s for s, _ in points], _smooth([v for _, v in points]))]
        if len(raw) > 1:
            draw.line(raw, fill="#9ecae1", width=1)
            draw.line(smooth, fill="#08519c", width=3)
        elif raw:
            x, y = raw[0]
            draw.ellipse([(x - 3, y - 3), (x + 3, y + 3)], fill="#08519c")
        for k, ((name, found), colour) in enumerate(zip(evals.items(), _cycle(EVAL_COLOURS))):
            for step, loss in found:
                x, y = xy(step, loss)
                draw.ellipse([(x - 4, y - 4), (x + 4, y + 4)], fill=colour)
            draw.ellipse([(x0 + 10, y1 + 8 + 14 * k), (x0 + 18, y1 + 16 + 14 * k)], fill=colour)
            draw.text((x0 + 24, y1 + 6 + 14 * k), f"eval {name}", fill="black", font=font)
        draw.line([(x1 - 190, 22), (x1 - 170, 22)], fill="#9ecae1", width=2)
        draw.text((x1 - 165, 16), "loss", fill="black", font=font)
        draw.line([(x1 - 120, 22), (x1 - 100, 22)], fill="#08519c", width=3)
        draw.text((x1 - 95, 16), "moving avg", fill="black", font=font)
    else:
        draw.text((width // 2 - 60, height // 2), "no finite loss yet", fill="gray", font=font)
    draw.line([(x0, y1), (x0, y0), (x1, y0)], fill="black", width=1)
    draw.text(((x0 + x1) // 2 - 12, height - 22), "step", fill="black", font=font)
    draw.text((8, top - 28), "loss", fill="black", font=font)
    image.save(out)
