"""inference_sdxl_ghibli.py: one pipeline, same seeds, LoRA scale applied for any value."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from tests.conftest import run_script

COMMON = ["--num_images", "2", "--height", "128", "--width", "128", "--num_inference_steps", "4"]


def infer(tiny_model_dir, out_dir, *extra):
    run_script("inference_sdxl_ghibli.py", "--pretrained_model_name_or_path", str(tiny_model_dir),
               "--output_dir", str(out_dir), *COMMON, *extra)
    (meta_path,) = sorted(out_dir.glob("metadata_prompt0_*.json"))[-1:]
    return json.loads(meta_path.read_text())


def pixels(folder, name):
    return np.asarray(Image.open(folder / name), dtype=np.int16)


def test_scale_zero_reproduces_base_and_scale_one_differs(trained_run, tiny_model_dir, tmp_path):
    lora = str(trained_run / "final_model")
    zero = infer(tiny_model_dir, tmp_path / "zero", "--lora_model_path", lora, "--lora_scale", "0",
                 "--prompt", "a house in ghibli style", "--create_comparison_grid")
    for base_name, lora_name in zip(zero["base_images"], zero["lora_images"]):
        assert np.abs(pixels(tmp_path / "zero", base_name) - pixels(tmp_path / "zero", lora_name)).max() <= 1

    one = infer(tiny_model_dir, tmp_path / "one", "--lora_model_path", lora, "--lora_scale", "1.0",
                "--prompt", "a house in ghibli style", "--create_comparison_grid")
    differences = [np.abs(pixels(tmp_path / "one", b) - pixels(tmp_path / "one", l)).mean()
                   for b, l in zip(one["base_images"], one["lora_images"])]
    assert min(differences) > 1.0
    # The base images of both calls match: same seeds, same pipeline, adapter loaded only afterwards.
    assert np.array_equal(pixels(tmp_path / "zero", zero["base_images"][0]),
                          pixels(tmp_path / "one", one["base_images"][0]))
    assert one["seeds"] == [42, 43] and one["prompt"] == "a house in ghibli style"

    grid = Image.open(tmp_path / "one" / one["comparison_grid"])
    # Two rows of 128-pixel images (plus title and margins), two columns.
    assert 2 * 128 <= grid.height < 3 * 128 and 2 * 128 <= grid.width < 4 * 128
    grid_array = np.asarray(grid.convert("RGB"), dtype=np.int16)
    base0 = pixels(tmp_path / "one", one["base_images"][0])[..., :3]
    lora0 = pixels(tmp_path / "one", one["lora_images"][0])[..., :3]
    assert _find_tile(grid_array, base0) < _find_tile(grid_array, lora0), "base row must be above the LoRA row"


def _find_tile(grid, tile) -> int:
    """The row (y) where ``tile`` sits in ``grid``."""
    height, width = tile.shape[:2]
    for y in range(grid.shape[0] - height + 1):
        for x in range(grid.shape[1] - width + 1):
            if np.array_equal(grid[y, x], tile[0, 0]) and np.array_equal(grid[y:y + height, x:x + width], tile):
                return y
    raise AssertionError("tile not found in grid")


def test_saved_base_images_are_reused(trained_run, tiny_model_dir, tmp_path):
    first = infer(tiny_model_dir, tmp_path / "base", "--run_base_inference", "--prompt", "a cat in ghibli style")
    assert len(first["base_images"]) == 2 and first["lora_images"] == []
    second = infer(tiny_model_dir, tmp_path / "lora", "--lora_model_path", str(trained_run / "final_model"),
                   "--prompt", "a cat in ghibli style", "--base_results_dir", str(tmp_path / "base"),
                   "--create_comparison_grid")
    for a, b in zip(first["base_images"], second["base_images"]):
        assert np.array_equal(pixels(tmp_path / "base", a), pixels(tmp_path / "lora", b))


def test_default_prompts_only_when_no_prompt_given():
    from inference_sdxl_ghibli import DEFAULT_PROMPTS, parse_args
    assert parse_args(["--prompt", "mine"]).prompts == ["mine"]
    assert parse_args(["--prompts", "a", "b"]).prompts == ["a", "b"]
    assert parse_args([]).prompts == DEFAULT_PROMPTS and len(DEFAULT_PROMPTS) == 16


def test_bad_lora_path_is_a_one_line_error(tiny_model_dir, tmp_path):
    result = run_script("inference_sdxl_ghibli.py", "--pretrained_model_name_or_path", str(tiny_model_dir),
                        "--lora_model_path", str(tmp_path / "absent"), "--prompt", "x", check=False)
    assert result.returncode == 2 and "absent" in result.stderr and "Traceback" not in result.stderr


def test_pickle_lora_is_refused_unless_allowed(trained_run, tiny_model_dir, tmp_path):
    import torch

    from utils.lora_io import LORA_WEIGHT_NAME, read_tensors
    pickled = tmp_path / "pytorch_lora_weights.bin"
    torch.save(read_tensors(trained_run / "final_model" / LORA_WEIGHT_NAME), pickled)
    refused = run_script("inference_sdxl_ghibli.py", "--pretrained_model_name_or_path", str(tiny_model_dir),
                         "--lora_model_path", str(pickled), "--prompt", "x", check=False)
    assert refused.returncode == 2 and "pickle" in refused.stderr and "--allow_pickle" in refused.stderr
    allowed = infer(tiny_model_dir, tmp_path / "out", "--lora_model_path", str(pickled), "--allow_pickle",
                    "--prompt", "a house in ghibli style")
    assert len(allowed["lora_images"]) == 2
