"""Caption a folder of images with Gemini without ever losing finished work.

The pieces the captioning CLI puts together:
  * ``resolve_api_key``: the key from the environment (or the original's vault/key.yaml);
  * ``encode_image``: downscale and re-encode an image as JPEG before upload;
  * ``GeminiCaptioner``: one caption per call, retried with exponential backoff and
    jitter on 429/5xx/timeouts, honouring the server's Retry-After / RetryInfo hint;
  * ``CaptionStore``: the captions JSON, rewritten atomically after every caption;
  * ``caption_images``: a bounded thread pool over the images that still need a caption.
"""

from __future__ import annotations

import email.utils
import io
import json
import logging
import os
import random
import re
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from utils.core.atomic import write_json
from utils.data.preflight import open_rgb

logger = logging.getLogger(__name__)

# The original used gemini-2.0-flash, which Google has deprecated with gemini-2.5-flash as its
# replacement (ai.google.dev/gemini-api/docs/deprecations); --model gemini-2.0-flash still works.
ORIGINAL_MODEL = "gemini-2.0-flash"
DEFAULT_MODEL = "gemini-2.5-flash"
# The original's prompt, word for word (a default value of its CLI).
DEFAULT_PROMPT = ("Describe the input image in 1–2 sentences. "
                  "Make sure to mention that the image is in 'Ghibli style'.")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
KEY_ENV_VARS = ("GOOGLE_API_KEY", "GEMINI_API_KEY")  # the SDK's own order of precedence
KEY_FILE = Path("vault") / "key.yaml"
KEY_FIELDS = ("google_api_key", "key")  # the original's field, then this project's earlier one
RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}


class CaptionError(Exception):
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
        key_files = [KEY_FILE, Path(__file__).resolve().parent.parent / KEY_FILE]
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


# --- images and captions ---------------------------------------------------

