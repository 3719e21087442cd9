"""report.html: the sweep's answer in one page that opens from disk (file://), with no server and no network.

The page is a view of files the report and the runs already hold: the images of every run and epoch (embedded
as down-scaled thumbnails, so the page can be copied or mailed alone), metrics.csv and verdict.json, each
run's experiment_config.json, loss logs and fixed-noise losses, and the sweep's status.json files (runs that
failed, are running or never started). The HTML, CSS and script are gallery_page.html, filled with one JSON
object; it is written atomically, so a rerun after more runs finished replaces it whole.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import logging
import math
import shutil
import subprocess
import tempfile
from datetime import datetime
from pathlib import Path

from utils.core.atomic import replace_file, write_text
from utils.core.layout import (FINAL_MODEL, METRICS_CSV, REPORT_PAGE, STATUS_FILE, SUMMARY_FILE, SWEEP_RESULTS_DIR,
                               TIMESTAMP_FORMAT, VERDICT_FILE, RunLayout, model_info_file)
from utils.core.secrets import scrub
from utils.sweep.epochs import EpochPoint, model_eval_loss
from utils.sweep.outputs import Generation, base_images
from utils.sweep.records import SweepError, read_json
from utils.sweep.runs import RunInfo, read_loss_log

logger = logging.getLogger("sweep_report")

TEMPLATE = Path(__file__).with_name("gallery_page.html")
DATA_MARK = "/*GALLERY_DATA*/null"
THUMBNAIL_SIDE = 256  # the largest side of an embedded image; smaller images are kept as they are
FULL_SIZE_IMAGES = 1500  # up to this many images at THUMBNAIL_SIDE; more, and each is smaller (same total area)
SMALLEST_SIDE = 96
MAX_LOSS_POINTS = 400  # the training-loss curve is thinned to about this many points


class Thumbnails:
    """Each image file once, as a down-scaled data: URI; the page refers to it by its index."""

    def __init__(self, side: int = THUMBNAIL_SIDE):
        self.side, self.uris, self.index = side, [], {}

    def add(self, path: Path) -> int | None:
        key = str(Path(path).resolve())
        if key not in self.index:
            try:
                uri = self._uri(Path(path))
            except OSError as error:  # missing or unreadable: the page shows the cell as missing
                logger.warning("%s: not shown in the page (%s)", path, error)
                uri = None
            self.index[key] = None if uri is None else len(self.uris)
            if uri is not None:
                self.uris.append(uri)
        return self.index[key]

    def add_all(self, groups: list[list[Path]]) -> list[list[int | None]]:
        return [[self.add(path) for path in group] for group in groups]

    def _uri(self, path: Path) -> str:
        from PIL import Image

        with Image.open(path) as opened:
            image = opened.convert("RGB")
        image.thumbnail((self.side, self.side))
        buffer = io.BytesIO()
        small = max(image.size) <= 128  # tiny pictures stay sharp as PNG; larger ones are far smaller as JPEG
        image.save(buffer, format="PNG" if small else "JPEG", quality=85)
        return f"data:image/{'png' if small else 'jpeg'};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def _number(text: str):
    try:
        value = float(text)
    except (TypeError, ValueError):
        return {"yes": True, "no": False}.get(text, text)
    return None if math.isnan(value) else value


def thumbnail_side(count: int, side: int = THUMBNAIL_SIDE) -> int:
    """The thumbnails' side for ``count`` images: the page of the original's full grid (12 runs x 10 epochs x 25
    prompts x 3 seeds, 9000 images) gets about 100 px thumbnails, a few tens of MB instead of over a hundred."""
    if count <= FULL_SIZE_IMAGES:
        return side
    return max(SMALLEST_SIDE, int(side * math.sqrt(FULL_SIZE_IMAGES / count)))


def read_metrics(report_dir: Path) -> dict[str, dict]:
    """metrics.csv's rows by run label (empty when the report measured nothing)."""
    path = report_dir / METRICS_CSV
    if not path.is_file():
        return {}
    with open(path, newline="") as handle:
        return {row["run"]: {k: _number(v) for k, v in row.items()} for row in csv.DictReader(handle)}


