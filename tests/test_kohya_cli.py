"""utils/convert_lora.py: a trained LoRA as a kohya file gives the same image, the inference script takes
it, PEFT adapter folders convert, and keys that cannot be mapped are listed, never dropped."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import TRAINED_ALPHA, TRAINED_RANK
from tests.helpers import load_pipe, run_in_process
from tests.kohya_checks import (ATTENTIONS, KOHYA_KEY, PROMPT, assert_close, convert_cli, data_section_sha256, diffusers_file_deltas, render, render_merged_by_hand, render_with)


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    """One base pipeline for the module; every test leaves it as it found it (LoRAs unloaded)."""
    return load_pipe(tiny_model_dir)


def test_trained_lora_as_kohya_file_gives_the_same_image(trained_run, pipe, tmp_path):
    from utils.lora.files import TRAINING_METADATA_KEY, read_metadata, read_tensors

    source = trained_run / "final_model" / "pytorch_lora_weights.safetensors"
    output = tmp_path / "ghibli_kohya.safetensors"
    result = run_in_process("utils/convert_lora.py", str(trained_run / "final_model"), "--output", str(output))
    assert "32 modules" in result.stdout

    tensors = read_tensors(output)
    assert all(KOHYA_KEY.fullmatch(key) for key in tensors)
    modules = {key.split(".")[0] for key in tensors}
    assert modules == {f"lora_unet_{n}" for n in ATTENTIONS}
    for module in modules:
        assert tensors[f"{module}.alpha"].ndim == 0 and float(tensors[f"{module}.alpha"]) == TRAINED_ALPHA
        assert tensors[f"{module}.lora_down.weight"].shape[0] == TRAINED_RANK

    training = json.loads(read_metadata(source)[TRAINING_METADATA_KEY])
    meta = read_metadata(output)
    assert meta["ss_network_module"] == "networks.lora"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == (str(TRAINED_RANK), str(int(TRAINED_ALPHA)))
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["ss_resolution"] == f"({training['resolution']}, {training['resolution']})"
    assert (meta["ss_steps"], meta["ss_epoch"]) == (str(training["steps"]), str(training["epoch"]))
    assert float(meta["ss_learning_rate"]) == training["learning_rate"]
    assert meta["ss_num_train_images"] == str(training["num_train_images"])
    assert json.loads(meta["ss_tag_frequency"]) == {"dataset": training["tag_frequency"]}
    assert meta["ss_training_command"].startswith("train_sdxl_lora.py")
    assert meta["sshs_model_hash"] == data_section_sha256(output)
    assert not any("token" in key.lower() for key in meta)

    base = render(pipe)
    original = render_with(pipe, source.parent, source.name)
    converted = render_with(pipe, output.parent, output.name)
    merged = render_merged_by_hand(pipe, diffusers_file_deltas(source, TRAINED_ALPHA / TRAINED_RANK))
    assert np.abs(original[0] - base[0]).max() > 0.02  # the LoRA does change the image
    assert_close(converted[0], original[0])
    assert_close(converted[0], merged[0])


def test_inference_cli_takes_a_kohya_file(trained_run, pipe, tiny_model_dir, tmp_path):
    from inference_sdxl_ghibli import DEFAULT_NEGATIVE
    from utils.inference.flags import GenerationSettings
    from utils.inference.generation import run_comparison
    from utils.lora.to_kohya import convert_diffusers_to_kohya

    kohya = convert_diffusers_to_kohya(trained_run / "final_model" / "pytorch_lora_weights.safetensors",
                                       tmp_path / "style.safetensors")
    run_in_process("inference_sdxl_ghibli.py", "--pretrained_model_name_or_path", str(tiny_model_dir),
                   "--lora_model_path", str(kohya), "--prompt", PROMPT, "--num_images", "1", "--height", "64",
                   "--width", "64", "--num_inference_steps", "2", "--output_dir", str(tmp_path / "cli"))
    # The same generation in-process from the diffusers folder (the CLI's defaults: guidance 5, seed 42).
    settings = GenerationSettings(DEFAULT_NEGATIVE, 2, 5.0, 64, 64)
    try:
        run_comparison(pipe, [PROMPT], str(trained_run / "final_model"), 1.0, settings, 1, 42,
                       tmp_path / "reference", str(tiny_model_dir), run_base=False, create_grid=False)
    finally:
        pipe.unload_lora_weights()
    (cli_image,) = (tmp_path / "cli").glob("lora_prompt1_*_1.png")
    (reference,) = (tmp_path / "reference").glob("lora_prompt1_*_1.png")
    difference = np.abs(np.asarray(Image.open(cli_image), dtype=np.int16) -
                        np.asarray(Image.open(reference), dtype=np.int16))
    assert difference.max() <= 1


def test_unmappable_keys_are_reported_not_dropped(trained_run, tiny_model_dir, tmp_path, capsys):
    from safetensors.torch import save_file

    from utils.lora.from_kohya import convert_kohya_to_diffusers
    from utils.lora.kohya_names import LoraConversionError, load_unet_config
    from utils.lora.files import read_metadata, read_tensors

    source = trained_run / "final_model" / "pytorch_lora_weights.safetensors"
    tensors, metadata = read_tensors(source), read_metadata(source)
    extra = dict(tensors)
    extra["unet.not_a_block.proj.lora_A.weight"] = torch.zeros(4, 8)
    extra["unet.not_a_block.proj.lora_B.weight"] = torch.zeros(8, 4)
    extra["unet.down_blocks.1.attentions.0.proj_in.lora_B.bias"] = torch.zeros(64)
    save_file(extra, str(tmp_path / "extra.safetensors"), metadata=metadata)
    assert convert_cli(tmp_path / "extra.safetensors", "--output", tmp_path / "out.safetensors") == 2
    error = capsys.readouterr().err
    assert "2 key(s) cannot be mapped" in error
    assert "unet.not_a_block.proj:" in error and "proj_in.lora_B.bias:" in error
    assert not (tmp_path / "out.safetensors").exists()

    dora = dict(tensors)
    dora["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_magnitude_vector"] = torch.ones(64)
    save_file(dora, str(tmp_path / "dora.safetensors"), metadata=metadata)
    assert convert_cli(tmp_path / "dora.safetensors") == 2
    assert "DoRA" in capsys.readouterr().err

    # The tiny model's weights do not fit SDXL's UNet: a wrong base model is caught by shape, not written.
    assert convert_cli(source, "--output", tmp_path / "sdxl.safetensors",
                       "--pretrained_model_name_or_path", "stabilityai/stable-diffusion-xl-base-1.0") == 2
    assert "do not fit" in capsys.readouterr().err

    kohya = {"lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 64),
             "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(64, 4),
             "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q.alpha": torch.tensor(4.0),
             "lora_unet_input_blocks_9_1_proj_in.lora_down.weight": torch.zeros(4, 64),
             "lora_unet_input_blocks_9_1_proj_in.lora_up.weight": torch.zeros(64, 4),
             "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.hada_w1_a": torch.zeros(4, 4)}
    save_file(kohya, str(tmp_path / "kohya.safetensors"))
    with pytest.raises(LoraConversionError) as raised:
        convert_kohya_to_diffusers(tmp_path / "kohya.safetensors", tmp_path / "k" / "pytorch_lora_weights.safetensors",
                                   load_unet_config(str(tiny_model_dir)))
    assert {p.split(":")[0] for p in raised.value.problems} == {
        "lora_unet_input_blocks_9_1_proj_in", "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.hada_w1_a"}
    assert not (tmp_path / "k").exists()


def test_peft_adapter_folder_converts_with_its_component(pipe, tmp_path, capsys):
    import copy

    from peft import LoraConfig, get_peft_model

    from utils.lora.files import read_tensors

    model = get_peft_model(copy.deepcopy(pipe.text_encoder_2),
                           LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj"]))
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    source = read_tensors(adapter / "adapter_model.safetensors")

    assert convert_cli(adapter) == 2
    assert "--component" in capsys.readouterr().err
    assert convert_cli(adapter, "--component", "text_encoder_2", "--output", tmp_path / "te2.safetensors") == 0
    tensors = read_tensors(tmp_path / "te2.safetensors")
    assert {key.split(".")[0] for key in tensors} == {
        f"lora_te2_text_model_encoder_layers_{i}_self_attn_{p}_proj" for i in range(3) for p in ("q", "v")}
    assert {float(v) for k, v in tensors.items() if k.endswith(".alpha")} == {6.0}
    (key,) = [k for k in source if k.endswith("layers.1.self_attn.v_proj.lora_A.weight")]
    assert torch.equal(tensors["lora_te2_text_model_encoder_layers_1_self_attn_v_proj.lora_down.weight"], source[key])
