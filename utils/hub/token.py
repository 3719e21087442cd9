"""The Hugging Face token: where it comes from, and using one for a block of Hub requests without saving it."""

from __future__ import annotations

import argparse
import logging
import os
from contextlib import contextmanager
from typing import Iterator

from utils.hub.errors import LOGIN_HINT, HubError

logger = logging.getLogger(__name__)


def resolve_token(cli_token: str | None = None) -> str:
    """The token given (--token or a function argument), else HF_TOKEN, else huggingface_hub's login store."""
    from huggingface_hub import get_token

    if cli_token:
        return cli_token
    token = get_token()
    if not token:
        raise HubError(f"no Hugging Face token found: {LOGIN_HINT}")
    return token


@contextmanager
def hub_token(token: str | None) -> Iterator[None]:
    """Use ``token`` for the Hub requests inside the block (read from HF_TOKEN at each request), never saving it."""
    if not token:
        yield
        return
    previous = os.environ.get("HF_TOKEN")
    os.environ["HF_TOKEN"] = token
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("HF_TOKEN", None)
        else:
            os.environ["HF_TOKEN"] = previous


def add_token_argument(parser: argparse.ArgumentParser) -> None:
    """The --token flag of the Hub commands."""
    parser.add_argument("--token", default=None,
                        help="Hub token (discouraged: visible in the process list; use HF_TOKEN or `hf auth login`)")


def warn_about_token_flag(token: str | None) -> None:
    """A token given as a flag is visible to other users of the machine: say so."""
    if token:
        logger.warning("--token is visible to other users in the process list; prefer HF_TOKEN or `hf auth login`.")
