"""A new user's first hour: the usual mistakes end in one line that names the cause (exit status 2, no
traceback, nothing created), before anything is loaded; and the README's inference command, after a training
on the tiny model, compares with the base model that LoRA was trained on, offline."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.helpers import ROOT, run_bash, run_in_process, run_script

OFFLINE = {"HF_HUB_OFFLINE": "1"}


def single_line(result, *needles: str) -> str:
    """The one error line of a refused command; the output is a few lines at most and has no traceback."""
    output = (result.stdout + result.stderr).strip().splitlines()
    assert result.returncode == 2, "\n".join(output[-30:])
    assert "Traceback" not in result.stderr and len(output) <= 3, "\n".join(output)
    (line,) = [text for text in output if "error" in text.lower()]
    for needle in needles:
        assert needle in line, line
    return line


def nothing_in(folder: Path) -> bool:
    return not folder.exists() or not any(folder.iterdir())


# ----------------------------------------------------------------------------- flags: no abbreviations, a hint


@pytest.mark.parametrize("script, flags, meant", [
    ("train_sdxl_lora.py", ["--lora_ran", "4"], "--lora_rank"),
    ("train_sdxl_lora.py", ["--num_train_epoch", "1"], "--num_train_epochs"),  # once taken as an abbreviation
    ("inference_sdxl_ghibli.py", ["--num_inference_step", "3"], "--num_inference_steps"),
    ("hf/hf_inference.py", ["--prompt", "x", "--guidance_scal", "3"], "--guidance_scale"),
    ("utils/convert_lora.py", ["x.safetensors", "--ouptut", "y"], "--output"),
])
def test_an_unknown_or_shortened_flag_is_one_line_with_the_closest_flag(script, flags, meant, tmp_path):
    result = run_in_process(script, *flags, check=False, cwd=tmp_path)
    single_line(result, flags[-2], f"did you mean {meant}?")
    assert nothing_in(tmp_path)


# ----------------------------------------------------------------------------- model and LoRA paths, up front


def test_a_mistyped_model_path_with_a_slash_is_one_line_and_no_run_folder(tiny_dataset_dir, tmp_path):
    runs = tmp_path / "runs"
    result = run_script(str(ROOT / "train_sdxl_lora.py"), "--pretrained_model_name_or_path", "models/nothere",
                        "--dataset_dir", str(tiny_dataset_dir), "--output_dir", str(runs), env=OFFLINE, check=False,
                        cwd=tmp_path, timeout=120)
    single_line(result, "--pretrained_model_name_or_path models/nothere", "no such folder",
                "not a Hub id that can be fetched here (offline")
    assert not runs.exists()


def test_the_sweep_flag_check_refuses_a_mistyped_model_path_before_any_run(tiny_dataset_dir, tmp_path):
    runs = tmp_path / "runs"
    result = run_bash("run_experiments.sh", "--ranks", "4", "--alphas", "4", "--output_dir", str(runs),
                      "--results_dir", str(tmp_path / "results"), "--", "--dataset_dir", str(tiny_dataset_dir),
                      "--pretrained_model_name_or_path", "models/nothere", env=OFFLINE, cwd=tmp_path, timeout=120)
    single_line(result, "--pretrained_model_name_or_path models/nothere", "offline")
    assert nothing_in(runs) and nothing_in(tmp_path / "results")


@pytest.mark.parametrize("flags, named", [
    (["--lora_model_path", "nope/final_model"], "--lora_model_path nope/final_model"),
    (["--pretrained_model_name_or_path", "models/nothere", "--run_base_inference"],
     "--pretrained_model_name_or_path models/nothere"),
])
def test_inference_refuses_a_path_that_is_not_there_before_loading(flags, named, tmp_path):
    result = run_in_process("inference_sdxl_ghibli.py", "--prompt", "x", *flags, env=OFFLINE, check=False,
                            cwd=tmp_path)
    single_line(result, named, "not a Hub id that can be fetched here")
    assert nothing_in(tmp_path)


def test_hf_inference_refuses_a_local_path_that_is_not_there(tmp_path):
    result = run_in_process("hf/hf_inference.py", "--prompt", "x", "--base_model_id", "models/nothere",
                            "--output", str(tmp_path / "x.png"), env=OFFLINE, check=False, cwd=tmp_path)
    single_line(result, "--base_model_id models/nothere", "offline")
    assert nothing_in(tmp_path)


def test_the_resolver_takes_local_paths_cached_ids_and_nothing_else_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from utils.core.model_source import ModelSourceError, resolve_model_source

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    assert resolve_model_source(str(tmp_path), "--x") == str(tmp_path)
    with pytest.raises(ModelSourceError, match="--x org/model: no such folder, and not a Hub id that can be fetched"):
        resolve_model_source("org/model", "--x")
    (tmp_path / "cache" / "models--org--model" / "snapshots" / "abc").mkdir(parents=True)
    assert resolve_model_source("org/model", "--x") == "org/model"  # in the cache: loads offline
    with pytest.raises(ModelSourceError, match="not a Hub id \\(namespace/name\\)"):
        resolve_model_source("a/b/c", "--x")


# ----------------------------------------------------------------------------- sizes and steps, before loading


@pytest.mark.parametrize("script, flags, named", [
    ("inference_sdxl_ghibli.py", ["--height", "60"], "--height 60"),
    ("inference_sdxl_ghibli.py", ["--width", "1020"], "--width 1020"),
    ("inference_sdxl_ghibli.py", ["--num_inference_steps", "0"], "--num_inference_steps 0"),
    ("inference_sdxl_ghibli.py", ["--num_images", "0"], "--num_images 0"),
    ("hf/hf_inference.py", ["--prompt", "x", "--height", "60"], "--height 60"),
    ("hf/hf_inference.py", ["--prompt", "x", "--num_inference_steps", "0"], "--num_inference_steps"),
])
def test_sizes_and_steps_are_checked_before_loading(script, flags, named, tmp_path):
    result = run_in_process(script, *flags, env=OFFLINE, check=False, cwd=tmp_path)
    single_line(result, named)
    assert nothing_in(tmp_path)


def test_hf_inference_takes_the_other_scripts_flag_names():
    from hf.hf_inference import parse_args

    given = parse_args(["--prompt", "x", "--num_inference_steps", "7", "--guidance_scale", "3.5"])
    original = parse_args(["--prompt", "x", "--steps", "7", "--guidance", "3.5"])
    assert (given.steps, given.guidance) == (original.steps, original.guidance) == (7, 3.5)


# ----------------------------------------------------------------------------- the README's command, offline


def test_the_readme_inference_command_uses_the_base_model_the_lora_was_trained_on(trained_run, tiny_model_dir,
                                                                                   tmp_path):
    """After a training, the README's command (with small sizes) finds the newest run's LoRA in output_ghibli/,
    loads the tiny base model it was trained on -- not the Hub default -- and makes the comparison offline."""
    (tmp_path / "output_ghibli").mkdir()
    os.symlink(trained_run, tmp_path / "output_ghibli" / trained_run.name)
    small = ["--height", "64", "--width", "64", "--num_inference_steps", "2", "--num_images", "1"]
    result = run_in_process("inference_sdxl_ghibli.py", "--prompt", "a quiet seaside town in ghibli style",
                            "--run_base_inference", "--create_comparison_grid", *small, env=OFFLINE, cwd=tmp_path)
    assert f"Base model {tiny_model_dir}: the one the LoRA was trained on" in result.stderr
    out = tmp_path / "output_visualization"
    (meta_path,) = out.glob("metadata_prompt1_*.json")
    meta = json.loads(meta_path.read_text())
    assert meta["base_model"] == str(tiny_model_dir) and (out / meta["comparison_grid"]).is_file()

    # A run folder as --lora_model_path: its final_model/, or best_model/ when asked; an explicit base wins.
    best = run_in_process("inference_sdxl_ghibli.py", "--lora_model_path", str(trained_run), "--use_best_model",
                          "--pretrained_model_name_or_path", str(tiny_model_dir), "--prompt", "x", *small,
                          "--output_dir", str(tmp_path / "best"), env=OFFLINE, cwd=tmp_path)
    assert f"Base model {tiny_model_dir} (--pretrained_model_name_or_path)" in best.stderr
    (meta_path,) = (tmp_path / "best").glob("metadata_prompt1_*.json")
    assert json.loads(meta_path.read_text())["lora_model_path"] == str(trained_run / "best_model")


def test_the_base_model_falls_back_to_the_original_default_when_nothing_is_recorded(tmp_path):
    from utils.core.names import SDXL_BASE_ID
    from utils.inference.sources import base_model_for

    lora = tmp_path / "lora"
    lora.mkdir()
    assert base_model_for(None, str(lora)) == SDXL_BASE_ID
    assert base_model_for(None, None) == SDXL_BASE_ID
    assert base_model_for("my/base", str(lora)) == "my/base"


# ----------------------------------------------------------------------------- one policy for bad dataset entries


def _policy_table() -> dict[str, tuple[str, str]]:
    """docs/datasets.md's table of bad entries: problem -> (what the default does, what --bad_image_policy fail
    does)."""
    text = (ROOT / "docs" / "datasets.md").read_text(encoding="utf-8")
    section = text.split("### Bad entries", 1)[1].split("\n#", 1)[0]
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in section.splitlines()
            if line.startswith("| ") and not line.startswith("| problem")]
    return {problem: (default, fail) for problem, default, fail in rows}


def _dataset_with(problem: str, folder: Path) -> Path:
    """A ghibli-layout dataset of two good images and the bad entry the docs name."""
    from PIL import Image

    images = folder / "images"
    images.mkdir(parents=True)
    captions = {}
    good = 0 if problem == "no usable image at all" else 2
    for i in range(good):
        Image.new("RGB", (64, 64), (40 * i, 90, 160)).save(images / f"good{i}.png")
        captions[f"good{i}.png"] = "a village in ghibli style"
    if problem in ("image without caption", "no usable image at all"):
        Image.new("RGB", (64, 64), "white").save(images / "uncaptioned.png")
    elif problem == "caption without image":
        captions["gone.png"] = "a lost picture"
    elif problem == "empty caption":
        Image.new("RGB", (64, 64), "white").save(images / "blank.png")
        captions["blank.png"] = "  "
    elif problem == "truncated or unreadable image":
        Image.new("RGB", (64, 64), "white").save(images / "cut.png")
        (images / "cut.png").write_bytes((images / "cut.png").read_bytes()[:60])
        captions["cut.png"] = "a cut picture"
    elif problem == "image smaller than `--min_image_size`":
        Image.new("RGB", (16, 16), "white").save(images / "tiny.png")
        captions["tiny.png"] = "a tiny picture"
    elif problem == "dataset folder not found":
        return folder / "absent"
    else:
        raise AssertionError(f"docs/datasets.md names a problem this test cannot make: {problem}")
    (folder / "captions.json").write_text(json.dumps(captions))
    return folder


def test_the_documented_bad_entry_policy_is_what_training_does(tmp_path):
    from utils.data.listing import load_training_examples
    from utils.data.records import DatasetError
    from utils.training.flags import parse_training_args

    table = _policy_table()
    assert len(table) >= 7 and all(set(outcome) <= {"skipped with a warning", "stops"} for outcome in table.values())
    for n, (problem, outcomes) in enumerate(table.items()):
        dataset = _dataset_with(problem, tmp_path / f"d{n}")
        for policy, documented in zip(("skip", "fail"), outcomes):
            args = parse_training_args(["--dataset_dir", str(dataset), "--bad_image_policy", policy])
            try:
                examples, _ = load_training_examples(args, report_here=False)
                did = "skipped with a warning"
                assert len(examples) == 2, (problem, policy)
            except DatasetError as error:
                did = "stops"
                assert "\n" not in str(error), error
            assert did == documented, f"{problem} with --bad_image_policy {policy}: docs say {documented}, it {did}"


# ----------------------------------------------------------------------------- the report's CLIP model, offline


def test_the_default_clip_model_fails_at_once_when_the_hub_cannot_be_reached(tmp_path, monkeypatch):
    """No HF_HUB_OFFLINE, but the Hub's port is closed: one quick connection attempt, not a minute of retries."""
    import time

    from huggingface_hub import constants

    from tests.helpers import free_port
    from utils.core import model_source
    from utils.sweep.clip_metrics import DEFAULT_CLIP_MODEL, ClipEmbedder

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    model_source._can_connect.cache_clear()
    start = time.monotonic()
    with pytest.raises(OSError, match="cannot be reached from here"):
        ClipEmbedder(DEFAULT_CLIP_MODEL, device="cpu")
    assert time.monotonic() - start < 5
    model_source._can_connect.cache_clear()


