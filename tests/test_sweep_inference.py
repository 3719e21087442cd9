"""run_inference_experiments.sh and run_checkpoint_inference.sh over the shared sweep's runs: the original's
folders, the rank x alpha grid, one pipeline for all LoRAs, the epoch strip, the original's prompts, and
the sweep's ``generate`` honouring --allow_pickle."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.conftest import SWEEP_IMAGE_SIZE, SWEEP_INFERENCE_FLAGS, SWEEP_PROMPTS
from tests.helpers import ROOT, SCRIPT_ENV, find_tile, pixels, read_json, run_bash, run_folders, run_in_process
from utils.core.names import LORA_WEIGHT_NAME

def test_inference_experiments_write_the_originals_folders(sweep, sweep_inference):
    runs = run_folders(sweep["work"])
    files = sweep["inference_plain_files"]
    for run in runs:
        names = [f.split("/", 1)[1] for f in files if f.startswith(run.name + "/")]
        for kind in ("base", "lora"):
            assert len([n for n in names if re.fullmatch(rf"{kind}_prompt[12]_\d{{8}}_\d{{6}}_[12]\.png", n)]) == 4
        assert len([n for n in names if re.fullmatch(r"comparison_grid_prompt[12]_\d{8}_\d{6}\.png", n)]) == 2
        assert len([n for n in names if re.fullmatch(r"metadata_prompt[12]_\d{8}_\d{6}\.json", n)]) == 2
    assert {f.split("/")[0] for f in files} == {r.name for r in runs} | {"base_model_results", "report"}
    assert {"report/exp_result.png", "report/loss_curves.png"} <= set(files)
    # Offline, the default CLIP model cannot load: one warning, the pictures are still made.
    assert "No CLIP metrics" in sweep["inference_plain"].stderr
    assert sweep["inference_metrics"].stderr.count("Skipping") == 4


def test_grid_places_each_run_at_its_rank_and_alpha(sweep_inference):
    report = sweep_inference / "report"
    layout = json.loads((report / "exp_result.json").read_text())
    assert layout["ranks"] == [2, 4] and layout["alphas"] == [4.0, 8.0] and layout["prompt"] == SWEEP_PROMPTS[0]
    grid = pixels(report / "exp_result.png")
    positions = {}
    for cell in layout["cells"]:
        tile = pixels(Path(cell["image"]))
        assert tile.shape[:2] == (SWEEP_IMAGE_SIZE, SWEEP_IMAGE_SIZE)
        positions[(cell["rank"], cell["alpha"])] = find_tile(grid, tile)
    assert len(set(positions.values())) == 4, "four distinct cells"
    for rank in (2, 4):
        assert positions[(rank, 4.0)][0] == positions[(rank, 8.0)][0]  # one row per rank
        assert positions[(rank, 4.0)][1] < positions[(rank, 8.0)][1]
    for alpha in (4.0, 8.0):
        assert positions[(2, alpha)][1] == positions[(4, alpha)][1]  # one column per alpha
        assert positions[(2, alpha)][0] < positions[(4, alpha)][0]
    left = min(x for _, x in positions.values())
    right = max(x for _, x in positions.values()) + SWEEP_IMAGE_SIZE
    top = min(y for y, _ in positions.values())
    # Labels: ink left of each row (rank) and above each column (alpha), only white outside the cells.
    for y, _ in {p for p in positions.values() if p[1] == left}:
        assert (grid[y:y + SWEEP_IMAGE_SIZE, :left - 2] < 128).any(), "row label missing"
    for _, x in {p for p in positions.values() if p[0] == top}:
        assert (grid[top - 20:top - 2, x:x + SWEEP_IMAGE_SIZE] < 128).any(), "column label missing"
    assert (grid[top:, right + 1:] == 255).all()
    assert grid.shape[1] == right + 4  # the grid's right margin


def test_one_pipeline_for_all_runs_gives_the_images_of_separate_calls(sweep, sweep_inference, tiny_model_dir,
                                                                      tmp_path):
    """The last run's images, made after three other LoRAs were loaded and deleted, match a fresh CLI call."""
    folders = [sweep_inference / run.name for run in run_folders(sweep["work"])]
    metas = [json.loads(next(folder.glob("metadata_prompt2_*.json")).read_text()) for folder in folders]
    assert all(m["seeds"] == [44, 45] and m["prompt"] == SWEEP_PROMPTS[1] and m["prompt_idx"] == 2 for m in metas)
    base_dir = sweep_inference / "base_model_results"
    base_meta = json.loads(next(base_dir.glob("metadata_prompt2_*.json")).read_text())
    first_base = [pixels(base_dir / name) for name in base_meta["base_model_images"]]
    for folder, meta in zip(folders, metas):  # base images made once, reused bit for bit
        assert all(np.array_equal(a, pixels(folder / n)) for a, n in zip(first_base, meta["base_model_images"]))
    result = subprocess.run(
        [sys.executable, str(ROOT / "inference_sdxl_ghibli.py"), "--pretrained_model_name_or_path", str(tiny_model_dir),
         "--lora_model_path", metas[-1]["lora_model_path"], "--output_dir", str(tmp_path), *SWEEP_INFERENCE_FLAGS],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=SCRIPT_ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    alone = json.loads(next(tmp_path.glob("metadata_prompt2_*.json")).read_text())
    for mine, theirs in zip(metas[-1]["lora_model_images"], alone["lora_model_images"]):
        assert np.array_equal(pixels(folders[-1] / mine), pixels(tmp_path / theirs))
    assert not np.array_equal(pixels(folders[-1] / metas[-1]["lora_model_images"][0]), first_base[0])


def test_checkpoint_inference_with_no_flags_writes_the_originals_folders(sweep, sweep_inference, tiny_model_dir):
    work = sweep["work"]
    result = run_bash("run_checkpoint_inference.sh", "--", "--pretrained_model_name_or_path", str(tiny_model_dir),
                  *SWEEP_INFERENCE_FLAGS, cwd=work)
    assert result.returncode == 0, result.stderr[-4000:]
    newest = max(run_folders(work), key=lambda run: max(
        (p / LORA_WEIGHT_NAME).stat().st_mtime for p in run.glob("checkpoint_epoch_*")))
    out = work / "output_visualization" / f"{newest.name}_checkpoints"
    epochs = sorted(int(p.name.rsplit("_", 1)[1]) for p in newest.glob("checkpoint_epoch_*"))
    assert len(epochs) == 2
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(f"epoch_{n}" for n in epochs)
    base_dir = work / "output_visualization" / "base_model_results"
    assert len(list(base_dir.glob("base_prompt[12]_*_[12].png"))) == 4
    layout = json.loads((out / "epoch_strip.json").read_text())
    assert layout["columns"] == ["base"] + [f"epoch {n}" for n in epochs] and layout["prompts"] == SWEEP_PROMPTS
    names = [f"epoch_{n}" for n in epochs]
    metas = {name: json.loads(next((out / name).glob("metadata_prompt1_*.json")).read_text()) for name in names}
    assert all(m["lora_model_path"].endswith(f"checkpoint_epoch_{name[6:]}") for name, m in metas.items())
    # Same seeds, and the base images were made once and reused: identical pixels in both folders.
    assert metas[names[0]]["seeds"] == metas[names[1]]["seeds"] == [42, 43]
    assert np.array_equal(pixels(out / names[0] / metas[names[0]]["base_model_images"][0]),
                          pixels(out / names[1] / metas[names[1]]["base_model_images"][0]))
    strip = pixels(out / "epoch_strip.png")
    xs = [find_tile(strip, pixels(out / names[0] / metas[names[0]]["base_model_images"][0]))[1],
          find_tile(strip, pixels(out / names[0] / metas[names[0]]["lora_model_images"][0]))[1],
          find_tile(strip, pixels(out / names[1] / metas[names[1]]["lora_model_images"][0]))[1]]
    assert xs == sorted(xs) and len(set(xs)) == 3


def test_the_scripts_default_prompts_are_the_originals():
    """25 prompts in run_checkpoint_inference.sh, 5 in run_inference_experiments.sh (the last 5 of the 25),
    the first 16 the inference script's default. The scripts' driver names its set in PROMPT_SETS."""
    import inspect

    from inference_sdxl_ghibli import DEFAULT_PROMPTS
    from utils.inference.prompts import PROMPT_SETS
    from utils.sweep import inference_driver

    def prompts_of(driver) -> list[str]:
        (which,) = re.findall(r'PROMPT_SETS\["(\w+)"\]', inspect.getsource(driver))
        return PROMPT_SETS[which]

    checkpoint = prompts_of(inference_driver.run_checkpoint_inference)
    experiments = prompts_of(inference_driver.run_inference_experiments)
    assert len(checkpoint) == 25 and checkpoint[:16] == DEFAULT_PROMPTS and checkpoint[-5:] == experiments
    assert checkpoint[16] == "A couple studying in a Japanese cafe in Ghibli style."
    assert experiments[0].startswith("The image is a full shot of Kiki from Kiki's Delivery Service")


def test_sweep_generate_loads_a_pickle_lora_only_with_allow_pickle(trained_run, tiny_model_dir, tmp_path):
    """The flags after -- are the inference script's, --allow_pickle included (the LoRA check, the pipeline
    and the adapter all honour it)."""
    import torch

    from utils.lora.files import read_tensors

    pickled = tmp_path / "pytorch_lora_weights.bin"
    torch.save(read_tensors(trained_run / "final_model" / LORA_WEIGHT_NAME), pickled)
    command = ["-m", "utils.sweep_report", "generate", "--output_dir", str(tmp_path / "out"), "--lora",
               f"pickled={pickled}", "--", "--pretrained_model_name_or_path", str(tiny_model_dir), "--prompts", "a",
               "--num_images", "1", "--height", "64", "--width", "64", "--num_inference_steps", "1"]
    refused = run_in_process(*command, check=False)
    assert refused.returncode == 2 and "pickle" in refused.stderr and "--allow_pickle" in refused.stderr
    assert not (tmp_path / "out" / "pickled").exists()
    run_in_process(*command, "--allow_pickle")
    (meta_path,) = (tmp_path / "out" / "pickled").glob("metadata_prompt1_*.json")
    meta = read_json(meta_path)
    assert meta["lora_model_path"] == str(pickled) and len(meta["lora_model_images"]) == 1


def test_checkpoint_inference_of_all_runs_shares_one_set_of_base_images(sweep, sweep_inference, tiny_model_dir):
    """--all_runs: every saved epoch of every run of the sweep, in {run}_checkpoints/epoch_NNN/ (zero-padded, so
    the folders sort, and where the report looks for a run's epochs), one strip per run, and the base images
    made once for all. Without the sweep's images there is no report to write, and it says so."""
    work = sweep["work"]
    result = run_bash("run_checkpoint_inference.sh", "--all_runs", "--output_dir", "all", "--base_results_dir",
                      "all_base", "--inference_dir", "no_sweep_images", "--", "--pretrained_model_name_or_path",
                      str(tiny_model_dir), *SWEEP_INFERENCE_FLAGS, "--prompts", SWEEP_PROMPTS[0], "--num_images", "1",
                      cwd=work)
    assert result.returncode == 0, result.stderr[-4000:]
    out = work / "all"
    runs = run_folders(work)
    series = {run: out / f"{run.name}_checkpoints" for run in runs}
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(p.name for p in series.values())
    base = None
    for run in runs:
        epochs = sorted(int(p.name.rsplit("_", 1)[1]) for p in run.glob("checkpoint_epoch_*"))
        assert sorted(p.name for p in series[run].iterdir() if p.is_dir()) == [f"epoch_{n:03d}" for n in epochs]
        layout = json.loads((series[run] / "epoch_strip.json").read_text())
        assert layout["columns"] == ["base"] + [f"epoch {n}" for n in epochs]
        meta = json.loads(next((series[run] / f"epoch_{epochs[0]:03d}").glob("metadata_prompt1_*.json")).read_text())
        image = pixels(series[run] / f"epoch_{epochs[0]:03d}" / meta["base_model_images"][0])
        base = image if base is None else base
        assert np.array_equal(image, base)
    assert "No report: no_sweep_images" in result.stderr
    assert result.stderr.count("Base images into") == 1
