"""The Gemini captioning client: the API key, retries with backoff, and one caption per call.

  * ``resolve_api_key``: the key from the environment (or the original's vault/key.yaml);
  * ``GeminiCaptioner``: one caption per call, retried with exponential backoff and
    jitter on 429/5xx/timeouts, honouring the server's Retry-After / RetryInfo hint;
  * ``Throttle``: a gate a 429 with a wait hint closes for every worker.

utils/data/caption_job.py puts it to work over a folder of images.
"""

from __future__ import annotations

import email.utils
import logging
import os
import random
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from utils.core.errors import UserError
from utils.core.secrets import redact

logger = logging.getLogger(__name__)

# The original used gemini-2.0-flash, which Google has deprecated with gemini-2.5-flash as its
# replacement (ai.google.dev/gemini-api/docs/deprecations); --model gemini-2.0-flash still works.
ORIGINAL_MODEL = "gemini-2.0-flash"
DEFAULT_MODEL = "gemini-2.5-flash"
# The original's prompt, word for word (a default value of its CLI).
DEFAULT_PROMPT = ("Describe the input image in 1–2 sentences. "
                  "Make sure to mention that the image is in 'Ghibli style'.")
KEY_ENV_VARS = ("GOOGLE_API_KEY", "GEMINI_API_KEY")  # the SDK's own order of precedence
KEY_FILE = Path("vault") / "key.yaml"
KEY_FIELDS = ("google_api_key", "key")  # the original's field, then this project's earlier one
RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}




class CaptionError(UserError):
    """Bad input found before any request is sent; the message is one line naming the cause."""


class CaptionFailure(Exception):
    """One image could not be captioned; the message is the reason shown in the summary."""


def _transport_errors() -> tuple[type[BaseException], ...]:
    # google-genai sends through httpx (or its successor httpx2); timeouts and dropped
    # connections surface as their TransportError, which the SDK does not wrap.
    found: list[type[BaseException]] = [TimeoutError, ConnectionError]
    for name in ("httpx", "httpx2"):
        try:
            module = __import__(name)
        except ImportError:
            continue
        found.append(module.TransportError)
    return tuple(found)


TRANSPORT_ERRORS = _transport_errors()


# --- API key ---------------------------------------------------------------

def resolve_api_key(key_files: Sequence[Path] | None = None) -> str:
    """The Gemini API key from GOOGLE_API_KEY / GEMINI_API_KEY, else from the original's vault/key.yaml.

    The key file is looked for in the working directory, then in the repository root; its
    ``google_api_key`` field holds the key (as in the original; a ``key`` field is read too).
    """
    for name in KEY_ENV_VARS:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    if key_files is None:
        key_files = [KEY_FILE, Path(__file__).resolve().parents[2] / KEY_FILE]
    for path in key_files:
        if Path(path).is_file():
            return _key_from_yaml(Path(path))
    raise CaptionError("no Gemini API key: set GEMINI_API_KEY (or GOOGLE_API_KEY) in the environment, "
                       f"or put 'google_api_key: ...' in {KEY_FILE}")


def _key_from_yaml(path: Path) -> str:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        # The YAML error text can quote the file's content, which is the secret; name the type only.
        raise CaptionError(f"{path}: cannot read the API key file ({type(error).__name__})") from None
    fields = data if isinstance(data, dict) else {}
    for name in KEY_FIELDS:
        key = fields.get(name)
        if isinstance(key, str) and key.strip():
            return key.strip()
    raise CaptionError(f"{path}: no 'google_api_key' field with the API key")


# --- retries ---------------------------------------------------------------

@dataclass
class RetryPolicy:
    max_retries: int = 5
    base_delay: float = 1.0
    max_delay: float = 60.0
    max_hint: float = 600.0  # a server hint longer than this is treated as this

    def backoff(self, attempt: int) -> float:
        """Exponential delay for retry number ``attempt`` (0-based), with jitter in its upper half."""
        delay = min(self.max_delay, self.base_delay * 2 ** attempt)
        return delay / 2 + random.uniform(0, delay / 2)

    def delay(self, attempt: int, hint: float | None) -> float:
        if hint is None:
            return self.backoff(attempt)
        hint = min(hint, self.max_hint)
        return hint + random.uniform(0, 0.1 * hint)  # a little jitter so workers do not return in step


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header: a number of seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


