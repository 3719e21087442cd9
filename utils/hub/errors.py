"""Turning Hub and network failures into one-line messages a user can act on.

huggingface_hub raises typed errors (RepositoryNotFoundError, RemoteEntryNotFoundError,
LocalEntryNotFoundError, OfflineModeIsEnabled...), but diffusers often wraps them in a
plain OSError or ValueError; the original error is then found on the exception chain.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from utils.core.errors import UserError

LOGIN_HINT = "set HF_TOKEN or run `hf auth login`"


class HubError(UserError):
    """A Hub operation that failed for a reason the user can fix; the message is one line."""


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def hub_error_message(error: BaseException, what: str) -> str | None:
    """A one-line explanation of a Hub failure concerning ``what`` (e.g. "LoRA 'user/repo'"), or None."""
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, HFValidationError, LocalEntryNotFoundError, OfflineModeIsEnabled, RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)

    endpoint = constants.ENDPOINT
    for cause in _chain(error):
        if isinstance(cause, GatedRepoError):
            return f"{what}: the repository is gated; accept its terms on the Hub and {LOGIN_HINT}"
        if isinstance(cause, RepositoryNotFoundError):
            return (f"{what}: repository not found on {endpoint} (check the id; for a private repo {LOGIN_HINT})")
        if isinstance(cause, RevisionNotFoundError):
            return f"{what}: revision not found on {endpoint}"
        if isinstance(cause, RemoteEntryNotFoundError):
            return f"{what}: file not found in the repository ({_url_tail(cause)})"
        if isinstance(cause, (OfflineModeIsEnabled, LocalEntryNotFoundError)):
            return (f"{what}: not in the local cache and the Hub cannot be reached "
                    f"(offline mode is {'on' if constants.is_offline_mode() else 'off'}; check the network, "
                    "HF_HUB_OFFLINE and HF_ENDPOINT)")
        if isinstance(cause, HFValidationError):
            return f"{what}: not a valid repo id ({_first_line(cause)})"
        if isinstance(cause, HfHubHTTPError) and cause.response is not None:
            status = cause.response.status_code
            hint = f"; check the token ({LOGIN_HINT})" if status in (401, 403) else ""
            return f"{what}: the server answered HTTP {status}{hint}"
        if isinstance(cause, (httpx2.ConnectError, httpx2.TimeoutException)):
            return f"{what}: cannot reach the Hub at {endpoint} ({type(cause).__name__})"
    return None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _url_tail(error: BaseException) -> str:
    response = getattr(error, "response", None)
    return str(response.url).split("/resolve/", 1)[-1] if response is not None else _first_line(error)


@contextmanager
def hub_errors(what: str) -> Iterator[None]:
    """Re-raise Hub and network failures inside the block as a HubError with a one-line message."""
    try:
        yield
    except HubError:
        raise
    except Exception as error:
        message = hub_error_message(error, what)
        if message is None:
            raise
        raise HubError(message) from error