def list_images(image_dir: str | os.PathLike) -> list[Path]:
    """The images directly inside ``image_dir``, sorted by name."""
    folder = Path(image_dir)
    if not folder.exists():
        raise CaptionError(f"{folder}: image directory not found")
    if not folder.is_dir():
        raise CaptionError(f"{folder}: not a directory")
    images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise CaptionError(f"{folder}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return images


def encode_image(path: Path, max_side: int, quality: int = 90) -> bytes:
    """The image upright, in RGB, its longest side at most ``max_side``, as JPEG bytes."""
    try:
        image = open_rgb(path)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        raise CaptionFailure(f"cannot read image ({error})") from None
    if max_side > 0 and max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def cut_at_word(text: str, limit: int) -> str:
    """``text`` shortened to at most ``limit`` characters, ending at a word boundary."""
    if len(text) <= limit:
        return text
    head = text[:limit + 1]
    space = head.rfind(" ")
    cut = head[:space] if space > 0 else text[:limit]
    return cut.rstrip(" ,;:-")


def shape_caption(text: str, prefix: str = "", suffix: str = "", max_length: int = 0) -> str:
    """Tidy the model's text, cap its length (keeping prefix and suffix whole) and add them."""
    body = " ".join(text.split()).strip().strip('"').strip()
    prefix, suffix = prefix.strip(), suffix.strip()
    if max_length > 0:
        room = max_length - sum(len(part) + 1 for part in (prefix, suffix) if part)
        body = cut_at_word(body, room) if room > 0 else ""
    return " ".join(part for part in (prefix, body, suffix) if part)


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
                    raise CaptionFailure(self._redact(reason) + suffix) from None
                hint = retry_hint(error)
                delay = self.retry.delay(attempt, hint)
                if hint is not None:
                    self._throttle.hold(delay)
                logger.info("%s: %s; retry %d/%d in %.1f s", name, self._redact(reason), attempt + 1,
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

    def _redact(self, text: str) -> str:
        return text.replace(self.api_key, "***") if self.api_key else text


def _why_empty(response: Any) -> str:
    feedback = getattr(response, "prompt_feedback", None)
    if feedback is not None and getattr(feedback, "block_reason", None):
        return f"blocked: {feedback.block_reason}"
    candidates = getattr(response, "candidates", None) or []
    if candidates and getattr(candidates[0], "finish_reason", None):
        return f"finish reason {candidates[0].finish_reason}"
    return "no text in the response"


# --- the captions file -----------------------------------------------------

class CaptionStore:
    """``{"file name": "caption"}`` on disk, rewritten atomically after every change."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._captions = self._load()

    def _load(self) -> dict[str, str]:
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CaptionError(f"{self.path}: existing captions file is unreadable ({error})") from None
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise CaptionError(f"{self.path}: existing captions file is not a {{\"file name\": \"caption\"}} object")
        return data

    def __contains__(self, name: str) -> bool:
        with self._lock:
            return name in self._captions

    def __len__(self) -> int:
        with self._lock:
            return len(self._captions)

    def snapshot(self) -> dict[str, str]:
        with self._lock:
            return dict(self._captions)

    def set(self, name: str, caption: str) -> None:
        with self._lock:
            self._captions[name] = caption
            write_json(self.path, dict(sorted(self._captions.items())))


# --- the job ---------------------------------------------------------------

@dataclass
class CaptionSummary:
    captioned: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already captioned before this run
    failed: dict[str, str] = field(default_factory=dict)  # file name -> reason

    def lines(self) -> list[str]:
        lines = [f"captioned {len(self.captioned)}, already had a caption {len(self.skipped)}, "
                 f"failed {len(self.failed)}"]
        lines += [f"  failed {name}: {reason}" for name, reason in sorted(self.failed.items())]
        return lines


@dataclass
class CaptionJob:
    prefix: str = ""
    suffix: str = ""
    max_caption_length: int = 0
    max_image_side: int = 1024
    workers: int = 4
    overwrite: bool = False
    progress: bool = True


def caption_images(images: Iterable[Path], store: CaptionStore, captioner: GeminiCaptioner,
                   job: CaptionJob) -> CaptionSummary:
    """Caption every image the store lacks (all of them with ``overwrite``), saving each as it arrives.

    On KeyboardInterrupt the queued images are dropped, the requests in flight finish and are
    saved, and the interrupt is raised again; every finished caption is on disk.
    """
    summary = CaptionSummary()
    todo: list[Path] = []
    for path in images:
        if path.name in store and not job.overwrite:
            summary.skipped.append(path.name)
        else:
            todo.append(path)
    if not todo:
        return summary

    def work(path: Path) -> str:
        caption = captioner.caption(encode_image(path, job.max_image_side), name=path.name)
        caption = shape_caption(caption, job.prefix, job.suffix, job.max_caption_length)
        store.set(path.name, caption)
        return caption

    pool = ThreadPoolExecutor(max_workers=max(1, job.workers), thread_name_prefix="caption")
    bar = tqdm(total=len(todo), desc="captioning", unit="img", disable=not job.progress)
    pending: dict[Future, Path] = {}
    try:
        pending.update({pool.submit(work, path): path for path in todo})
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                _record(summary, pending.pop(future), future)
                bar.update(1)
                bar.set_postfix(failed=len(summary.failed), refresh=False)
    except BaseException:
        captioner.stop.set()
        pool.shutdown(wait=False, cancel_futures=True)
        bar.close()
        in_flight = sum(1 for future in pending if future.running())
        if in_flight:
            logger.warning("stopping: waiting for %d request(s) in flight so their captions are saved "
                           "(Ctrl-C again to quit now)", in_flight)
        pool.shutdown(wait=True)  # a second Ctrl-C interrupts this wait
        raise
    bar.close()
    pool.shutdown(wait=True)
    return summary


def _record(summary: CaptionSummary, path: Path, future: Future) -> None:
    error = future.exception()
    if error is None:
        summary.captioned.append(path.name)
    elif isinstance(error, CaptionFailure):
        summary.failed[path.name] = str(error)
    else:
        raise error  # not about one image (e.g. the captions file cannot be written): stop the job
