"""Caption every image in a folder with Gemini, into a JSON file ({"file name": "caption"}).

Each caption is saved the moment it arrives, so an interrupted run loses nothing and a
rerun only captions the images still missing (--overwrite redoes them all).

    export GEMINI_API_KEY=...          # or vault/key.yaml with "google_api_key: ..."
    python utils/creat_text_caption.py          # ghibli_2/ -> ghibli_2_captions.json, as the original
    python utils/creat_text_caption.py --image-dir dataset_ghibli/images \\
        --output dataset_ghibli/captions.json --workers 4 --prefix "ghibli style,"

From Python, the original's functions: ``load_api_key()``, ``generate_caption(image_path, prompt,
temperature=0.9)`` and ``process_images(image_dir, prompt, output_file="captions.json", temperature=0.9)``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tqdm.contrib.logging import logging_redirect_tqdm

from utils.core.cli import Parser, run_cli
from utils.data.caption_job import CaptionJob, CaptionStore, caption_images, encode_image, list_images, shape_caption
from utils.data.captioner import (DEFAULT_MODEL, DEFAULT_PROMPT, CaptionError, CaptionFailure, GeminiCaptioner, RetryPolicy, resolve_api_key)

logger = logging.getLogger("creat_text_caption")

# The original's CLI defaults; its functions default to temperature 0.9 and captions.json.
DEFAULT_IMAGE_DIR = "ghibli_2"
DEFAULT_OUTPUT = "ghibli_2_captions.json"
MAX_IMAGE_SIDE = 1024


# --- the original's Python API ---------------------------------------------

def load_api_key() -> str | None:
    """The Gemini API key (GOOGLE_API_KEY / GEMINI_API_KEY, else vault/key.yaml's google_api_key), or None."""
    try:
        return resolve_api_key()
    except CaptionError as error:
        logger.error("%s", error)
        return None


def _captioner(prompt: str, temperature: float, model: str) -> GeminiCaptioner:
    return GeminiCaptioner(api_key=resolve_api_key(), model=model, prompt=prompt, temperature=temperature,
                           base_url=os.environ.get("GEMINI_BASE_URL") or None)


def generate_caption(image_path: str | os.PathLike, prompt: str, temperature: float = 0.9, *,
                     model: str = DEFAULT_MODEL) -> str | None:
    """Gemini's caption for one image, or None when it could not be made (the reason is logged).

    Raises CaptionError when there is no API key.
    """
    captioner = _captioner(prompt, temperature, model)
    path = Path(image_path)
    try:
        return shape_caption(captioner.caption(encode_image(path, MAX_IMAGE_SIDE), name=path.name))
    except CaptionFailure as error:
        logger.error("%s: caption failed: %s", path.name, error)
        return None


def process_images(image_dir: str | os.PathLike, prompt: str, output_file: str | os.PathLike = "captions.json",
                   temperature: float = 0.9, *, model: str = DEFAULT_MODEL, workers: int = 4,
                   overwrite: bool = False) -> dict[str, str]:
    """Caption the images of ``image_dir`` into ``output_file`` ({"file name": "caption"}); return its captions.

    Each caption is saved as it arrives; images already in ``output_file`` are kept and skipped
    unless ``overwrite``. A folder without images is logged and gives {} (as the original, which
    printed a message and returned). Raises CaptionError when there is no API key.
    """
    try:
        images = list_images(image_dir)
    except CaptionError as error:
        logger.error("%s", error)
        return {}
    store = CaptionStore(output_file)
    captioner = _captioner(prompt, temperature, model)
    summary = caption_images(images, store, captioner, CaptionJob(workers=workers, overwrite=overwrite))
    first, *failures = summary.lines()
    logger.info("%s", first)
    for line in failures:
        logger.warning("%s", line)
    logger.info("%d captions in %s", len(store), output_file)
    return store.snapshot()


# --- the command line ------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {value}")
    return value


def _temperature(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 2.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 2, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = Parser(
        description="Caption images with Gemini into a captions JSON file.",
        epilog="example:\n  python utils/creat_text_caption.py --image-dir dataset_ghibli/images \\\n"
               "      --output dataset_ghibli/captions.json")
    parser.add_argument("--image-dir", "--image_dir", dest="image_dir", default=DEFAULT_IMAGE_DIR,
                        help=f"folder of images to caption (default {DEFAULT_IMAGE_DIR})")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="instruction sent with every image")
    parser.add_argument("--output", default=DEFAULT_OUTPUT,
                        help=f'captions file, {{"file name": "caption"}} (default {DEFAULT_OUTPUT})')
    parser.add_argument("--temperature", type=_temperature, default=0.5, help="sampling temperature, 0 to 2")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"Gemini model (default {DEFAULT_MODEL})")
    parser.add_argument("--workers", type=_positive_int, default=4, help="requests in flight at once")
    parser.add_argument("--max_retries", type=_non_negative_int, default=5,
                        help="retries per image on 429, 5xx and timeouts")
    parser.add_argument("--timeout", type=_positive_float, default=60.0, help="seconds to wait for one answer")
    parser.add_argument("--overwrite", action="store_true", help="caption again images that already have one")
    parser.add_argument("--prefix", default="", help="text put before every caption (e.g. a trigger word)")
    parser.add_argument("--suffix", default="", help="text put after every caption")
    parser.add_argument("--max_caption_length", type=_non_negative_int, default=0,
                        help="cap captions at this many characters, cut at a word boundary (0: no cap)")
    parser.add_argument("--max_image_side", type=_non_negative_int, default=1024,
                        help="downscale images so the longest side is at most this before upload (0: keep)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    # For tests and proxies: another Gemini-compatible endpoint.
    parser.add_argument("--base_url", default=os.environ.get("GEMINI_BASE_URL") or None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """The command line (the original's main()); returns the exit status. Bad input raises CaptionError."""
    for name in ("httpx", "httpx2", "google_genai"):  # request lines would tear the progress bar
        logging.getLogger(name).setLevel(logging.WARNING)
    args = parse_args(argv)
    images = list_images(args.image_dir)
    api_key = resolve_api_key()
    store = CaptionStore(args.output)
    captioner = GeminiCaptioner(api_key=api_key, model=args.model, prompt=args.prompt,
                                temperature=args.temperature, base_url=args.base_url, timeout=args.timeout,
                                retry=RetryPolicy(max_retries=args.max_retries))
    job = CaptionJob(prefix=args.prefix, suffix=args.suffix, max_caption_length=args.max_caption_length,
                     max_image_side=args.max_image_side, workers=args.workers, overwrite=args.overwrite,
                     progress=not args.no_progress)
    logger.info("%d images in %s, model %s, %d workers", len(images), args.image_dir, args.model, args.workers)
    try:
        with logging_redirect_tqdm():
            summary = caption_images(images, store, captioner, job)
    except KeyboardInterrupt:
        print(f"interrupted: {len(store)} captions are saved in {args.output}; rerun to finish", file=sys.stderr)
        if any(thread.name.startswith("caption") and thread.is_alive() for thread in threading.enumerate()):
            # A second Ctrl-C: do not wait for the requests in flight (every write is atomic).
            sys.stderr.flush()
            os._exit(130)
        return 130
    for line in summary.lines():
        print(line)
    print(f"{len(store)} captions in {args.output}")
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
