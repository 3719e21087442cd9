"""Merge captions JSON files ({"file name": "caption"}) into one.

When a file name appears in more than one input, the later file wins; every such
duplicate is reported with the files it came from and which value was kept.

    python utils/merge_captions.py     # ghibli/ghibli_captions_simplified.json + ghibli_2_captions.json
                                       #   -> ghibli/merged_captions.json, as the original
    python utils/merge_captions.py --file1 a.json --file2 b.json --output captions.json
    python utils/merge_captions.py --files a.json b.json c.json --output captions.json

From Python, the original's functions: ``load_json_file(file_path)`` and
``merge_captions(file1_path, file2_path, output_path)``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils.core.atomic import write_json
from utils.core.cli import Parser, run_cli
from utils.core.errors import UserError

logger = logging.getLogger("merge_captions")

# The original's defaults.
DEFAULT_FILE1 = Path("ghibli") / "ghibli_captions_simplified.json"
DEFAULT_FILE2 = Path("ghibli_2_captions.json")
DEFAULT_OUTPUT = Path("ghibli") / "merged_captions.json"


class MergeError(UserError):
    """An input that cannot be merged; the message names the file and the reason."""


@dataclass
class Duplicate:
    name: str
    sources: list[tuple[Path, str]]  # (file, caption) in input order; the last one wins

    @property
    def winner(self) -> Path:
        return self.sources[-1][0]

    def describe(self) -> str:
        files = ", ".join(str(path) for path, _ in self.sources)
        same = len({caption for _, caption in self.sources}) == 1
        kind = "same caption" if same else "different captions"
        return f"duplicate {self.name!r} in {files} ({kind}); kept the value from {self.winner}"


def read_json(path: Path) -> Any:
    if not path.is_file():
        raise MergeError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MergeError(f"{path}: not valid JSON ({error})") from None


def read_captions(path: Path) -> dict[str, str]:
    data = read_json(path)
    if not isinstance(data, dict):
        raise MergeError(f'{path}: expected a {{"file name": "caption"}} object, got {type(data).__name__}')
    for name, caption in data.items():
        if not isinstance(caption, str):
            raise MergeError(f"{path}: caption of {name!r} is {type(caption).__name__}, not text")
    return data


def merge(paths: list[Path]) -> tuple[dict[str, str], list[Duplicate]]:
    """All captions of ``paths`` (later files win) and the file names found more than once."""
    merged: dict[str, str] = {}
    seen: dict[str, list[tuple[Path, str]]] = {}
    for path in paths:
        for name, caption in read_captions(path).items():
            merged[name] = caption
            seen.setdefault(name, []).append((path, caption))
    duplicates = [Duplicate(name, sources) for name, sources in seen.items() if len(sources) > 1]
    return merged, duplicates


def write_merged(paths: list[Path], output: Path) -> tuple[dict[str, str], list[Duplicate]]:
    """Merge ``paths`` into ``output`` (written atomically); raises MergeError before writing on bad input."""
    merged, duplicates = merge(paths)
    write_json(output, merged)
    return merged, duplicates


def summary_line(merged: dict[str, str], paths: list[Path], duplicates: list[Duplicate], output: Path) -> str:
    return (f"merged {len(merged)} captions from {len(paths)} files into {output}; "
            f"{len(duplicates)} duplicates (the later file wins)")


# --- the original's Python API ---------------------------------------------

def load_json_file(file_path: str | os.PathLike) -> Any | None:
    """The JSON content of ``file_path``, or None when it is missing or not JSON (the reason is logged)."""
    try:
        return read_json(Path(file_path))
    except MergeError as error:
        logger.error("%s", error)
        return None


def merge_captions(file1_path: str | os.PathLike, file2_path: str | os.PathLike,
                   output_path: str | os.PathLike) -> dict[str, str] | None:
    """Merge two captions files into ``output_path`` (the second file wins) and return the merged captions.

    As in the original, a file that cannot be read is reported (logged) and None is returned,
    with nothing written.
    """
    paths, output = [Path(file1_path), Path(file2_path)], Path(output_path)
    try:
        merged, duplicates = write_merged(paths, output)
    except MergeError as error:
        logger.error("%s", error)
        return None
    for duplicate in duplicates:
        logger.warning("%s", duplicate.describe())
    logger.info("%s", summary_line(merged, paths, duplicates, output))
    return merged


# --- the command line ------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = Parser(
        description="Merge captions JSON files; later files win on duplicates.",
        epilog="example:\n  python utils/merge_captions.py --files a.json b.json --output captions.json")
    parser.add_argument("--file1", type=Path, default=None,
                        help=f"first captions file (default {DEFAULT_FILE1}, unless --files or positional files are given)")
    parser.add_argument("--file2", type=Path, default=None,
                        help=f"second captions file (default {DEFAULT_FILE2}, unless --files or positional files are given)")
    parser.add_argument("--files", type=Path, nargs="+", default=[], help="more captions files, in order")
    parser.add_argument("more", type=Path, nargs="*", help="more captions files, in order")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                        help=f"merged captions file (default {DEFAULT_OUTPUT})")
    return parser.parse_args(argv)


def input_files(args: argparse.Namespace) -> list[Path]:
    """--file1, --file2, --files, then positional files; the original's two files when no list is given."""
    listed = args.files + args.more
    file1 = args.file1 if args.file1 is not None or listed else DEFAULT_FILE1
    file2 = args.file2 if args.file2 is not None or listed else DEFAULT_FILE2
    return [path for path in (file1, file2) if path is not None] + listed


def main(argv: list[str] | None = None) -> int:
    """The command line (the original's main()); returns the exit status. Bad input raises MergeError."""
    args = parse_args(argv)
    inputs = input_files(args)
    if len(inputs) < 2:
        raise MergeError("give at least two files to merge (--file1/--file2, --files or positional)")
    merged, duplicates = write_merged(inputs, args.output)
    for duplicate in duplicates:
        print(duplicate.describe())
    print(summary_line(merged, inputs, duplicates, args.output))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
