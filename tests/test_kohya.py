"""Kohya-format LoRA files: SDXL names, alpha per module, text encoders, rsLoRA and convolutions, and the same
images as the diffusers file. The command-line converter: tests/test_kohya_cli.py."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.helpers import load_pipe
from tests.kohya_checks import (ATTENTIONS, assert_close, convert_cli, peft_deltas, render, render_merged_by_hand, render_with)

SHARED_SDXL_CONFIG = Path(__file__).resolve().parents[2] / "shared" / "sdxl-base-1.0-config" / "unet.json"


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    """One base pipeline for the module; every test leaves it as it found it (LoRAs unloaded, weights restored)."""
    return load_pipe(tiny_model_dir)


def diffusers_inverse(kohya_names: list[str], unet_config: dict) -> dict[str, str]:
    """kohya name -> module path, as diffusers' own kohya loader converts it."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft

    fake = {}
    for name in kohya_names:
        fake.update({f"{name}.lora_down.weight": torch.full((1, 1), float(len(fake))),
                     f"{name}.lora_up.weight": torch.zeros(1, 1), f"{name}.alpha": torch.tensor(1.0)})
    state, _ = StableDiffusionXLPipeline.lora_state_dict(dict(fake), unet_config=SimpleNamespace(**unet_config))
    state = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in state.items()})
    by_value = {float(fake[f"{n}.lora_down.weight"]): n for n in kohya_names}
    return {by_value[float(v)]: k.rsplit(".lora_A", 1)[0] for k, v in state.items() if ".lora_A" in k}


def with_random_adapter(model, targets: list[str], use_rslora: bool):
    """A copy of ``model`` with a LoRA (rank 4, alpha 8) whose B is non-zero, as after training."""
    import copy

    from peft import LoraConfig

    model = copy.deepcopy(model)
    model.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_rslora=use_rslora))
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model


# ----------------------------------------------------------------------------- names


def test_sdxl_names_are_kohyas_and_diffusers_converts_them_back():
    from utils.lora.kohya_names import SDXL_UNET_CONFIG, text_encoder_kohya_name, unet_kohya_names

    if SHARED_SDXL_CONFIG.is_file():
        assert json.loads(SHARED_SDXL_CONFIG.read_text()) == SDXL_UNET_CONFIG
    names = unet_kohya_names(SDXL_UNET_CONFIG)
    # kohya's LoRA on SDXL's Transformer2DModel Linear layers: 722 modules ("create LoRA for U-Net: 722 modules").
    assert len([m for m in names if ".attentions." in m]) == 722
    expected = {
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q":
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
        "down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2":
            "lora_unet_input_blocks_8_1_transformer_blocks_9_ff_net_2",
        "mid_block.attentions.0.transformer_blocks.9.attn2.to_out.0":
            "lora_unet_middle_block_1_transformer_blocks_9_attn2_to_out_0",
        "up_blocks.0.attentions.2.proj_out": "lora_unet_output_blocks_2_1_proj_out",
        "up_blocks.1.attentions.0.transformer_blocks.1.ff.net.0.proj":
            "lora_unet_output_blocks_3_1_transformer_blocks_1_ff_net_0_proj",
        "up_blocks.0.upsamplers.0.conv": "lora_unet_output_blocks_2_2_conv",
        "up_blocks.1.upsamplers.0.conv": "lora_unet_output_blocks_5_2_conv",
        "down_blocks.0.downsamplers.0.conv": "lora_unet_input_blocks_3_0_op",
        "down_blocks.0.resnets.1.time_emb_proj": "lora_unet_input_blocks_2_0_emb_layers_1",
        "up_blocks.2.resnets.2.conv_shortcut": "lora_unet_output_blocks_8_0_skip_connection",
        "mid_block.resnets.1.conv2": "lora_unet_middle_block_2_out_layers_3",
        "add_embedding.linear_1": "lora_unet_label_emb_0_0",
    }
    assert {module: names[module] for module in expected} == expected
    assert diffusers_inverse(list(names.values()), SDXL_UNET_CONFIG) == {v: k for k, v in names.items()}
    assert text_encoder_kohya_name("text_encoder", "encoder.layers.11.mlp.fc2") == \
        "lora_te1_text_model_encoder_layers_11_mlp_fc2"
    assert text_encoder_kohya_name("text_encoder_2", "text_model.encoder.layers.31.self_attn.out_proj") == \
        "lora_te2_text_model_encoder_layers_31_self_attn_out_proj"
    assert text_encoder_kohya_name("text_encoder", "text_model.final_layer_norm") is None


def test_block_indices_follow_the_config_of_the_tiny_unet(tiny_model_dir):
    from utils.lora.kohya_names import load_unet_config, unet_kohya_names

    config = load_unet_config(str(tiny_model_dir))  # 2 blocks, 1 layer per block
    names = unet_kohya_names(config)
    kohya = set(names.values())
    assert {f"lora_unet_{n}" for n in ATTENTIONS} <= kohya
    assert {"lora_unet_input_blocks_0_0", "lora_unet_input_blocks_1_0_in_layers_2", "lora_unet_input_blocks_2_0_op",
            "lora_unet_input_blocks_3_0_skip_connection", "lora_unet_output_blocks_1_2_conv",
            "lora_unet_output_blocks_3_0_out_layers_3", "lora_unet_out_2"} <= kohya
    assert not any("input_blocks_4" in n or "output_blocks_4" in n for n in kohya)
    assert diffusers_inverse(list(kohya), config) == {v: k for k, v in names.items()}