def _retry_info_delay(details: Any) -> float | None:
    """The ``retryDelay`` of a google.rpc.RetryInfo entry in an error body, e.g. "37s"."""
    error = details.get("error", details) if isinstance(details, dict) else {}
    entries = error.get("details", []) if isinstance(error, dict) else []
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, dict) and str(entry.get("@type", "")).endswith("google.rpc.RetryInfo"):
            match = re.fullmatch(r"\s*([0-9.]+)s\s*", str(entry.get("retryDelay", "")))
            if match:
                return float(match.group(1))
    return None


def retry_hint(error: BaseException) -> float | None:
    """The server's wait hint in an SDK error: the Retry-After header, else a RetryInfo body."""
    response = getattr(error, "response", None)
    headers = getattr(response, "headers", None)
    if headers is not None:
        hint = parse_retry_after(headers.get("retry-after"))
        if hint is not None:
            return hint
    return _retry_info_delay(getattr(error, "details", None))


class Throttle:
    """A gate all workers pass before a request; a 429 with a hint closes it for everyone."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._not_before = 0.0

    def hold(self, seconds: float) -> None:
        with self._lock:
            self._not_before = max(self._not_before, time.monotonic() + seconds)

    def wait(self, stop: threading.Event) -> None:
        while not stop.is_set():
            with self._lock:
                remaining = self._not_before - time.monotonic()
            if remaining <= 0:
                return
            stop.wait(remaining)


# --- the client ------------------------------------------------------------

@dataclass
class GeminiCaptioner:
    """Captions one JPEG at a time through google-genai, with our own retries."""

    api_key: str = field(repr=False)
    model: str = DEFAULT_MODEL
    prompt: str = DEFAULT_PROMPT
    temperature: float = 0.5
    base_url: str | None = None
    timeout: float = 60.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        from google import genai
        from google.genai import types

        self._types = types
        options = types.HttpOptions(timeout=int(self.timeout * 1000), base_url=self.base_url or None)
        self._client = genai.Client(api_key=self.api_key, vertexai=False, http_options=options)
        self._throttle = Throttle()

    def caption(self, jpeg: bytes, name: str = "image") -> str:
        """The model's caption for one image; raises CaptionFailure with the reason when it gives up."""
        attempts = self.retry.max_retries + 1
        for attempt in range(attempts):
            self._throttle.wait(self.stop)
            if self.stop.is_set():
                raise CaptionFailure("interrupted")
            try:
                return self._request(jpeg)
            except CaptionFailure:
                raise
            except Exception as error:  # noqa: BLE001 (sorted into retryable or not just below)
                retryable, reason = self._classify(error)
                if not retryable or attempt + 1 >= attempts:
                    suffix = f" after {attempt + 1} attempts" if retryable else ""
                    raise CaptionFailure(redact(reason, [self.api_key]) + suffix) from None
                hint = retry_hint(error)
                delay = self.retry.delay(attempt, hint)
                if hint is not None:
                    self._throttle.hold(delay)
                logger.info("%s: %s; retry %d/%d in %.1f s", name, redact(reason, [self.api_key]), attempt + 1,
                            self.retry.max_retries, delay)
                if self.stop.wait(delay):
                    raise CaptionFailure("interrupted") from None
        raise AssertionError("unreachable")

    def _request(self, jpeg: bytes) -> str:
        types = self._types
        response = self._client.models.generate_content(
            model=self.model,
            contents=[types.Part.from_bytes(data=jpeg, mime_type="image/jpeg"), self.prompt],
            config=types.GenerateContentConfig(temperature=self.temperature),
        )
        text = response.text
        if not text or not text.strip():
            raise CaptionFailure(f"empty answer ({_why_empty(response)})")
        return text

    def _classify(self, error: BaseException) -> tuple[bool, str]:
        from google.genai import errors

        if isinstance(error, errors.APIError):
            message = f"HTTP {error.code} {error.status or ''}".strip()
            if error.message:
                message += f": {error.message}"
            return error.code in RETRYABLE_STATUS, message
        if isinstance(error, TRANSPORT_ERRORS):
            return True, f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        return False, f"{type(error).__name__}: {error}"


def _why_empty(response: Any) -> str:
    feedback = getattr(response, "prompt_feedback", None)
    if feedback is not None and getattr(feedback, "block_reason", None):
        return f"blocked: {feedback.block_reason}"
    candidates = getattr(response, "candidates", None) or []
    if candidates and getattr(candidates[0], "finish_reason", None):
        return f"finish reason {candidates[0].finish_reason}"
    return "no text in the response"
