"""The original's Python names: each imports from the original's module path, and its signature
starts with the original's parameters (names, order, defaults); whatever is added comes after,
with a default, so every call written for the original still works.

What each call does is shown where its service is: tests/test_captioning.py (Gemini stand-in,
merging) and tests/test_hub.py (Hub stand-in); the scripts' helper functions and the dataset classes'
attributes are run below on the tiny model and small datasets.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import inspect
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import find_tile, load_pipe, pixels

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
    ("train_sdxl_lora", "import_model_class_from_model_name_or_path",
     [("pretrained_model_name_or_path", EMPTY), ("revision", EMPTY), ("subfolder", "text_encoder")]),
    ("train_sdxl_lora", "collate_fn", [("examples", EMPTY), ("dataset_type", "product")]),
    ("train_sdxl_lora", "encode_prompt", [("prompt_batch", EMPTY), ("text_encoders", EMPTY), ("tokenizers", EMPTY),
                                          ("proportion_empty_prompts", 0), ("is_train", True)]),
    ("train_sdxl_lora", "parse_args", []),
    ("train_sdxl_lora", "main", []),
    ("inference_sdxl_ghibli", "load_base_pipeline", [("args", EMPTY)]),
    ("inference_sdxl_ghibli", "load_lora_pipeline", [("args", EMPTY)]),
    ("inference_sdxl_ghibli", "create_comparison_grid",
     [("base_images", EMPTY), ("lora_images", EMPTY), ("args", EMPTY), ("timestamp", EMPTY), ("prompt_idx", EMPTY)]),
    ("inference_sdxl_ghibli", "save_metadata", [("args", EMPTY), ("timestamp", EMPTY), ("base_paths", EMPTY),
                                                ("lora_paths", EMPTY), ("comparison_path", EMPTY),
                                                ("prompt_idx", EMPTY)]),
    ("inference_sdxl_ghibli", "parse_args", []),
    ("inference_sdxl_ghibli", "main", []),
]
# The original's metadata keys, in its order (comparison_grid only when a grid was made).
METADATA_KEYS = ["prompt", "prompt_idx", "negative_prompt", "num_inference_steps", "guidance_scale", "height",
                 "width", "seed", "lora_model_path", "lora_scale", "timestamp", "base_model_images",
                 "lora_model_images", "comparison_grid"]


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


# ----------------------------------------------------------------------------- train_sdxl_lora.py's helpers


def test_import_model_class_reads_the_text_encoders_architecture(tiny_model_dir, tmp_path):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from train_sdxl_lora import import_model_class_from_model_name_or_path as model_class

    assert model_class(str(tiny_model_dir), None) is CLIPTextModel
    assert model_class(str(tiny_model_dir), None, subfolder="text_encoder_2") is CLIPTextModelWithProjection
    other = tmp_path / "model" / "text_encoder"
    other.mkdir(parents=True)
    (other / "config.json").write_text(json.dumps({"architectures": ["T5EncoderModel"], "model_type": "t5"}))
    with pytest.raises(ValueError, match="T5EncoderModel is not supported"):
        model_class(str(tmp_path / "model"), None)


def _as_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image.resize((16, 16)))).permute(2, 0, 1).float() / 255


def test_collate_fn_stacks_images_and_lists_texts(tiny_product_dataset_dir):
    from train_sdxl_lora import collate_fn
    from utils.ghibli_datasets import ProductImageDataset

    dataset = ProductImageDataset(tiny_product_dataset_dir, transform=_as_tensor)
    examples = [dataset[0], dataset[1], dataset[2]]
    batch = collate_fn(examples)  # the original's default: the product layout
    assert list(batch) == ["image", "product_image", "text"]
    assert batch["image"].shape == batch["product_image"].shape == (3, 3, 16, 16)
    assert torch.equal(batch["image"][1], examples[1]["image"])
    assert torch.equal(batch["product_image"][2], examples[2]["product_image"])
    assert batch["text"] == [example["text"] for example in examples]
    ghibli = collate_fn([{"image": e["image"], "text": e["text"]} for e in examples], "ghibli")
    assert list(ghibli) == ["image", "text"] and torch.equal(ghibli["image"], batch["image"])


def test_encode_prompt_is_the_projects_sdxl_encoding(tiny_model_dir):
    from train_sdxl_lora import encode_prompt
    from utils.core.sdxl import encode_prompts, tokenize

    pipe = load_pipe(tiny_model_dir)
    tokenizers, encoders = [pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2]
    captions = ["a village in ghibli style", "a cat on a roof"]
    embeds, pooled = encode_prompt(captions, encoders, tokenizers)
    expected_embeds, expected_pooled = encode_prompts(tokenizers, encoders, captions)
    assert embeds.shape == expected_embeds.shape and pooled.shape == expected_pooled.shape
    assert torch.allclose(embeds, expected_embeds) and torch.allclose(pooled, expected_pooled)
    assert not embeds.requires_grad and not pooled.requires_grad  # encoded without gradients, as the original
    # The original's recipe, step by step: each encoder's penultimate hidden states side by side, and the
    # pooled output of the last encoder.
    with torch.no_grad():
        outputs = [encoder(ids, output_hidden_states=True)
                   for encoder, ids in zip(encoders, tokenize(tokenizers, captions))]
    assert torch.allclose(embeds, torch.cat([output.hidden_states[-2] for output in outputs], dim=-1))
    assert torch.allclose(pooled, outputs[-1][0])
    assert embeds.shape[-1] == sum(encoder.config.hidden_size for encoder in encoders)


def test_encode_prompt_empties_and_chooses_captions_as_the_original(tiny_model_dir):
    from train_sdxl_lora import encode_prompt
    from utils.core.sdxl import encode_prompts

    pipe = load_pipe(tiny_model_dir)
    tokenizers, encoders = [pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2]
    options = ["a village in ghibli style", "a cat on a roof"]
    option_embeds = encode_prompts(tokenizers, encoders, options + [""])[0]

    empty = encode_prompt(options, encoders, tokenizers, proportion_empty_prompts=1.0)[0]
    assert all(torch.allclose(row, option_embeds[2]) for row in empty)
    first = encode_prompt([options, np.array(options)], encoders, tokenizers, is_train=False)[0]
    assert all(torch.allclose(row, option_embeds[0]) for row in first)  # not training: the first caption
    random.seed(0)
    chosen = encode_prompt([options] * 16, encoders, tokenizers)[0]  # training: a random one of each list
    picks = [next(i for i in (0, 1) if torch.allclose(row, option_embeds[i])) for row in chosen]
    assert set(picks) == {0, 1}


# ----------------------------------------------------------------------------- inference_sdxl_ghibli.py's helpers


def _tiny_images(colours) -> list[Image.Image]:
    return [Image.new("RGB", (32, 32), colour) for colour in colours]


def test_comparison_grid_and_metadata_keep_the_original_names_and_keys(tmp_path):
    from inference_sdxl_ghibli import create_comparison_grid, parse_args, save_metadata

    out = tmp_path / "out"
    args = parse_args(["--prompts", "a house", "a boat", "--output_dir", str(out), "--lora_model_path", "my_lora"])
    before = copy.deepcopy(vars(args))
    stamp = "20250101_120000"
    base, lora = _tiny_images([(200, 30, 30), (30, 200, 30)]), _tiny_images([(30, 30, 200), (200, 200, 30)])
    grid_path = create_comparison_grid(base, lora, args, stamp, 1)
    assert grid_path == str(out / f"comparison_grid_prompt2_{stamp}.png")
    grid = pixels(out / f"comparison_grid_prompt2_{stamp}.png")
    top, bottom = (find_tile(grid, np.asarray(image, dtype=np.int16))[0] for image in (base[0], lora[0]))
    assert top < bottom  # base row on top, LoRA row below

    base_paths = [str(out / f"base_prompt2_{stamp}_{i}.png") for i in (1, 2)]
    lora_paths = [str(out / f"lora_prompt2_{stamp}_{i}.png") for i in (1, 2)]
    meta_path = save_metadata(args, stamp, base_paths, lora_paths, grid_path, 1)
    assert meta_path == str(out / f"metadata_prompt2_{stamp}.json")
    meta = json.loads((out / f"metadata_prompt2_{stamp}.json").read_text())
    assert list(meta) == METADATA_KEYS
    assert (meta["prompt"], meta["prompt_idx"], meta["seed"], meta["lora_model_path"], meta["lora_scale"]) == \
        ("a boat", 2, 42, "my_lora", 1.0)
    assert (meta["negative_prompt"], meta["num_inference_steps"], meta["guidance_scale"], meta["height"],
            meta["width"], meta["timestamp"]) == (args.negative_prompt, 30, 5.0, 1024, 1024, stamp)
    assert meta["base_model_images"] == [f"base_prompt2_{stamp}_1.png", f"base_prompt2_{stamp}_2.png"]
    assert meta["lora_model_images"] == [f"lora_prompt2_{stamp}_1.png", f"lora_prompt2_{stamp}_2.png"]
    assert meta["comparison_grid"] == f"comparison_grid_prompt2_{stamp}.png"
    no_grid = json.loads(Path(save_metadata(args, stamp, base_paths, lora_paths, None, 0)).read_text())
    assert list(no_grid) == METADATA_KEYS[:-1] and no_grid["prompt"] == "a house"
    assert vars(args) == before  # args is read, never written


def _original_namespace(model, lora, out) -> argparse.Namespace:
    """The flags the original's parser gave (no --revision, --variant or --allow_pickle)."""
    return argparse.Namespace(
        pretrained_model_name_or_path=str(model), lora_model_path=str(lora), prompt="a house in ghibli style",
        prompts=["a house in ghibli style"], negative_prompt="blurry", num_inference_steps=2, guidance_scale=5.0,
        num_images=1, height=64, width=64, seed=42, output_dir=str(out), lora_scale=1.0, device="cpu",
        run_base_inference=True, base_results_dir=str(out / "base"), create_comparison_grid=True)


