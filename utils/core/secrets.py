"""One rule for what is secret, and the helpers that hide secrets from files, logs and command lines.

A name is secret when it contains token, secret, key, passw or credential (any case): ``--token``,
``hub_token``, ``api_key``, ``password``; except the names in NOT_SECRET, flags that count caption
tokens. None of the trainer's or the inference script's other flags match, so experiment_config.json
keeps every flag.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

SECRET_NAME = re.compile(r"token|secret|key|passw|credential", re.IGNORECASE)
NOT_SECRET = {"keep_tokens"}  # a number of caption tokens (kohya's flag), not an access token
MASK = "***"


def is_secret(name: str) -> bool:
    """Whether a flag or key name (``--hub_token``, ``api_key``) names a secret."""
    name = name.lstrip("-")
    return name.lower() not in NOT_SECRET and bool(SECRET_NAME.search(name))


def mask_argv(argv: Iterable[str]) -> list[str]:
    """Command-line arguments with the value of every secret flag replaced by ``***``
    (both ``--flag value`` and ``--flag=value``)."""
    shown: list[str] = []
    hide_next = False
    for arg in argv:
        flag = arg.split("=", 1)[0] if arg.startswith("-") else ""
        secret = bool(flag) and is_secret(flag)
        if hide_next:
            shown.append(MASK)
        elif secret and "=" in arg:
            shown.append(f"{flag}={MASK}")
        else:
            shown.append(arg)
        hide_next = secret and "=" not in arg and not hide_next
    return shown


def scrub(data: Any) -> Any:
    """``data`` without any mapping key that names a secret, at any depth (dicts and lists)."""
    if isinstance(data, dict):
        return {key: scrub(value) for key, value in data.items() if not is_secret(str(key))}
    if isinstance(data, list):
        return [scrub(value) for value in data]
    return data


def redact(text: str, values: Iterable[str | None]) -> str:
    """``text`` with every occurrence of the given secret values replaced by ``***``."""
    for value in values:
        if value:
            text = text.replace(value, MASK)
    return text
