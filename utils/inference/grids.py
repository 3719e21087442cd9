"""Pictures for people: base-vs-LoRA comparison grids and loss curves."""

from __future__ import annotations

import csv
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from utils.core.atomic import replace_file

LABEL_HEIGHT = 22
MARGIN = 4


def _font(size: int = 14):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def labelled_grid(rows: list[list[Image.Image]], row_labels: list[str], title: str | None = None,
                  column_labels: list[str] | None = None) -> Image.Image:
    """Images in rows, each row labelled on its left, an optional title (wrapped) above all."""
    font = _font()
    cell_w = max(img.width for row in rows for img in row)
    cell_h = max(img.height for row in rows for img in row)
    label_w = max(8 + int(font.getlength(label)) for label in row_labels) if row_labels else 0
    columns = max(len(row) for row in rows)
    title_lines = textwrap.wrap(title, width=max(20, (label_w + columns * cell_w) // 8)) if title else []
    top = len(title_lines) * LABEL_HEIGHT + (LABEL_HEIGHT if column_labels else 0)
    width = label_w + columns * (cell_w + MARGIN) + MARGIN
    height = top + len(rows) * (cell_h + MARGIN) + MARGIN
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for line_index, line in enumerate(title_lines):
        draw.text((MARGIN, line_index * LABEL_HEIGHT + 3), line, fill="black", font=font)
    for column, label in enumerate(column_labels or []):
        draw.text((label_w + MARGIN + column * (cell_w + MARGIN), top - LABEL_HEIGHT + 3), label,
                  fill="black", font=font)
    for row_index, (row, label) in enumerate(zip(rows, row_labels)):
        y = top + MARGIN + row_index * (cell_h + MARGIN)
        draw.text((MARGIN, y + cell_h // 2 - 7), label, fill="black", font=font)
        for column, image in enumerate(row):
            canvas.paste(image, (label_w + MARGIN + column * (cell_w + MARGIN), y))
    return canvas


def comparison_grid(base_images: list[Image.Image], lora_images: list[Image.Image], prompt: str,
                    lora_label: str = "LoRA") -> Image.Image:
    """The original's comparison: base row on top, LoRA row below, labelled with the prompt."""
    return labelled_grid([base_images, lora_images], ["Base", lora_label], title=prompt)


def save_image(image: Image.Image, path: Path) -> Path:
    """Save a PIL image atomically; PNG when the name has no suffix."""
    return replace_file(path, lambda temporary: image.save(temporary, format=None if Path(path).suffix else "PNG"))


def save_figure(figure, path: Path) -> Path:
    """Save a matplotlib figure atomically and release it."""
    import matplotlib.pyplot as plt

    replace_file(path, lambda temporary: figure.savefig(temporary))
    plt.close(figure)
    return Path(path)


def find_loss_log(log_dir: Path) -> Path | None:
    """The run's per-step loss log (``training_steps.csv``), else the original's per-epoch
    ``training_log.csv`` (all that a run of the original, or an older run, has)."""
    for name in ("training_steps.csv", "training_log.csv"):
        if (Path(log_dir) / name).is_file():
            return Path(log_dir) / name
    return None


def plot_loss_curve(csv_path: Path, png_path: Path) -> Path:
    """Training loss against the optimizer step (and its moving average) from a loss log: one row per
    step (training_steps.csv) or one per epoch (training_log.csv, the epoch's mean)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path, newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("step")]
    steps = [int(row["step"]) for row in rows]
    losses = [float(row["loss"]) for row in rows]
    unit = "epoch" if Path(csv_path).name == "training_log.csv" else "step"
    window = max(1, len(losses) // 20)
    smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
              for i in range(len(losses))]
    figure, axis = plt.subplots(figsize=(7, 4), dpi=100)
    axis.plot(steps, losses, alpha=0.35 if window > 1 else 1.0, marker="o" if unit == "epoch" else None,
              label=f"loss per {unit}" + (" (mean)" if unit == "epoch" else ""))
    if window > 1:
        axis.plot(steps, smooth, label=f"moving average ({window} {unit}s)")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("training loss")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    return save_figure(figure, png_path)