@pytest.mark.slow
def test_load_lora_pipeline_changes_the_images_of_the_base_pipeline(trained_run, tiny_model_dir, tmp_path):
    from inference_sdxl_ghibli import load_base_pipeline, load_lora_pipeline, parse_args
    from utils.inference.flags import settings_of
    from utils.inference.generation import generate

    args = _original_namespace(tiny_model_dir, trained_run / "final_model", tmp_path)
    before = copy.deepcopy(vars(args))
    base_pipe, lora_pipe = load_base_pipeline(args), load_lora_pipeline(args)
    assert vars(args) == before
    assert not base_pipe.get_list_adapters() and lora_pipe.get_list_adapters()
    settings = settings_of(args)
    base = np.asarray(generate(base_pipe, args.prompts[0], [42], settings)[0], dtype=np.int16)
    lora = np.asarray(generate(lora_pipe, args.prompts[0], [42], settings)[0], dtype=np.int16)
    assert base.shape == lora.shape == (64, 64, 3)
    assert np.abs(base - lora).mean() > 1.0  # the LoRA changes the image of the same seed

    missing = parse_args(["--pretrained_model_name_or_path", str(tiny_model_dir),
                          "--lora_model_path", str(tmp_path / "absent")])
    with pytest.raises(FileNotFoundError, match="absent"):  # as the original
        load_lora_pipeline(missing)