def find_sweep_records(runs: list[RunInfo]) -> Path | None:
    """The sweep's bookkeeping folder (experiment_results) beside the folder of the runs, when it names them."""
    wanted = {run.run_dir.resolve() for run in runs}
    for records in dict.fromkeys(run.run_dir.parent.parent / SWEEP_RESULTS_DIR for run in runs):
        for status_file in records.glob(f"runs/*/{STATUS_FILE}"):
            status = read_json(status_file) or {}
            if status.get("run_dir") and Path(status["run_dir"]).resolve() in wanted:
                return records
    return None


def sweep_states(records: Path | None) -> dict[tuple[int, float], dict]:
    """(rank, alpha) -> the sweep's status of that run: every status.json, and the pending runs of summary.json."""
    states: dict[tuple[int, float], dict] = {}
    if records is None:
        return states
    summary = read_json(records / SUMMARY_FILE) or {}
    for entry in summary.get("runs") or []:
        states[(int(entry["rank"]), float(entry["alpha"]))] = entry
    for status_file in sorted(records.glob(f"runs/*/{STATUS_FILE}")):
        status = read_json(status_file) or {}
        if "rank" in status and "alpha" in status:
            states[(int(status["rank"]), float(status["alpha"]))] = status
    return states


def _loss_curve(run: RunInfo) -> dict:
    """The run's training loss (thinned), and its fixed-noise loss before training and at each checkpoint."""
    try:
        steps, losses = read_loss_log(run.run_dir)
    except (OSError, SweepError, ValueError):
        steps, losses = [], []
    finite = [(step, loss) for step, loss in zip(steps, losses) if math.isfinite(loss)]
    finite = finite[::max(1, math.ceil(len(finite) / MAX_LOSS_POINTS))]
    evaluations = []
    final = read_json(run.run_dir / FINAL_MODEL / model_info_file(FINAL_MODEL)) or {}
    if isinstance(final.get("initial_eval_loss"), (int, float)):
        evaluations.append([0, final["initial_eval_loss"]])
    for _, folder in RunLayout(run.run_dir).epoch_models():
        info = read_json(folder / model_info_file(folder.name)) or {}
        if isinstance(info.get("eval_loss"), (int, float)):
            evaluations.append([info.get("global_step") or info.get("step"), info["eval_loss"]])
    if isinstance(final.get("final_eval_loss"), (int, float)) and final.get("step"):
        evaluations.append([final["step"], final["final_eval_loss"]])
    return {"steps": [step for step, _ in finite], "loss": [loss for _, loss in finite],
            "eval": sorted(dict((step, loss) for step, loss in evaluations if step is not None).items())}


def _run_entry(run: RunInfo, generation: Generation | None, metrics: dict | None, status: dict | None,
               points: list[EpochPoint], epoch_rows: dict, thumbs: Thumbnails) -> dict:
    config = {k: v for k, v in scrub(run.config).items() if not k.startswith("_")}
    eval_loss = model_eval_loss(run.run_dir / FINAL_MODEL)
    return {
        "label": run.label, "rank": run.rank, "alpha": run.alpha, "learning_rate": run.learning_rate,
        "state": (status or {}).get("state") or ("finished" if RunLayout(run.run_dir).has_model() else "running"),
        "has_images": generation is not None, "run_dir": run.run_dir.name, "flags": config,
        "images": thumbs.add_all(generation.lora) if generation else None,
        "metrics": metrics, "eval_loss": eval_loss, "curve": _loss_curve(run),
        "epochs": [{"epoch": p.epoch, "model": p.model, "images": thumbs.add_all(p.generation.lora),
                    "metrics": epoch_rows.get((run.label, p.epoch))} for p in points],
    }


def _missing_entry(key: tuple[int, float], status: dict) -> dict:
    """A cell of the grid without images: a run that failed, is running or never started."""
    rank, alpha = key
    return {"label": f"r{rank}_a{alpha:g}_lr{float(status.get('learning_rate') or 0):g}", "rank": rank,
            "alpha": alpha, "learning_rate": status.get("learning_rate"), "state": status.get("state") or "pending",
            "has_images": False, "exit_code": status.get("exit_code"),
            "run_dir": Path(status["run_dir"]).name if status.get("run_dir") else None, "flags": None,
            "images": None, "metrics": None, "eval_loss": None, "curve": None, "epochs": []}


