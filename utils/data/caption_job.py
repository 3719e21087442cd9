"""Captioning a folder of images without ever losing finished work.

  * ``list_images`` / ``encode_image``: the images of a folder, downscaled and re-encoded as JPEG;
  * ``shape_caption``: the model's text tidied, capped and framed by a prefix and suffix;
  * ``CaptionStore``: the captions JSON, rewritten atomically after every caption;
  * ``caption_images``: a bounded thread pool over the images that still need a caption.
"""

from __future__ import annotations

import io
import json
import logging
import os
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from utils.core.atomic import write_json
from utils.data.captioner import CaptionError, CaptionFailure, GeminiCaptioner
from utils.data.images import open_rgb
from utils.data.records import IMAGE_SUFFIXES

logger = logging.getLogger(__name__)


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
