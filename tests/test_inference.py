"""inference_sdxl_ghibli.py: the original's file names, metadata and defaults; one pipeline, same seeds,
LoRA scale applied for any value; base images reused from a base-results folder."""

from __future__ import annotations

import json
import os
import re
import shutil
import time

import numpy as np
from PIL import Image

from tests.helpers import ROOT, find_tile, pixels, run_in_process

SCRIPT = str(ROOT / "inference_sdxl_ghibli.py")
COMMON = ["--num_images", "2", "--height", "128", "--width", "128", "--num_inference_steps", "4"]
ORIGINAL_KEYS = ["prompt", "prompt_idx", "negative_prompt", "num_inference_steps", "guidance_scale", "height",
                 "width", "seed", "lora_model_path", "lora_scale", "timestamp", "base_model_images",
                 "lora_model_images", "comparison_grid"]


def infer(tiny_model_dir, out_dir, *extra, cwd=None):
    result = run_in_process(SCRIPT, "--pretrained_model_name_or_path", str(tiny_model_dir),
                        "--output_dir", str(out_dir), *COMMON, *extra, cwd=cwd)
    (meta_path,) = sorted(out_dir.glob("metadata_prompt1_*.json"))[-1:]
    return json.loads(meta_path.read_text()), result


def test_original_file_names_and_metadata_for_two_prompts_and_two_images(trained_run, tiny_model_dir, tmp_path):
    lora = str(trained_run / "final_model")
    out = tmp_path / "out"
    prompts = ["a house in ghibli style", "a boat on a lake"]
    first, _ = infer(tiny_model_dir, out, "--lora_model_path", lora, "--prompts", *prompts,
                     "--run_base_inference", "--create_comparison_grid", cwd=tmp_path)
    ts = first["timestamp"]
    assert re.fullmatch(r"\d{8}_\d{6}", ts)
    expected = {f"{kind}_prompt{k}_{ts}_{i}.png" for kind in ("base", "lora") for k in (1, 2) for i in (1, 2)}
    expected |= {f"comparison_grid_prompt{k}_{ts}.png" for k in (1, 2)} | {f"metadata_prompt{k}_{ts}.json"
                                                                            for k in (1, 2)}
    assert {p.name for p in out.iterdir()} == expected
    for k, prompt in enumerate(prompts, start=1):
        meta = json.loads((out / f"metadata_prompt{k}_{ts}.json").read_text())
        assert list(meta)[:len(ORIGINAL_KEYS)] == ORIGINAL_KEYS
        assert (meta["prompt"], meta["prompt_idx"], meta["seed"], meta["lora_model_path"]) == (prompt, k, 42, lora)
        settings = (meta["height"], meta["width"], meta["num_inference_steps"], meta["guidance_scale"])
        assert settings == (128, 128, 4, 5.0)
        assert meta["negative_prompt"] == "blurry, low quality, distorted, deformed, ugly, bad anatomy"
        assert meta["base_model_images"] == [f"base_prompt{k}_{ts}_1.png", f"base_prompt{k}_{ts}_2.png"]
        assert meta["lora_model_images"] == [f"lora_prompt{k}_{ts}_1.png", f"lora_prompt{k}_{ts}_2.png"]
        assert meta["comparison_grid"] == f"comparison_grid_prompt{k}_{ts}.png"
        assert meta["seeds"] == [42 + 2 * (k - 1), 43 + 2 * (k - 1)] and meta["generator_device"] == "cpu"
    # The grid: base row on top, LoRA row below.
    grid = pixels(out / first["comparison_grid"])
    assert 2 * 128 <= grid.shape[0] < 3 * 128 and 2 * 128 <= grid.shape[1] < 4 * 128
    base1 = pixels(out / first["base_model_images"][0])[..., :3]
    lora1 = pixels(out / first["lora_model_images"][0])[..., :3]
    assert find_tile(grid, base1)[0] < find_tile(grid, lora1)[0], "base row must be above the LoRA row"
    differences = [np.abs(pixels(out / b) - pixels(out / l)).mean()
                   for b, l in zip(first["base_model_images"], first["lora_model_images"])]
    assert min(differences) > 1.0  # scale 1 changes the image

    # Scale 0 reproduces the base image of the same seed (adapter loaded only after the base images).
    zero, _ = infer(tiny_model_dir, tmp_path / "zero", "--lora_model_path", lora, "--lora_scale", "0",
                    "--prompt", prompts[0], "--run_base_inference", cwd=tmp_path)
    assert np.abs(pixels(tmp_path / "zero" / zero["lora_model_images"][0])
                  - pixels(out / first["base_model_images"][0])).max() <= 1
    assert np.array_equal(pixels(tmp_path / "zero" / zero["base_model_images"][1]),
                          pixels(out / first["base_model_images"][1]))