# ----------------------------------------------------------------------------- a single-file checkpoint, offline


@pytest.fixture(scope="module")
def single_file_model(tmp_path_factory) -> tuple[Path, Path]:
    """(a diffusers folder, the same tiny SDXL as one .safetensors checkpoint in the original key names)."""
    from utils.tiny.single_file import save_tiny_single_file_sdxl

    folder = tmp_path_factory.mktemp("single_file")
    return save_tiny_single_file_sdxl(folder / "tiny_sdxl_config", folder / "tiny_sdxl.safetensors")


def test_a_single_file_checkpoint_offline_without_model_config_is_one_line_naming_the_flag(single_file_model,
                                                                                          tiny_dataset_dir, tmp_path):
    _, checkpoint = single_file_model
    runs = tmp_path / "runs"
    result = run_in_process("train_sdxl_lora.py", "--pretrained_model_name_or_path", str(checkpoint),
                            "--dataset_dir", str(tiny_dataset_dir), "--output_dir", str(runs), env=OFFLINE,
                            check=False, cwd=tmp_path)
    single_line(result, str(checkpoint), "single-file checkpoint", "--model_config")
    assert not runs.exists()
    inference = run_in_process("inference_sdxl_ghibli.py", "--pretrained_model_name_or_path", str(checkpoint),
                               "--run_base_inference", "--prompt", "x", env=OFFLINE, check=False, cwd=tmp_path)
    single_line(inference, "--model_config")


