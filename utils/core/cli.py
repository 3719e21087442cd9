"""What every command-line script shares: logging set-up, one-line errors for bad input, and
``derived`` for values computed from the flags (``args`` itself is never written)."""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import sys
from typing import Any, Callable

from utils.core.errors import TrainingInterrupted, UserError

EXPECTED_ERRORS: tuple[type[BaseException], ...] = (FileNotFoundError, NotADirectoryError, PermissionError)


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    # transformers warns at import that torchvision is absent; the project does not use it.
    logging.getLogger("transformers").setLevel(logging.ERROR)
    # SDXL_LORA_LOG_LEVEL=DEBUG: per-step details from the project's own modules (e.g. which images
    # each process trained on), without the libraries' debug output.
    if os.environ.get("SDXL_LORA_LOG_LEVEL"):
        logging.getLogger("utils").setLevel(os.environ["SDXL_LORA_LOG_LEVEL"].upper())


def run_cli(main: Callable[[], int]) -> int:
    """Run ``main``; known input errors (every UserError) end with one line on stderr and exit status 2."""
    setup_logging()
    try:
        return main() or 0
    except EXPECTED_ERRORS + (UserError,) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except TrainingInterrupted as stop:
        print(str(stop), file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


class Parser(argparse.ArgumentParser):
    """argparse's parser, strict and short-spoken: no abbreviated flags (``--lora_ran`` is not ``--lora_rank``),
    and a bad command line ends in one line -- with the closest known flag for an unknown one -- and exit
    status 2, not the whole usage."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        if message.startswith("unrecognized arguments:"):
            message += closest_flags(self, message.split(":", 1)[1].split())
        self.exit(2, f"{self.prog}: error: {message}\n")


def closest_flags(parser: argparse.ArgumentParser, given: list[str]) -> str:
    """"; did you mean --x?" for the unknown flags among ``given`` that are close to one of the parser's."""
    known = [flag for action in parser._actions for flag in action.option_strings]
    unknown = [word.split("=", 1)[0] for word in given if word.startswith("-")]
    hints = []
    for flag in unknown:
        match = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
        if match:
            hints.append(f"did you mean {match[0]}?" if len(unknown) == 1 else f"{flag}: did you mean {match[0]}?")
    return "; " + "; ".join(hints) if hints else ""


def derived(args: argparse.Namespace, **values: Any) -> argparse.Namespace:
    """A new Namespace: the flags of ``args`` with ``values`` added or replaced; ``args`` stays as parsed."""
    return argparse.Namespace(**{**vars(args), **values})
