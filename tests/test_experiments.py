"""Rank x alpha sweeps: interrupt and resume, GPU slots, the grid, the epoch strip, CLIP metrics and the verdict.

One 2 x 2 sweep of the tiny SDXL model runs through run_experiments.sh (stopped with SIGTERM after its
first run, then restarted), run_inference_experiments.sh and run_checkpoint_inference.sh; the tests
below read what it left.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT

RANKS, ALPHAS, LR = ["2", "4"], ["2", "8"], "1e-2"
PROMPTS = ["a village in ghibli style", "a cat on a roof"]
IMAGE_SIZE = 64
WEIGHTS = "pytorch_lora_weights.safetensors"
TRAIN_FLAGS = ["--resolution", "64", "--train_batch_size", "2", "--num_train_epochs", "2", "--save_steps", "1",
               "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--report_to", "none",
               "--mixed_precision", "no", "--no-gradient_checkpointing"]
INFERENCE_FLAGS = ["--prompts", *PROMPTS, "--num_images", "2", "--height", str(IMAGE_SIZE), "--width",
                   str(IMAGE_SIZE), "--num_inference_steps", "2"]


# One thread per process: on a shared 2-core machine, torch's thread pools oversubscribe the cores and
# a 6-second tiny training can take ten times as long.
ENV = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}


def bash(script: str, *args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / script), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**ENV, **(env or {})})


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains ``text`` (zombies have an empty command line)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def read_status(sweep_dir: Path, rank: str, alpha: str) -> dict | None:
    path = sweep_dir / f"r{rank}_a{alpha}_lr{LR}" / "status.json"
    return json.loads(path.read_text()) if path.is_file() else None


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def find_tile(grid: np.ndarray, tile: np.ndarray) -> tuple[int, int]:
    """(y, x) of the top-left corner where ``tile`` sits in ``grid``."""
    height, width = tile.shape[:2]
    ys, xs = np.nonzero(np.all(grid[: grid.shape[0] - height + 1, : grid.shape[1] - width + 1] == tile[0, 0], -1))
    for y, x in zip(ys, xs):
        if np.array_equal(grid[y:y + height, x:x + width], tile):
            return int(y), int(x)
    raise AssertionError("tile not found in grid")


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory) -> Path:
    from utils.make_tiny_clip import save_tiny_clip
    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny_clip")


@pytest.fixture(scope="module")
def sweep(tiny_model_dir, tmp_path_factory) -> dict:
    """A 2 x 2 sweep, stopped with SIGTERM once the first run finished and the second started, then rerun."""
    from utils.make_tiny_sdxl import make_synthetic_dataset

    work = tmp_path_factory.mktemp("sweep")
    dataset = make_synthetic_dataset(work / "data", num_images=4)
    sweep_dir = work / "sweep"
    args = ["--ranks", " ".join(RANKS), "--alphas", " ".join(ALPHAS), "--lr", LR, "--output_dir", str(sweep_dir),
            "--", "--pretrained_model_name_or_path", str(tiny_model_dir), "--dataset_dir", str(dataset),
            *TRAIN_FLAGS]
    first, second = (RANKS[0], ALPHAS[0]), (RANKS[0], ALPHAS[1])
    output = work / "first_attempt.log"
    with open(output, "w") as log:
        process = subprocess.Popen(["bash", str(ROOT / "run_experiments.sh"), *args], cwd=ROOT, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True, env=ENV)
    try:
        wait_for(lambda: (read_status(sweep_dir, *first) or {}).get("state") == "finished", 240, "the first run")
        wait_for(lambda: (read_status(sweep_dir, *second) or {}).get("state") == "running", 60, "the second run")
        process.send_signal(signal.SIGTERM)  # to the script only: its trap must stop the training
        process.wait(timeout=60)
        left_running = processes_mentioning(str(sweep_dir))
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        for pid in processes_mentioning(str(sweep_dir)):
            os.kill(pid, signal.SIGKILL)
    record = {
        "dir": sweep_dir, "work": work, "dataset": dataset, "stopped_code": process.returncode,
        "stopped_output": output.read_text(), "left_running": left_running,
        "after_stop": {(r, a): read_status(sweep_dir, r, a) for r in RANKS for a in ALPHAS},
        "summary_after_stop": json.loads((sweep_dir / "sweep_summary.json").read_text()),
    }
    record["rerun"] = bash("run_experiments.sh", *args)
    return record


@pytest.fixture(scope="module")
def sweep_inference(sweep, tiny_model_dir, tiny_clip_dir) -> Path:
    out = sweep["work"] / "inference"
    result = bash("run_inference_experiments.sh", "--sweep_dir", str(sweep["dir"]), "--output_dir", str(out),
                  "--clip_model", str(tiny_clip_dir), "--", "--pretrained_model_name_or_path", str(tiny_model_dir),
                  *INFERENCE_FLAGS)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return out


# ----------------------------------------------------------------------------- the sweep


def test_sweep_stops_cleanly_and_resumes_without_retraining(sweep):
    sweep_dir, after_stop = sweep["dir"], sweep["after_stop"]
    first, second = (RANKS[0], ALPHAS[0]), (RANKS[0], ALPHAS[1])
    assert sweep["stopped_code"] == 143, sweep["stopped_output"][-3000:]
    assert sweep["left_running"] == [], "a training outlived the stopped sweep"
    assert after_stop[first]["state"] == "finished" and after_stop[first]["exit_code"] == 0
    assert after_stop[second]["state"] == "interrupted" and after_stop[second]["exit_code"] == 143
    assert after_stop[second]["ended_at"] >= after_stop[second]["started_at"]
    assert [after_stop[(r, a)] for r in RANKS for a in ALPHAS if (r, a) not in (first, second)] == [None, None]
    stopped = sweep["summary_after_stop"]
    assert stopped["stopped_by_signal"] and not stopped["complete"]
    assert (stopped["counts"]["finished"], stopped["counts"]["interrupted"], stopped["counts"]["pending"]) == (1, 1, 2)

    rerun = sweep["rerun"]
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    assert "Skipping r2_a2_lr1e-2" in rerun.stderr
    summary = json.loads((sweep_dir / "sweep_summary.json").read_text())
    assert summary["complete"] and summary["counts"]["finished"] == 4 and not summary["stopped_by_signal"]
    assert summary["ranks"] == [2, 4] and summary["alphas"] == [2.0, 8.0] and summary["learning_rate"] == 0.01
    assert (sweep_dir / "loss_curves.png").is_file()

    for rank in RANKS:
        for alpha in ALPHAS:
            status = read_status(sweep_dir, rank, alpha)
            folder = sweep_dir / f"r{rank}_a{alpha}_lr{LR}"
            assert status["state"] == "finished" and status["exit_code"] == 0
            assert status["started_at"] <= status["ended_at"] and status["duration_s"] >= 0
            trained = [p for p in folder.iterdir() if (p / "final_model" / WEIGHTS).is_file()]
            assert [Path(status["run_dir"])] == trained, "each run trained to the end exactly once"
            config = json.loads((trained[0] / "experiment_config.json").read_text())
            assert (config["lora_rank"], config["lora_alpha"]) == (int(rank), float(alpha))
            assert config["learning_rate"] == 0.01
            with open(trained[0] / "logs" / "training_log.csv", newline="") as handle:
                steps = [int(row["step"]) for row in csv.DictReader(handle)]
            assert steps == [1, 2, 3, 4]
            entry = next(run for run in summary["runs"] if run["folder"] == folder.name)
            assert entry["state"] == "finished" and entry["run_dir"] == status["run_dir"]
    # The run that had finished before the stop was skipped, not trained again.
    assert read_status(sweep_dir, *first) == after_stop[first]
    interrupted = read_status(sweep_dir, *second)
    assert interrupted["attempts"] == 2 and interrupted["history"][0]["state"] == "interrupted"
    assert interrupted["started_at"] >= after_stop[second]["ended_at"]


def test_runs_spread_over_gpus_one_at_a_time(tmp_path):
    """Scheduling only: a stand-in trainer records the GPU it was given and when it ran."""
    stub = tmp_path / "stub_trainer.py"
    stub.write_text(
        "import argparse, json, os, time, pathlib\n"
        "p = argparse.ArgumentParser(); [p.add_argument(f) for f in ('--output_dir', '--lora_rank', "
        "'--lora_alpha', '--learning_rate')]\n"
        "a = p.parse_args(); start = time.time(); time.sleep(1.0)\n"
        "run = pathlib.Path(a.output_dir) / 'run'; (run / 'final_model').mkdir(parents=True)\n"
        "(run / 'final_model' / 'pytorch_lora_weights.safetensors').write_bytes(b'')\n"
        "(run / 'experiment_config.json').write_text(json.dumps({'lora_rank': int(a.lora_rank), "
        "'lora_alpha': float(a.lora_alpha), 'learning_rate': float(a.learning_rate)}))\n"
        "(pathlib.Path(a.output_dir) / 'ran.json').write_text(json.dumps({'gpu': "
        "os.environ.get('CUDA_VISIBLE_DEVICES'), 'start': start, 'end': time.time()}))\n")
    result = bash("run_experiments.sh", "--ranks", "4 8 16", "--alphas", "4", "--gpus", "0,1",
                  "--output_dir", str(tmp_path / "sweep"), env={"TRAIN_SCRIPT": str(stub)}, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    ran = [json.loads(p.read_text()) for p in sorted((tmp_path / "sweep").glob("*/ran.json"))]
    assert len(ran) == 3 and {r["gpu"] for r in ran} == {"0", "1"}
    for i, a in enumerate(ran):
        for b in ran[i + 1:]:
            overlap = a["start"] < b["end"] and b["start"] < a["end"]
            assert not (overlap and a["gpu"] == b["gpu"]), "two runs shared a GPU"
    assert any(a["start"] < b["end"] and b["start"] < a["end"] for i, a in enumerate(ran) for b in ran[i + 1:])
    statuses = [json.loads(p.read_text()) for p in (tmp_path / "sweep").glob("*/status.json")]
    assert sorted(s["gpu"] for s in statuses) == sorted(r["gpu"] for r in ran)


def test_bad_flags_end_with_one_line_errors(tmp_path):
    result = bash("run_experiments.sh", "--ranks", "4 x", "--output_dir", str(tmp_path / "s"))
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == (
        "error: --ranks value 'x': must be a positive integer")
    result = bash("run_experiments.sh", "--output_dir", str(tmp_path / "s"), "--", "--lora_rank", "4")
    assert result.returncode == 2 and "--lora_rank is set by the sweep" in result.stderr
    result = bash("run_inference_experiments.sh", "--sweep_dir", str(tmp_path))
    assert result.returncode == 2 and f"error: {tmp_path}: no finished runs" in result.stderr
    result = bash("run_checkpoint_inference.sh", "--run_dir", str(tmp_path / "nowhere"))
    assert result.returncode == 2 and "nowhere: folder not found" in result.stderr


# ----------------------------------------------------------------------------- pictures


def test_grid_places_each_run_at_its_rank_and_alpha(sweep_inference):
    report = sweep_inference / "report"
    layout = json.loads((report / "exp_result.json").read_text())
    assert layout["ranks"] == [2, 4] and layout["alphas"] == [2.0, 8.0] and layout["prompt"] == PROMPTS[0]
    grid = pixels(report / "exp_result.png")
    positions = {}
    for cell in layout["cells"]:
        tile = pixels(Path(cell["image"]))
        assert tile.shape[:2] == (IMAGE_SIZE, IMAGE_SIZE)
        positions[(cell["rank"], cell["alpha"])] = find_tile(grid, tile)
    assert len(set(positions.values())) == 4, "four distinct cells"
    for rank in (2, 4):
        assert positions[(rank, 2.0)][0] == positions[(rank, 8.0)][0]  # one row per rank
        assert positions[(rank, 2.0)][1] < positions[(rank, 8.0)][1]
    for alpha in (2.0, 8.0):
        assert positions[(2, alpha)][1] == positions[(4, alpha)][1]  # one column per alpha
        assert positions[(2, alpha)][0] < positions[(4, alpha)][0]
    left = min(x for _, x in positions.values())
    right = max(x for _, x in positions.values()) + IMAGE_SIZE
    top = min(y for y, _ in positions.values())
    # Labels: ink left of each row (rank) and above each column (alpha), only white outside the cells.
    for y, _ in {p for p in positions.values() if p[1] == left}:
        assert (grid[y:y + IMAGE_SIZE, :left - 2] < 128).any(), "row label missing"
    for _, x in {p for p in positions.values() if p[0] == top}:
        assert (grid[top - 20:top - 2, x:x + IMAGE_SIZE] < 128).any(), "column label missing"
    assert (grid[top:, right + 1:] == 255).all()
    assert grid.shape[1] == right + 4  # the grid's right margin


def test_one_pipeline_for_all_runs_gives_the_images_of_separate_calls(sweep_inference, tiny_model_dir, tmp_path):
    """The last run's images, made after three other LoRAs were loaded and deleted, match a fresh CLI call."""
    folders = sorted(p for p in sweep_inference.iterdir() if re.fullmatch(r"r\d+_a.*", p.name))
    assert [p.name for p in folders] == ["r2_a2_lr0.01", "r2_a8_lr0.01", "r4_a2_lr0.01", "r4_a8_lr0.01"]
    metas = [json.loads(next(folder.glob("metadata_prompt1_*.json")).read_text()) for folder in folders]
    assert all(m["seeds"] == [44, 45] and m["prompt"] == PROMPTS[1] for m in metas)
    first_base = [pixels(folders[0] / name) for name in metas[0]["base_images"]]
    for folder, meta in zip(folders[1:], metas[1:]):  # base images made once, reused bit for bit
        assert all(np.array_equal(a, pixels(folder / n)) for a, n in zip(first_base, meta["base_images"]))
    result = subprocess.run(
        [sys.executable, str(ROOT / "inference_sdxl_ghibli.py"), "--pretrained_model_name_or_path", str(tiny_model_dir),
         "--lora_model_path", metas[-1]["lora_model_path"], "--output_dir", str(tmp_path), *INFERENCE_FLAGS],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    alone = json.loads(next(tmp_path.glob("metadata_prompt1_*.json")).read_text())
    for mine, theirs in zip(metas[-1]["lora_images"], alone["lora_images"]):
        assert np.array_equal(pixels(folders[-1] / mine), pixels(tmp_path / theirs))
    assert not np.array_equal(pixels(folders[-1] / metas[-1]["lora_images"][0]), first_base[0])


def test_epoch_strip_shows_base_then_checkpoints_in_order(sweep, sweep_inference, tiny_model_dir):
    run_folder = sweep["dir"] / f"r{RANKS[0]}_a{ALPHAS[1]}_lr{LR}"
    out = sweep["work"] / "checkpoints"
    result = bash("run_checkpoint_inference.sh", "--run_dir", str(run_folder), "--output_dir", str(out), "--",
                  "--pretrained_model_name_or_path", str(tiny_model_dir), *INFERENCE_FLAGS)
    assert result.returncode == 0, result.stderr[-4000:]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["epoch_1", "epoch_2"]
    layout = json.loads((out / "epoch_strip.json").read_text())
    assert layout["columns"] == ["base", "epoch 1", "epoch 2"] and layout["prompts"] == PROMPTS
    metas = {name: json.loads(next((out / name).glob("metadata_prompt0_*.json")).read_text())
             for name in ("epoch_1", "epoch_2")}
    # Same seeds, and the base images were made once and reused: identical pixels in both folders.
    assert metas["epoch_1"]["seeds"] == metas["epoch_2"]["seeds"] == [42, 43]
    assert np.array_equal(pixels(out / "epoch_1" / metas["epoch_1"]["base_images"][0]),
                          pixels(out / "epoch_2" / metas["epoch_2"]["base_images"][0]))
    strip = pixels(out / "epoch_strip.png")
    xs = [find_tile(strip, pixels(out / "epoch_1" / metas["epoch_1"]["base_images"][0]))[1],
          find_tile(strip, pixels(out / "epoch_1" / metas["epoch_1"]["lora_images"][0]))[1],
          find_tile(strip, pixels(out / "epoch_2" / metas["epoch_2"]["lora_images"][0]))[1]]
    assert xs == sorted(xs) and len(set(xs)) == 3


def test_checkpoints_are_listed_in_epoch_order(tmp_path):
    from utils.sweep_report import epoch_checkpoints

    for epoch in (10, 2, 1):
        folder = tmp_path / f"checkpoint_epoch_{epoch}"
        folder.mkdir()
        (folder / WEIGHTS).write_bytes(b"")
    (tmp_path / "checkpoint_epoch_3").mkdir()  # no weights: an unfinished save is left out
    (tmp_path / "final_model").mkdir()
    (tmp_path / "final_model" / WEIGHTS).write_bytes(b"")
    assert [label for label, _ in epoch_checkpoints(tmp_path)] == ["epoch_1", "epoch_2", "epoch_10"]
    assert [label for label, _ in epoch_checkpoints(tmp_path, include_final=True)][-1] == "final"


# ----------------------------------------------------------------------------- metrics and the verdict


def test_tiny_clip_metrics_respond_to_the_images(tiny_clip_dir):
    from utils.style_metrics import ClipEmbedder, centroid, clip_scores, diversity, score_image_set

    embedder = ClipEmbedder(str(tiny_clip_dir), device="cpu")
    rng = np.random.default_rng(0)
    noise = [Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)) for _ in range(3)]
    flat = [Image.new("RGB", (48, 48), colour) for colour in ("red", "green", "blue")]
    noise_embeddings, flat_embeddings = embedder.images(noise), embedder.images(flat)
    text = embedder.texts(["a house in ghibli style"])[0]
    cosines = (flat_embeddings @ text).numpy()
    assert len(set(np.round(cosines, 6))) == 3, "prompt alignment must differ between different images"
    assert np.allclose(clip_scores(text, flat_embeddings).numpy(), 100 * np.maximum(cosines, 0), atol=1e-4)
    assert diversity(embedder.images([flat[0]] * 3)) == pytest.approx(0.0, abs=1e-5)
    assert diversity(flat_embeddings) > 1e-4
    target = centroid(noise_embeddings)
    on_noise = score_image_set(embedder, ["noise"], [noise], target)
    on_flat = score_image_set(embedder, ["noise"], [flat], target)
    assert on_noise.style != pytest.approx(on_flat.style) and on_noise.diversity != pytest.approx(on_flat.diversity)
    assert on_noise.style > on_flat.style  # images are closer to their own centroid