@pytest.mark.slow
def test_a_single_file_checkpoint_trains_and_compares_offline_with_model_config(single_file_model,
                                                                                tiny_dataset_dir, tmp_path):
    """Training on the .safetensors checkpoint with --model_config, then the comparison from the run folder
    alone: the run records both, so inference finds the checkpoint and its configs without flags."""
    config, checkpoint = single_file_model
    runs = tmp_path / "runs"
    run_in_process("train_sdxl_lora.py", "--pretrained_model_name_or_path", str(checkpoint),
                   "--model_config", str(config), "--dataset_dir", str(tiny_dataset_dir), "--output_dir", str(runs),
                   "--resolution", "32", "--max_train_steps", "2", "--lr_warmup_steps", "0", "--report_to", "none",
                   "--mixed_precision", "no", "--eval_loss_epochs", "0", env=OFFLINE, cwd=tmp_path)
    (run,) = runs.iterdir()
    out = tmp_path / "images"
    result = run_in_process("inference_sdxl_ghibli.py", "--lora_model_path", str(run), "--prompt", "x",
                            "--run_base_inference", "--create_comparison_grid", "--height", "64", "--width", "64",
                            "--num_inference_steps", "2", "--num_images", "1", "--output_dir", str(out),
                            env=OFFLINE, cwd=tmp_path)
    assert f"Base model {checkpoint}: the one the LoRA was trained on" in result.stderr
    assert len(list(out.glob("comparison_grid_prompt1_*.png"))) == 1


