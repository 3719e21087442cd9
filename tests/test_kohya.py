"""Kohya-format LoRA files: SDXL names, alpha per module, metadata, and the same images as the diffusers file."""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import TRAINED_ALPHA, TRAINED_RANK, run_script

PROMPT = "a village in ghibli style"
SHARED_SDXL_CONFIG = Path(__file__).resolve().parents[2] / "shared" / "sdxl-base-1.0-config" / "unet.json"
KOHYA_KEY = re.compile(r"(lora_unet|lora_te1|lora_te2)_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)")
ATTENTIONS = [f"{prefix}_transformer_blocks_0_{attn}_{proj}"
              for prefix in ("input_blocks_3_1", "middle_block_1", "output_blocks_0_1", "output_blocks_1_1")
              for attn in ("attn1", "attn2") for proj in ("to_q", "to_k", "to_v", "to_out_0")]
# Suffixes diffusers writes for PEFT's lora_A / lora_B (parsed here without the converter under test).
DOWN_UP = [(".lora_A.weight", ".lora_B.weight"), (".lora.down.weight", ".lora.up.weight"),
           (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight")]


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    """One base pipeline for the module; every test leaves it as it found it (LoRAs unloaded, weights restored)."""
    from diffusers import StableDiffusionXLPipeline

    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_model_dir)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def render(pipe) -> tuple[np.ndarray, torch.Tensor]:
    """An image (fixed seed, no CFG to keep it cheap) and the prompt embeddings."""
    with torch.no_grad():
        embeddings = pipe.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=False)[0]
        image = pipe(PROMPT, num_inference_steps=2, guidance_scale=1.0, height=64, width=64, output_type="np",
                     generator=torch.Generator().manual_seed(0)).images[0]
    return image, embeddings


def render_with(pipe, folder: Path, weight_name: str) -> tuple[np.ndarray, torch.Tensor]:
    pipe.load_lora_weights(str(folder), weight_name=weight_name, adapter_name="under_test")
    try:
        return render(pipe)
    finally:
        pipe.unload_lora_weights()


def diffusers_file_deltas(path: Path, scale: float) -> dict[tuple[str, str], tuple]:
    """(component, module) -> (A, B, scale) from a diffusers-format file."""
    from utils.lora.files import read_tensors

    tensors, deltas = read_tensors(path), {}
    for key, down in tensors.items():
        for down_suffix, up_suffix in DOWN_UP:
            if key.endswith(down_suffix):
                component, _, module = key[: -len(down_suffix)].partition(".")
                deltas[(component, module)] = (down, tensors[key[: -len(down_suffix)] + up_suffix], scale)
    return deltas


def peft_deltas(models: dict) -> dict[tuple[str, str], tuple]:
    """(component, module) -> (A, B, scale) as PEFT applies them in memory."""
    deltas = {}
    for component, model in models.items():
        for name, layer in model.named_modules():
            if hasattr(layer, "lora_A") and "default" in layer.lora_A:
                deltas[(component, name)] = (layer.lora_A["default"].weight.detach().clone(),
                                             layer.lora_B["default"].weight.detach().clone(),
                                             layer.scaling["default"])
    return deltas


def render_merged_by_hand(pipe, deltas: dict) -> tuple[np.ndarray, torch.Tensor]:
    """Render with W + scale * B @ A written into the base weights (convolutions flattened to matrices)."""
    layers = []
    for (component, module), (down, up, scale) in deltas.items():
        model = getattr(pipe, component)
        layer = model.get_submodule(module if hasattr(model, "text_model") else module.removeprefix("text_model."))
        layers.append((layer, layer.weight.detach().clone(), scale * (up.flatten(1) @ down.flatten(1))))
    try:
        with torch.no_grad():
            for layer, weight, delta in layers:
                layer.weight += delta.reshape(weight.shape)
        return render(pipe)
    finally:
        with torch.no_grad():
            for layer, weight, _ in layers:
                layer.weight.copy_(weight)


def assert_close(a, b, tolerance: float = 2e-4) -> None:
    a, b = torch.as_tensor(np.asarray(a)), torch.as_tensor(np.asarray(b))
    assert (a - b).abs().max().item() < tolerance


def data_section_sha256(path: Path) -> str:
    blob = path.read_bytes()
    return hashlib.sha256(blob[8 + int.from_bytes(blob[:8], "little"):]).hexdigest()


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


def convert_cli(*argv: str) -> int:
    """utils/convert_lora.py in-process (one test runs it as a subprocess too)."""
    from utils.convert_lora import main

    return main([str(a) for a in argv])


# ----------------------------------------------------------------------------- names


def test_sdxl_names_are_kohyas_and_diffusers_converts_them_back():
    from utils.lora.kohya import SDXL_UNET_CONFIG, text_encoder_kohya_name, unet_kohya_names

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
    from utils.lora.kohya import load_unet_config, unet_kohya_names

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


def test_trained_lora_as_kohya_file_gives_the_same_image(trained_run, pipe, tmp_path):
    from utils.lora.files import TRAINING_METADATA_KEY, read_metadata, read_tensors

    source = trained_run / "final_model" / "pytorch_lora_weights.safetensors"
    output = tmp_path / "ghibli_kohya.safetensors"
    result = run_script("utils/convert_lora.py", str(trained_run / "final_model"), "--output", str(output))
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
    from utils.inference.generation import GenerationSettings, run_comparison
    from utils.lora.kohya import convert_diffusers_to_kohya

    kohya = convert_diffusers_to_kohya(trained_run / "final_model" / "pytorch_lora_weights.safetensors",
                                       tmp_path / "style.safetensors")
    run_script("inference_sdxl_ghibli.py", "--pretrained_model_name_or_path", str(tiny_model_dir),
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
    from utils.lora.kohya import convert_diffusers_to_kohya, read_diffusers_lora
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
    from utils.lora.kohya import KOHYA_WEIGHT_NAME, save_kohya_copy
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


def test_unmappable_keys_are_reported_not_dropped(trained_run, tiny_model_dir, tmp_path, capsys):
    from safetensors.torch import save_file

    from utils.lora.kohya import LoraConversionError, convert_kohya_to_diffusers, load_unet_config
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
