"""Pictures for people: labelled image grids, and the base-vs-LoRA comparison grid."""

from __future__ import annotations

import textwrap

from PIL import Image, ImageDraw, ImageFont


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