# ----------------------------------------------------------------------------- trained run


# ----------------------------------------------------------------------------- text encoders, rsLoRA, conv layers


@pytest.fixture(scope="module")
def text_encoder_lora(pipe, tiny_model_dir, tmp_path_factory):
    """A diffusers file with UNet and both text-encoder LoRAs, trained-like (non-zero B), with rsLoRA."""
    from utils.lora.files import save_lora

    models = {"unet": with_random_adapter(pipe.unet, ["to_q", "to_k", "to_v", "to_out.0"], use_rslora=True)}
    for name in ("text_encoder", "text_encoder_2"):
        models[name] = with_random_adapter(getattr(pipe, name), ["q_proj", "k_proj", "v_proj", "out_proj", "fc1",
                                                                 "fc2"], use_rslora=True)
    folder = tmp_path_factory.mktemp("te_lora") / "final_model"
    path = save_lora(folder, models["unet"], [models["text_encoder"], models["text_encoder_2"]],
                     {"base_model": str(tiny_model_dir), "lora_rank": 4, "lora_alpha": 8, "use_rslora": True,
                      "resolution": 64, "steps": 3, "train_text_encoder": True})
    return path, peft_deltas(models)


def test_text_encoders_and_rslora_survive_kohya_and_back(text_encoder_lora, pipe, tmp_path):
    from utils.lora.to_kohya import convert_diffusers_to_kohya, read_diffusers_lora
    from utils.lora.files import adapter_config, read_metadata, read_tensors

    source, deltas = text_encoder_lora
    kohya = convert_diffusers_to_kohya(source, tmp_path / "te_kohya.safetensors")
    tensors = read_tensors(kohya)
    modules = {key.split(".")[0] for key in tensors}
    for prefix in ("lora_te1", "lora_te2"):
        assert {f"{prefix}_text_model_encoder_layers_{i}_{part}" for i in range(3)
                for part in ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj",
                             "mlp_fc1", "mlp_fc2")} <= modules
    # rsLoRA scales by alpha/sqrt(r) = 8/2 = 4; kohya scales by alpha/r, so alpha becomes 8*sqrt(4) = 16.
    assert {float(tensors[f"{m}.alpha"]) for m in modules} == {8 * math.sqrt(4)}
    assert "rsLoRA" in read_metadata(kohya)["ss_training_comment"]
    assert read_metadata(kohya)["ss_network_train_unet_only"] == "False"

    back = tmp_path / "back" / "pytorch_lora_weights.safetensors"
    assert convert_cli(kohya, "--output", back.parent) == 0
    before = {(m.component, m.module.removeprefix("text_model.")): m for m in read_diffusers_lora(source).modules}
    after = {(m.component, m.module.removeprefix("text_model.")): m for m in read_diffusers_lora(back).modules}
    assert before.keys() == after.keys() and len(after) == len(deltas)
    for key, module in before.items():
        assert torch.equal(module.down, after[key].down) and torch.equal(module.up, after[key].up)
        assert after[key].scale == pytest.approx(module.scale) == pytest.approx(4.0)
    assert adapter_config(back, "text_encoder_2")["lora_alpha"] == 16
    assert read_metadata(back)["ghibli_training"] == read_metadata(source)["ghibli_training"]

    base = render(pipe)
    original = render_with(pipe, source.parent, source.name)
    converted = render_with(pipe, kohya.parent, kohya.name)
    round_trip = render_with(pipe, back.parent, back.name)
    merged = render_merged_by_hand(pipe, deltas)
    assert (original[1] - base[1]).abs().max() > 0.05  # the text-encoder LoRA changes the embeddings
    for result in (converted, round_trip, merged):
        assert_close(result[1], original[1])
        assert_close(result[0], original[0])


def test_convolution_and_embedding_layers_convert_too(pipe, tiny_model_dir, tmp_path):
    from utils.lora.kohya_names import KOHYA_WEIGHT_NAME
    from utils.lora.to_kohya import save_kohya_copy
    from utils.lora.files import read_tensors, save_lora

    targets = ["conv_in", "conv1", "conv2", "conv_shortcut", "time_emb_proj", "conv", "linear_1", "proj_in",
               "proj_out", "ff.net.0.proj", "ff.net.2", "to_q"]
    unet = with_random_adapter(pipe.unet, targets, use_rslora=False)
    folder = tmp_path / "conv_lora"
    save_lora(folder, unet, None, {"base_model": str(tiny_model_dir)})
    kohya = save_kohya_copy(folder, unet.config)
    assert kohya == folder / KOHYA_WEIGHT_NAME
    names = {key.split(".")[0] for key in read_tensors(kohya)}
    assert {"lora_unet_input_blocks_0_0", "lora_unet_time_embed_0", "lora_unet_label_emb_0_0",
            "lora_unet_input_blocks_2_0_op", "lora_unet_output_blocks_1_2_conv",
            "lora_unet_input_blocks_3_0_skip_connection", "lora_unet_output_blocks_2_0_emb_layers_1",
            "lora_unet_middle_block_0_in_layers_2", "lora_unet_output_blocks_0_1_transformer_blocks_0_ff_net_2",
            } <= names
    deltas = peft_deltas({"unet": unet})
    assert len(names) == len(deltas)

    base = render(pipe)
    converted = render_with(pipe, folder, KOHYA_WEIGHT_NAME)
    merged = render_merged_by_hand(pipe, deltas)
    assert np.abs(merged[0] - base[0]).max() > 0.02
    assert_close(converted[0], merged[0])


# ----------------------------------------------------------------------------- bad input
