"""Plain-text tables and units for the benchmark CLIs' output."""

from __future__ import annotations


def mib(num_bytes: float) -> str:
    return f"{num_bytes / 1024 ** 2:,.0f}"


def flops_text(flops: float) -> str:
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if flops >= scale:
            return f"{flops / scale:.2f} {unit}"
    return f"{flops:.0f} FLOP"


def rate_text(value: float) -> str:
    """Enough significant digits for rates from 0.01/s (CPU) to 100/s (GPU)."""
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def format_table(headers: list[str], rows: list[list[str]], left: tuple[int, ...] = (0,)) -> str:
    """Left-aligned first column (and the ``left`` columns), right-aligned numbers."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]

    def line(cells: list[str]) -> str:
        return "  ".join(str(c).ljust(w) if i in left else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(row) for row in rows])