# ----------------------------------------------------------------------------- the datasets' attributes


def test_ghibli_dataset_keeps_the_original_attributes(tmp_path):
    from utils.ghibli_datasets import GhibliDataset

    images = tmp_path / "ghibli" / "images"
    images.mkdir(parents=True)
    for name in ("a.png", "c.png"):
        Image.new("RGB", (24, 24), "white").save(images / name)
    captions = {"a.png": "first", "b.png": "no such image", "c.png": "third"}
    (tmp_path / "ghibli" / "captions.json").write_text(json.dumps(captions))

    dataset = GhibliDataset(tmp_path / "ghibli")
    assert dataset.captions == captions and dataset.images_dir == images
    assert dataset.items == [  # image_id: the caption's position in captions.json (b.png left out)
        {"image_id": 0, "image_path": str(images / "a.png"), "caption": "first"},
        {"image_id": 2, "image_path": str(images / "c.png"), "caption": "third"},
    ]
    assert [entry.name for entry in dataset.entries] == ["a.png", "c.png"] and len(dataset) == 2
    assert [dataset[i]["text"] for i in range(2)] == [item["caption"] for item in dataset.items]


def test_product_dataset_keeps_the_original_attributes(tiny_product_dataset_dir):
    from utils.ghibli_datasets import ProductImageDataset

    dataset = ProductImageDataset(tiny_product_dataset_dir)
    captions = json.loads((tiny_product_dataset_dir / "captions.json").read_text())
    assert dataset.captions == captions
    assert dataset.products_dir == tiny_product_dataset_dir / "products"
    assert dataset.styled_dir == tiny_product_dataset_dir / "styled"
    assert dataset.items == [
        {"image_id": key, "product_image": str(tiny_product_dataset_dir / "products" / value["product"]),
         "styled_image": str(tiny_product_dataset_dir / "styled" / f"{key}.png"), "prompt": value["prompt"]}
        for key, value in captions.items()]
    assert len(dataset.items) == len(dataset.entries) == len(dataset)
    assert dataset[0]["text"] == dataset.items[0]["prompt"]
