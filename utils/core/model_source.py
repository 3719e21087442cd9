"""Whether a model name can be loaded at all: an existing path or a possible Hub id, and for a base model a
folder saved by diffusers. Path and string checks only (no torch, no network), so flag checks stay quick."""

from __future__ import annotations

import os
from pathlib import Path


def check_model_source(name: str, flag: str) -> None:
    """A name that is neither an existing path nor a possible Hub id fails here, before any download."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if os.path.exists(name):
        return
    try:
        if name.count("/") != 1 or name.startswith((".", "/", "~")):
            raise HFValidationError("expected namespace/name")
        validate_repo_id(name)
    except HFValidationError as error:
        raise FileNotFoundError(f"{flag} {name}: no such local path, and not a Hub repo id (namespace/name)") \
            from error


def check_base_model(name: str, flag: str) -> None:
    """A base model is a Hub id, a single checkpoint file, or a folder saved by diffusers (with model_index.json);
    any other folder fails here with the reason, and with the subfolder that holds a model if there is one."""
    check_model_source(name, flag)
    folder = Path(name)
    if not folder.is_dir() or (folder / "model_index.json").is_file():
        return
    inside = sorted(str(index.parent) for index in folder.glob("*/model_index.json"))
    hint = f"; did you mean {' or '.join(inside)}?" if inside else ""
    raise FileNotFoundError(f"{flag} {name}: a folder without model_index.json, so not a saved diffusers "
                            f"pipeline{hint}")
