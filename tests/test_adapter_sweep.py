"""A rank sweep of LoKr adapters: run_experiments.sh passes --lora_type after `--`, both runs finish, and the
sweep's records (summary.json, experiment_{R}_{A}.json) and its report (metrics.csv, metrics.md) name the type."""

from __future__ import annotations

import json

import pytest

from tests.helpers import csv_rows, read_json, run_bash
from utils.lora.files import read_metadata
from utils.lora.kohya_names import KOHYA_WEIGHT_NAME

pytestmark = pytest.mark.slow

RANKS = ("2", "4")
TRAIN = ["--lora_type", "lokr", "--resolution", "32", "--train_batch_size", "2", "--num_train_epochs", "1",
         "--save_steps", "100", "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--report_to", "none",
         "--mixed_precision", "no", "--no-gradient_checkpointing"]
INFERENCE = ["--prompts", "a village in ghibli style", "--num_images", "2", "--height", "32", "--width", "32",
             "--num_inference_steps", "2"]


def test_lokr_rank_sweep_finishes_and_its_report_lists_the_type(tiny_model_dir, tiny_clip_dir, tmp_path):
    from utils.tiny.sdxl import make_synthetic_dataset

    dataset = make_synthetic_dataset(tmp_path / "data", num_images=4)
    sweep = run_bash("run_experiments.sh", "--ranks", " ".join(RANKS), "--alphas", "4", "--",
                     "--pretrained_model_name_or_path", str(tiny_model_dir), "--dataset_dir", str(dataset), *TRAIN,
                     cwd=tmp_path)
    assert sweep.returncode == 0, sweep.stdout[-2000:] + sweep.stderr[-4000:]

    results = tmp_path / "experiment_results"
    summary = read_json(results / "summary.json")
    assert summary["complete"] and summary["lora_types"] == ["lokr"]
    assert [(run["rank"], run["state"], run["lora_type"]) for run in summary["runs"]] == [
        (int(rank), "finished", "lokr") for rank in RANKS]
    for rank, run in zip(RANKS, summary["runs"]):
        assert read_json(results / f"experiment_{rank}_4.json")["lora_type"] == "lokr"
        header = read_metadata(f"{run['run_dir']}/final_model/{KOHYA_WEIGHT_NAME}")
        assert json.loads(header["ss_network_args"])["algo"] == "lokr" and header["ss_network_dim"] == rank

    report = run_bash("run_inference_experiments.sh", "--clip_model", str(tiny_clip_dir), "--",
                      "--pretrained_model_name_or_path", str(tiny_model_dir), *INFERENCE, cwd=tmp_path,
                      env={"HF_HUB_OFFLINE": "1"})
    assert report.returncode == 0, report.stdout[-2000:] + report.stderr[-4000:]
    folder = tmp_path / "output_visualization_additional_2" / "report"
    rows = csv_rows(folder / "metrics.csv")
    assert sorted((row["rank"], row["lora_type"]) for row in rows) == [(rank, "lokr") for rank in RANKS]
    table = [[cell.strip() for cell in line.strip("|").split("|")] for line in
             (folder / "metrics.md").read_text().splitlines() if line.startswith(("| r2", "| r4", "| **r"))]
    assert sorted((cells[1], cells[-1]) for cells in table) == [(rank, "lokr") for rank in RANKS]
