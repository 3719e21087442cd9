"""Merge captions JSON files ({"file name": "caption"}) into one.

When a file name appears in more than one input, the later file wins; every such
duplicate is reported with the files it came from and which value was kept.

    python utils/merge_captions.py --file1 a.json --file2 b.json --output captions.json
    python utils/merge_captions.py --files a.json b.json c.json --output captions.json
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils.atomic import write_json


class MergeError(Exception):
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


def read_captions(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise MergeError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MergeError(f"{path}: not valid JSON ({error})") from None
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Merge captions JSON files; later files win on duplicates.")
    parser.add_argument("--file1", type=Path, help="first captions file")
    parser.add_argument("--file2", type=Path, help="second captions file")
    parser.add_argument("--files", type=Path, nargs="+", default=[], help="more captions files, in order")
    parser.add_argument("more", type=Path, nargs="*", help="more captions files, in order")
    parser.add_argument("--output", type=Path, required=True, help="merged captions file")
    args = parser.parse_args(argv)
    args.inputs = [p for p in (args.file1, args.file2) if p is not None] + args.files + args.more
    if len(args.inputs) < 2:
        parser.error("give at least two files to merge (--file1/--file2, --files or positional)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        merged, duplicates = merge(args.inputs)
    except MergeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for duplicate in duplicates:
        print(duplicate.describe())
    write_json(args.output, merged)
    print(f"merged {len(merged)} captions from {len(args.inputs)} files into {args.output}; "
          f"{len(duplicates)} duplicates (the later file wins)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
