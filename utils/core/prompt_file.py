"""Prompt files as kohya sd-scripts writes them: one prompt per line, with inline options after it:
``--n`` negative prompt, ``--w``/``--h`` width and height, ``--s`` steps, ``--l`` guidance scale,
``--d`` seed. Blank lines and lines starting with ``#`` are skipped; an option not given is None (the
caller's default then applies)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from utils.core.errors import UserError

OPTIONS = {"n": ("negative_prompt", str), "w": ("width", int), "h": ("height", int), "s": ("steps", int),
           "l": ("guidance_scale", float), "d": ("seed", int)}


class PromptFileError(UserError):
    """A prompt file that cannot be read; the message names the file, the line and the reason."""


@dataclass(frozen=True)
class PromptSpec:
    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None


def parse_prompt_line(line: str) -> PromptSpec:
    """One line: the prompt, then `` --X value`` options (unknown letters are ignored, as kohya does)."""
    prompt, *options = line.strip().split(" --")
    values = {}
    for option in options:
        match = re.match(r"^([a-z])\s+(.+)$", option.strip(), re.IGNORECASE)
        if match and match.group(1).lower() in OPTIONS:
            name, kind = OPTIONS[match.group(1).lower()]
            try:
                values[name] = kind(match.group(2).strip())
            except ValueError:
                raise ValueError(f"--{match.group(1)} {match.group(2).strip()!r} is not a {kind.__name__}") from None
    return PromptSpec(prompt.strip(), **values)


def read_prompt_file(path: str | Path) -> list[PromptSpec]:
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"{path}: prompt file not found")
    specs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            spec = parse_prompt_line(line)
        except ValueError as error:
            raise PromptFileError(f"{path} line {number}: {error}") from None
        if not spec.prompt:
            raise PromptFileError(f"{path} line {number}: options without a prompt")
        specs.append(spec)
    if not specs:
        raise PromptFileError(f"{path}: no prompts")
    return specs