def page_data(report_dir: Path, runs: list[RunInfo], generations: list[Generation], epoch_points: list[EpochPoint],
              records: Path | None, side: int = THUMBNAIL_SIDE) -> dict:
    """Everything the page shows, as one JSON-ready object."""
    groups = [g.base + g.lora for g in generations] + [p.generation.base + p.generation.lora for p in epoch_points]
    count = len({path for group in groups for images in group for path in images})
    thumbs = Thumbnails(thumbnail_side(count, side))
    verdict = read_json(report_dir / VERDICT_FILE) or {}
    metrics = read_metrics(report_dir)
    epoch_rows = {(row["run"], row["epoch"]): row for row in verdict.get("epochs") or []}
    states = sweep_states(records)
    reference = generations[0]
    entries = []
    for run, generation in zip(runs, generations):
        points = [p for p in epoch_points if p.run.run_dir == run.run_dir]
        entries.append(_run_entry(run, generation, metrics.get(run.label), states.pop((run.rank, run.alpha), None),
                                  points, epoch_rows, thumbs))
    entries += [_missing_entry(key, status) for key, status in sorted(states.items())]
    epoch_reference = epoch_points[0].generation if epoch_points else None
    return {
        "written": datetime.now().strftime(TIMESTAMP_FORMAT), "report_dir": report_dir.name,
        "prompts": reference.prompts, "seeds": reference.seeds,
        "base": thumbs.add_all(base_images(generations)),
        "epoch_prompts": epoch_reference.prompts if epoch_reference else [],
        "epoch_seeds": epoch_reference.seeds if epoch_reference else [],
        "epoch_base": thumbs.add_all(base_images([p.generation for p in epoch_points])) if epoch_points else [],
        "ranks": sorted({entry["rank"] for entry in entries}), "alphas": sorted({entry["alpha"] for entry in entries}),
        "runs": entries, "verdict": {k: v for k, v in verdict.items() if k != "epochs"},
        "records": str(records) if records else None, "images": thumbs.uris,
    }


def _finite(value):
    """NaN and infinities as null: JSON.parse reads no other spelling of them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def render_page(data: dict) -> str:
    """The page: the template with the data in it (``</`` escaped, so no string can close the script)."""
    text = json.dumps(_finite(data), ensure_ascii=False, allow_nan=False).replace("</", "<\\/")
    return TEMPLATE.read_text(encoding="utf-8").replace(DATA_MARK, text)


def write_page(report_dir: Path, runs: list[RunInfo], generations: list[Generation], epoch_points: list[EpochPoint],
               records: Path | None = None, thumbnail_side: int = THUMBNAIL_SIDE) -> Path:
    """Write ``{report_dir}/report.html`` atomically; ``records`` default: found beside the runs' folder."""
    records = records or find_sweep_records(runs)
    data = page_data(report_dir, runs, generations, epoch_points, records, thumbnail_side)
    path = report_dir / REPORT_PAGE
    write_text(path, render_page(data))
    logger.info("%s: %d runs, %d images, %.1f MB", path, len(data["runs"]), len(data["images"]),
                path.stat().st_size / 1e6)
    return path


# Headless Chromium on a closed network: without these it waits for updates, sync and QUIC before it draws.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]


def find_chromium() -> str | None:
    return next((path for name in ("chromium", "chromium-browser", "google-chrome") if (path := shutil.which(name))),
                None)


def screenshot(page: Path, png: Path, view: str = "all", size: tuple[int, int] = (1280, 2200)) -> Path:
    """A PNG of the page as headless Chromium draws it (``view``: the part after #; 'all' stacks every view)."""
    chromium = find_chromium()
    if chromium is None:
        raise SweepError("no Chromium found (chromium, chromium-browser or google-chrome) for the page's screenshot")
    with tempfile.TemporaryDirectory(prefix="report-profile-") as profile:
        def fill(temporary: Path) -> None:
            subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}",
                            f"--screenshot={temporary}", f"{Path(page).resolve().as_uri()}#{view}"],
                           check=True, capture_output=True, timeout=180)
        return replace_file(png, fill)