def test_the_single_file_writer_inverts_the_diffusers_conversion(single_file_model):
    """Every weight of the diffusers folder comes back, equal, from the single file through diffusers' own
    conversion."""
    from diffusers import StableDiffusionXLPipeline

    config, checkpoint = single_file_model
    folder = StableDiffusionXLPipeline.from_pretrained(str(config))
    single = StableDiffusionXLPipeline.from_single_file(str(checkpoint), config=str(config), local_files_only=True)
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        expected, got = getattr(folder, part).state_dict(), getattr(single, part).state_dict()
        assert set(expected) == set(got), part
        assert all(torch_equal(expected[key], got[key]) for key in expected), part


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a.float(), b.float()))


# ----------------------------------------------------------------------------- .gitignore


def test_gitignore_covers_what_the_documented_commands_write():
    """Every output the README and the guides name (--output_dir, --output, --model_dir), and the commands'
    default output folders and files, are ignored by git."""
    import re
    import subprocess

    docs = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    named = {match for path in docs
             for match in re.findall(r"--(?:output_dir|output|model_dir)[ =]([A-Za-z][\w./-]*)", path.read_text())}
    defaults = {"output_ghibli", "output_visualization", "output_visualization_additional_2", "experiment_results",
                "output.png", "tiny_sdxl", "tiny_clip", "ghibli_2_captions.json", "dataset_ghibli"}
    outputs = sorted(named | defaults)
    assert "tiny_output" in outputs and len(outputs) > 12
    missed = [name for name in outputs
              if subprocess.run(["git", "check-ignore", "--no-index", "-q", name.rstrip("/") + "/any"],
                                cwd=ROOT).returncode != 0]
    assert not missed, f"not in .gitignore: {missed}"
