"""Where a model or LoRA named on the command line comes from, settled once and before anything is loaded:
an existing local path; else a Hub id (``namespace/name``) that can be fetched here -- already in the Hub
cache, or the Hub reachable; else one line that says why not. For a base model, also a folder saved by
diffusers, and a single-file checkpoint that can find its configs (``--model_config``, the cache, or the Hub).

No torch and no loading here, so flag checks stay quick; the one network check is a short connection to the
Hub, made once per process and only when a name is neither a local path nor in the cache.
"""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

SDXL_CONFIG_REPO = "stabilityai/stable-diffusion-xl-base-1.0"  # where diffusers fetches single-file configs
REACH_TIMEOUT_S = 3.0


class ModelSourceError(FileNotFoundError):
    """A model or LoRA name that is no local path and no Hub id that can be fetched here."""


def hub_offline() -> bool:
    """True when huggingface_hub is told not to go online (HF_HUB_OFFLINE)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


@functools.lru_cache(maxsize=None)
def _can_connect(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=REACH_TIMEOUT_S):
            return True
    except OSError:
        return False


def hub_reachable() -> bool:
    """Whether the Hub can be reached from here: not offline by setting, and its host answers (checked once)."""
    if hub_offline():
        return False
    from huggingface_hub import constants

    endpoint = urlparse(constants.ENDPOINT)
    return _can_connect(endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http"
                                                                                  else 443))


def is_hub_id(name: str) -> bool:
    """``namespace/name``, as the Hub spells repo ids (one slash, no leading . / ~)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def in_hub_cache(repo_id: str) -> bool:
    """Whether the Hub cache holds a snapshot of ``repo_id`` (so it loads offline)."""
    from huggingface_hub import constants

    snapshots = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())


def resolve_model_source(name: str, flag: str) -> str:
    """``name`` when it can be loaded from here: an existing path, or a Hub id that is cached or fetchable.
    Anything else raises ModelSourceError with one line naming the flag and the reason."""
    if os.path.exists(name):
        return name
    if not is_hub_id(name):
        raise ModelSourceError(f"{flag} {name}: no such file or folder, and not a Hub id (namespace/name)")
    if in_hub_cache(name) or hub_reachable():
        return name
    why = "HF_HUB_OFFLINE is set" if hub_offline() else "the Hub cannot be reached"
    raise ModelSourceError(f"{flag} {name}: no such folder, and not a Hub id that can be fetched here "
                           f"(offline: {why}, and it is not in the Hub cache)")


def check_model_source(name: str, flag: str) -> None:
    """A name that is neither an existing path nor a Hub id that can be fetched here fails, before any download."""
    resolve_model_source(name, flag)


def check_base_model(name: str, flag: str, model_config: str | None = None,
                     config_flag: str = "--model_config") -> None:
    """A base model is a Hub id, a single checkpoint file, or a folder saved by diffusers (with model_index.json);
    any other folder fails here with the reason, and with the subfolder that holds a model if there is one. A
    single file needs its configs: ``model_config`` (a local diffusers folder), the Hub cache or the Hub."""
    resolve_model_source(name, flag)
    folder = Path(name)
    if model_config is not None:
        _check_config_folder(model_config, config_flag)
    if folder.is_file():
        if model_config is None and not in_hub_cache(SDXL_CONFIG_REPO) and not hub_reachable():
            raise ModelSourceError(
                f"{flag} {name}: a single-file checkpoint needs its model configs, which diffusers fetches from "
                f"the Hub ({SDXL_CONFIG_REPO}) and cannot here (offline); pass {config_flag} with a local "
                "diffusers SDXL folder")
        return
    if not folder.is_dir() or (folder / "model_index.json").is_file():
        return
    inside = sorted(str(index.parent) for index in folder.glob("*/model_index.json"))
    hint = f"; did you mean {' or '.join(inside)}?" if inside else ""
    raise ModelSourceError(f"{flag} {name}: a folder without model_index.json, so not a saved diffusers "
                           f"pipeline{hint}")


def _check_config_folder(path: str, flag: str) -> None:
    folder = Path(path)
    if not folder.is_dir():
        raise ModelSourceError(f"{flag} {path}: no such folder (a local diffusers SDXL folder is needed)")
    if not (folder / "model_index.json").is_file() or not (folder / "unet" / "config.json").is_file():
        raise ModelSourceError(f"{flag} {path}: not a diffusers SDXL folder (needs model_index.json and "
                               "unet/config.json)")
