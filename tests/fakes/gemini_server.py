"""A small Gemini-compatible HTTP server on 127.0.0.1 for the captioning tests.

It answers ``POST /{version}/models/{model}:generateContent`` the way the Gemini API
does, closely enough for the real ``google-genai`` client: it decodes the uploaded
image, records what it saw (path, headers, image size, mean colour) and replies with a
caption naming the image's mean colour, so a test can tell which image a caption
belongs to. Failures can be scripted ahead of time (HTTP errors with a Retry-After
header or a RetryInfo body, or a stall that makes the client time out), every answer
can be delayed, and answers can be held back after a given number (``pause_after``) so
a test can interrupt a client at a known point.

    with GeminiServer(delay=0.1) as server:
        server.fail_next(1, status=429, headers={"Retry-After": "1"})
        client = genai.Client(api_key="k", http_options=types.HttpOptions(base_url=server.base_url))
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

from PIL import Image

from tests.fakes.local_server import LocalServer, QuietHandler

GENERATE_PATH = re.compile(r"^/(v1|v1beta|v1alpha)/models/([^/:]+):generateContent$")
STATUS_NAMES = {400: "INVALID_ARGUMENT", 403: "PERMISSION_DENIED", 429: "RESOURCE_EXHAUSTED",
                500: "INTERNAL", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}


@dataclass
class Failure:
    """One scripted misbehaviour, used for the next request that arrives."""

    status: int = 503
    headers: dict[str, str] = field(default_factory=dict)
    retry_delay: str | None = None  # a google.rpc.RetryInfo "retryDelay" such as "0.5s"
    stall: float = 0.0  # seconds to wait before answering normally (makes a client time out)
    message: str = "scripted failure"


@dataclass
class RecordedRequest:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    mime_type: str | None
    image_size: tuple[int, int] | None
    color: tuple[int, int, int] | None
    status: int
    time: float


def mean_color(image: Image.Image) -> tuple[int, int, int]:
    pixels = image.convert("RGB").resize((1, 1), Image.Resampling.BOX).getpixel((0, 0))
    return tuple(int(value) for value in pixels)


def caption_for(color: tuple[int, int, int] | None) -> str:
    if color is None:
        return "A picture without an image in Ghibli style."
    return f"A calm scene painted in rgb {color[0]} {color[1]} {color[2]}, in Ghibli style."


class GeminiServer(LocalServer):
    """A scriptable stand-in for the Gemini API, served from a background thread."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.requests: list[RecordedRequest] = []
        self.held = 0  # requests waiting behind pause_after
        self._failures: deque[Failure] = deque()
        self._lock = threading.Lock()
        self._budget: int | None = None
        self._gate = threading.Event()
        self._gate.set()
        super().__init__()

    def stop(self) -> None:
        self.resume()
        super().stop()

    def fail_next(self, count: int, status: int = 503, headers: dict[str, str] | None = None,
                  retry_delay: str | None = None, stall: float = 0.0, message: str = "scripted failure") -> None:
        with self._lock:
            for _ in range(count):
                self._failures.append(Failure(status, dict(headers or {}), retry_delay, stall, message))

    def pause_after(self, count: int) -> None:
        """Answer ``count`` more captions, then hold every further one until ``resume``."""
        with self._lock:
            self._budget = count
            self._gate.clear()

    def resume(self) -> None:
        with self._lock:
            self._budget = None
            self._gate.set()

    def _wait_turn(self) -> None:
        with self._lock:
            if self._budget is None:
                return
            if self._budget > 0:
                self._budget -= 1
                return
            self.held += 1
        self._gate.wait()

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self._failures.clear()
            self.held = 0

    def answered(self) -> Counter:
        """How many successful captions were sent per image colour."""
        with self._lock:
            return Counter(r.color for r in self.requests if r.status == 200)

    def _next_failure(self) -> Failure | None:
        with self._lock:
            return self._failures.popleft() if self._failures else None

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(QuietHandler):
            def do_POST(self) -> None:  # noqa: N802 (the name http.server calls)
                server._answer_generate(self)

        return Handler

    def _answer_generate(self, handler: QuietHandler) -> None:
        """One generateContent request: record it, then fail, stall or answer with a caption as scripted."""
        try:
            body = json.loads(handler.read_body() or b"{}")
        except json.JSONDecodeError:
            body = {}
        mime_type, image = _first_image(body)
        failure = self._next_failure()
        if not GENERATE_PATH.match(handler.path):
            status = 404
        elif failure is not None and failure.stall == 0:
            status = failure.status
        else:
            status = 200
        self._record(RecordedRequest(
            path=handler.path,
            headers={key.lower(): value for key, value in handler.headers.items()},
            body=body,
            mime_type=mime_type,
            image_size=image.size if image else None,
            color=mean_color(image) if image else None,
            status=status,
            time=time.monotonic(),
        ))
        if failure is not None and failure.stall:
            time.sleep(failure.stall)
        elif status == 200:
            self._wait_turn()
            time.sleep(self.delay)
        if status == 200:
            text = caption_for(mean_color(image) if image else None)
            payload = {"candidates": [{"content": {"role": "model", "parts": [{"text": text}]},
                                       "finishReason": "STOP"}]}
            _send(handler, 200, payload)
        elif status == 404:
            _send(handler, 404, _error_body(404, f"unknown path {handler.path}"))
        else:
            assert failure is not None
            _send(handler, status, _error_body(status, failure.message, failure.retry_delay), failure.headers)


def _send(handler: QuietHandler, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
    handler.answer(status, {"Content-Type": "application/json; charset=UTF-8", **(headers or {})},
                   json.dumps(payload).encode())


def _first_image(body: dict[str, Any]) -> tuple[str | None, Image.Image | None]:
    for content in body.get("contents", []):
        for part in content.get("parts", []):
            inline = part.get("inlineData") or part.get("inline_data")
            if not inline:
                continue
            mime_type = inline.get("mimeType") or inline.get("mime_type")
            data = _b64decode(inline.get("data", ""))
            try:
                image = Image.open(io.BytesIO(data))
                image.load()
            except OSError:
                return mime_type, None
            return mime_type, image
    return None, None


def _b64decode(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _error_body(status: int, message: str, retry_delay: str | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": status, "message": message, "status": STATUS_NAMES.get(status, "UNKNOWN")}
    if retry_delay is not None:
        error["details"] = [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": retry_delay}]
    return {"error": error}