def test_original_style_base_images_without_metadata_are_reused(trained_run, tiny_model_dir, tmp_path):
    """A folder holding only base_prompt1_<ts>_1.png and _2.png (the original's output) gives the grid."""
    saved = tmp_path / "base_model_results"
    saved.mkdir()
    colours = {"base_prompt1_20250101_120000_1.png": (200, 30, 30), "base_prompt1_20250101_120000_2.png": (30, 30, 200),
               "base_prompt10_20250101_120000_1.png": (0, 255, 0)}  # another prompt's: not taken for prompt 1
    for name, colour in colours.items():
        Image.new("RGB", (128, 128), colour).save(saved / name)
    meta, result = infer(tiny_model_dir, tmp_path / "out", "--lora_model_path", str(trained_run / "final_model"),
                         "--prompt", "a cat in ghibli style", "--base_results_dir", str(saved),
                         "--create_comparison_grid", cwd=tmp_path)
    out = tmp_path / "out"
    assert [tuple(pixels(out / name)[0, 0, :3]) for name in meta["base_model_images"]] == [(200, 30, 30), (30, 30, 200)]
    grid = pixels(out / meta["comparison_grid"])
    assert find_tile(grid, pixels(out / meta["base_model_images"][0]))[0] < find_tile(
        grid, pixels(out / meta["lora_model_images"][0])[..., :3])[0]
    assert "No saved base images" not in result.stderr


def test_base_images_with_metadata_are_reused_and_missing_ones_said_in_one_line(trained_run, tiny_model_dir, tmp_path):
    # No --lora_model_path and no output_ghibli/ here: base images only, said in one line.
    first, result = infer(tiny_model_dir, tmp_path / "base", "--run_base_inference",
                          "--prompt", "a cat in ghibli style", cwd=tmp_path)
    assert len(first["base_model_images"]) == 2 and first["lora_model_images"] == []
    assert "base images only" in result.stderr
    second, result = infer(tiny_model_dir, tmp_path / "lora", "--lora_model_path", str(trained_run / "final_model"),
                           "--prompt", "a cat in ghibli style", "--base_results_dir", str(tmp_path / "base"),
                           "--create_comparison_grid", cwd=tmp_path)
    for a, b in zip(first["base_model_images"], second["base_model_images"]):
        assert np.array_equal(pixels(tmp_path / "base" / a), pixels(tmp_path / "lora" / b))
    assert "comparison_grid" in second and "No saved base images" not in result.stderr
    # An empty base folder, no --run_base_inference, no grid: LoRA images only, and one line says so.
    third, result = infer(tiny_model_dir, tmp_path / "alone", "--lora_model_path", str(trained_run / "final_model"),
                          "--prompts", "a", "b", "--base_results_dir", str(tmp_path / "empty"), cwd=tmp_path)
    assert third["base_model_images"] == [] and len(third["lora_model_images"]) == 2 and "comparison_grid" not in third
    lines = [line for line in result.stderr.splitlines() if "No saved base images" in line]
    assert len(lines) == 1 and "prompt(s) 1, 2" in lines[0] and "--run_base_inference" in lines[0]


def test_no_flags_use_the_newest_run_and_the_originals_16_prompts(trained_run, tiny_model_dir, tmp_path):
    runs = tmp_path / "output_ghibli"
    for index, name in enumerate(["20250101_000000_ghibli_r4_a16.0_lr0.01", "20250102_000000_ghibli_r4_a16.0_lr0.01"]):
        shutil.copytree(trained_run / "final_model", runs / name / "final_model")
        weights = runs / name / "final_model" / "pytorch_lora_weights.safetensors"
        stamp = time.time() - 100 + 50 * index
        os.utime(weights, (stamp, stamp))
    newest = runs / "20250102_000000_ghibli_r4_a16.0_lr0.01" / "final_model"
    result = run_in_process(SCRIPT, "--pretrained_model_name_or_path", str(tiny_model_dir), "--num_images", "1",
                        "--height", "64", "--width", "64", "--num_inference_steps", "2", cwd=tmp_path)
    out = tmp_path / "output_visualization"
    metas = [json.loads(p.read_text()) for p in sorted(out.glob("metadata_prompt*_*.json"))]
    from inference_sdxl_ghibli import DEFAULT_PROMPTS
    assert sorted(m["prompt_idx"] for m in metas) == list(range(1, 17))
    assert [m["prompt"] for m in sorted(metas, key=lambda m: m["prompt_idx"])] == DEFAULT_PROMPTS
    assert {m["lora_model_path"] for m in metas} == {"output_ghibli/20250102_000000_ghibli_r4_a16.0_lr0.01/final_model"}
    assert len(list(out.glob("lora_prompt*_*_1.png"))) == 16 and str(newest.relative_to(tmp_path)) in result.stderr
    # Nothing trained and no --lora_model_path: one line naming the flag, before any model is loaded.
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_in_process(SCRIPT, "--pretrained_model_name_or_path", str(tmp_path / "no_model"), cwd=empty, check=False)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert "--lora_model_path" in result.stderr and "output_ghibli/*/final_model" in result.stderr


