"""The original's Python names: each imports from the original's module path, and its signature
starts with the original's parameters (names, order, defaults); whatever is added comes after,
with a default, so every call written for the original still works.

What each call does is shown where its service is: tests/test_captioning.py (Gemini stand-in,
merging) and tests/test_hub.py (Hub stand-in).
"""

from __future__ import annotations

import importlib
import inspect

import pytest

EMPTY = inspect.Parameter.empty
POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)

# module, name, the original's parameters as (name, default); EMPTY: no default.
ORIGINAL_API = [
    ("utils.creat_text_caption", "load_api_key", []),
    ("utils.creat_text_caption", "generate_caption", [("image_path", EMPTY), ("prompt", EMPTY), ("temperature", 0.9)]),
    ("utils.creat_text_caption", "process_images",
     [("image_dir", EMPTY), ("prompt", EMPTY), ("output_file", "captions.json"), ("temperature", 0.9)]),
    ("utils.creat_text_caption", "main", []),
    ("utils.merge_captions", "load_json_file", [("file_path", EMPTY)]),
    ("utils.merge_captions", "merge_captions", [("file1_path", EMPTY), ("file2_path", EMPTY), ("output_path", EMPTY)]),
    ("utils.merge_captions", "main", []),
    ("hf.hf_inference", "generate_image_with_hf_api",
     [("prompt", EMPTY), ("base_model_id", "stabilityai/stable-diffusion-xl-base-1.0"), ("lora_model_id", None),
      ("token", None), ("num_inference_steps", 50), ("guidance_scale", 7.5), ("negative_prompt", None)]),
    ("hf.upload_to_hf", "upload_model_to_hf",
     [("model_path", EMPTY), ("repo_name", EMPTY), ("token", EMPTY), ("private", False)]),
]


@pytest.mark.parametrize("module_name, name, original", ORIGINAL_API, ids=[f"{m}.{n}" for m, n, _ in ORIGINAL_API])
def test_original_name_imports_with_the_original_parameters(module_name, name, original):
    function = getattr(importlib.import_module(module_name), name)
    assert callable(function)
    parameters = list(inspect.signature(function).parameters.values())

    head = [(p.name, p.default) for p in parameters[:len(original)]]
    assert head == original
    assert all(p.kind in POSITIONAL for p in parameters[:len(original)])  # callable positionally, as before
    for extra in parameters[len(original):]:
        assert extra.default is not EMPTY or extra.kind in (inspect.Parameter.VAR_POSITIONAL,
                                                            inspect.Parameter.VAR_KEYWORD), extra


def test_original_cli_defaults():
    from utils import creat_text_caption, merge_captions

    caption_args = creat_text_caption.parse_args([])
    assert (caption_args.image_dir, caption_args.output, caption_args.temperature) == \
        ("ghibli_2", "ghibli_2_captions.json", 0.5)
    assert caption_args.prompt == ("Describe the input image in 1\u20132 sentences. "
                                   "Make sure to mention that the image is in 'Ghibli style'.")
    assert creat_text_caption.parse_args(["--model", "gemini-2.0-flash"]).model == "gemini-2.0-flash"

    merge_args = merge_captions.parse_args([])
    assert [str(p) for p in merge_captions.input_files(merge_args)] == \
        ["ghibli/ghibli_captions_simplified.json", "ghibli_2_captions.json"]
    assert str(merge_args.output) == "ghibli/merged_captions.json"
    only_first = merge_captions.parse_args(["--file1", "a.json"])  # as the original: file2 keeps its default
    assert [str(p) for p in merge_captions.input_files(only_first)] == ["a.json", "ghibli_2_captions.json"]
    listed = merge_captions.parse_args(["--files", "a.json", "b.json", "c.json"])  # a list replaces the defaults
    assert [str(p) for p in merge_captions.input_files(listed)] == ["a.json", "b.json", "c.json"]