def test_verdict_follows_the_stated_rule():
    from utils.sweep_report import choose_best

    def row(name, gain, change):
        return {"run": name, "style_gain": gain, "alignment_change": change, "alignment": 30 + change}

    rows = [row("a", 0.09, -3.0), row("b", 0.05, -1.0), row("c", 0.02, 0.5)]
    best, reason = choose_best(rows, tolerance=2.0)
    assert best["run"] == "b" and "b has the highest style gain" in reason
    assert [r["within_tolerance"] for r in rows] == [False, True, True] and [r["best"] for r in rows] == [0, 1, 0]
    best, reason = choose_best([row("a", 0.09, -3.0), row("b", 0.05, -2.5)], tolerance=2.0)
    assert best["run"] == "b" and "loses the least" in reason
    assert choose_best(rows, tolerance=5.0)[0]["run"] == "a"


def test_metrics_table_heatmaps_and_verdict_agree_with_the_csv(sweep_inference):
    from matplotlib import colormaps

    from utils.sweep_report import HEATMAP_AXES, HEATMAP_CMAP, HEATMAP_DPI, HEATMAP_FIGSIZE, METRICS

    report = sweep_inference / "report"
    with open(report / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted((int(r["rank"]), float(r["alpha"])) for r in rows) == [(2, 2.0), (2, 8.0), (4, 2.0), (4, 8.0)]
    for column in ("alignment", "style_similarity", "diversity"):
        assert len({r[column] for r in rows}) > 1, f"{column} is constant across runs"
    for r in rows:
        assert 0 < float(r["alignment_change_se"]) < 100
        assert float(r["style_gain"]) == pytest.approx(float(r["style_similarity"]) - float(r["style_similarity_base"]),
                                                       abs=1e-6)
    verdict = json.loads((report / "verdict.json").read_text())
    eligible = [r for r in rows if float(r["alignment_change"]) >= -verdict["alignment_tolerance"]]
    if eligible:
        expected = max(eligible, key=lambda r: (float(r["style_gain"]), float(r["alignment"])))
    else:
        expected = max(rows, key=lambda r: float(r["alignment"]))
    assert verdict["best_run"] == expected["run"]
    assert [r["run"] for r in rows if r["best"] == "yes"] == [expected["run"]]

    markdown = (report / "metrics.md").read_text()
    assert f"Best trade-off: {expected['run']}" in markdown and "Rule:" in markdown
    table = {cells[0].strip("*★ "): cells for cells in
             ([c.strip() for c in line.strip("|").split("|")] for line in markdown.splitlines()
              if line.startswith("| ") and "---" not in line)}
    for r in rows:
        cells = table[r["run"]]
        for index, column, digits in ((3, "alignment", 2), (5, "style_similarity", 4), (6, "style_gain", 4),
                                      (7, "diversity", 4)):
            assert float(cells[index]) == pytest.approx(float(r[column]), abs=0.51 * 10 ** -digits)

    width, height = (int(v * HEATMAP_DPI) for v in HEATMAP_FIGSIZE)
    left, bottom, axes_w, axes_h = HEATMAP_AXES
    for column, stem, _, _ in METRICS:
        image = pixels(report / f"heatmap_{stem}.png")[..., :3]
        assert image.shape[:2] == (height, width)
        values = {(int(r["rank"]), float(r["alpha"])): float(r[column]) for r in rows}
        low, high = min(values.values()), max(values.values())
        for (rank, alpha), value in values.items():
            i, j = [2, 4].index(rank), [2.0, 8.0].index(alpha)
            x = int((left + axes_w * (j + 0.15) / 2) * width)
            y = int((1 - bottom - axes_h) * height + axes_h * height * (i + 0.15) / 2)
            expected_rgb = np.array(colormaps[HEATMAP_CMAP]((value - low) / (high - low))[:3]) * 255
            assert np.abs(image[y, x] - expected_rgb).max() <= 3, f"{stem} cell r{rank} a{alpha}"
    assert re.search(r"\| base model \| \| \| [\d.]+ \|", markdown)