def test_default_prompts_are_the_originals_and_only_used_when_no_prompt_given():
    from inference_sdxl_ghibli import DEFAULT_PROMPTS, parse_args
    assert parse_args(["--prompt", "mine"]).prompts == ["mine"]
    assert parse_args(["--prompts", "a", "b"]).prompts == ["a", "b"]
    defaults = parse_args([])
    assert defaults.prompts == DEFAULT_PROMPTS and len(DEFAULT_PROMPTS) == 16
    assert DEFAULT_PROMPTS[0] == "Draw a beautiful couple and their cat in a park in Ghibli style."
    assert DEFAULT_PROMPTS[-1] == "An elderly couple walking their dog in a snowy forest, in Ghibli style."
    assert defaults.base_results_dir == "output_visualization/base_model_results"
    assert defaults.output_dir == "output_visualization" and defaults.lora_model_path is None


def test_bad_lora_path_is_a_one_line_error(tiny_model_dir, tmp_path):
    result = run_in_process(SCRIPT, "--pretrained_model_name_or_path", str(tiny_model_dir),
                        "--lora_model_path", str(tmp_path / "absent"), "--prompt", "x", check=False)
    assert result.returncode == 2 and "absent" in result.stderr and "Traceback" not in result.stderr


def test_pickle_lora_is_refused_unless_allowed(trained_run, tiny_model_dir, tmp_path):
    import torch

    from utils.lora.files import LORA_WEIGHT_NAME, read_tensors
    pickled = tmp_path / "pytorch_lora_weights.bin"
    torch.save(read_tensors(trained_run / "final_model" / LORA_WEIGHT_NAME), pickled)
    refused = run_in_process(SCRIPT, "--pretrained_model_name_or_path", str(tiny_model_dir),
                         "--lora_model_path", str(pickled), "--prompt", "x", check=False)
    assert refused.returncode == 2 and "pickle" in refused.stderr and "--allow_pickle" in refused.stderr
    allowed, _ = infer(tiny_model_dir, tmp_path / "out", "--lora_model_path", str(pickled), "--allow_pickle",
                       "--prompt", "a house in ghibli style", cwd=tmp_path)
    assert len(allowed["lora_model_images"]) == 2


def test_damaged_base_metadata_is_named_and_skipped(tmp_path, caplog):
    """A damaged metadata file is not reused (a warning names it); an intact older one still is."""
    from dataclasses import asdict

    from utils.inference.base_images import find_reusable_base
    from utils.inference.flags import GenerationSettings

    settings = GenerationSettings("blurry", 2, 5.0, 64, 64)
    Image.new("RGB", (64, 64), (10, 200, 10)).save(tmp_path / "base_prompt1_a_1.png")
    intact = {"prompt": "p", "seeds": [42], "settings": asdict(settings), "base_model": "m",
              "base_images": ["base_prompt1_a_1.png"]}
    (tmp_path / "metadata_prompt1_20250101_000000.json").write_text(json.dumps(intact))
    (tmp_path / "metadata_prompt1_20260101_000000.json").write_text('{"prompt": "p", ')  # newer, cut short
    (tmp_path / "metadata_prompt2_20260101_000000.json").write_text("[1, 2]")
    images = find_reusable_base(tmp_path, "p", [42], settings, "m")
    assert images is not None and images[0].getpixel((0, 0)) == (10, 200, 10)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("metadata_prompt1_20260101_000000.json" in w and "not reused" in w for w in warnings)
    assert any("metadata_prompt2_20260101_000000.json" in w and "not a JSON object" in w for w in warnings)
    assert find_reusable_base(tmp_path, "other prompt", [42], settings, "m") is None
