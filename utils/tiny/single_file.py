"""A diffusers SDXL folder written as one single-file checkpoint, in the original (Stability/LDM) key names
that model sites ship and that ``StableDiffusionXLPipeline.from_single_file`` reads.

This is the inverse of diffusers' own single-file conversion (``diffusers.loaders.single_file_utils``:
``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint``, ``convert_open_clip_checkpoint``), for any
block count, so the tiny model can stand in for a downloaded ``.safetensors`` checkpoint in tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
CLIP_G_PREFIX = "conditioner.embedders.1.model."

UNET_FIXED = {
    "time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
    "add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2.",
    "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
}
UNET_RESNET = (("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("norm2.", "out_layers.0."),
               ("conv2.", "out_layers.3."), ("time_emb_proj.", "emb_layers.1."), ("conv_shortcut.", "skip_connection."))
VAE_ATTENTION = (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                 ("to_out.0.", "proj_out."))
CLIP_G_LAYER = (("layer_norm1.", "ln_1."), ("layer_norm2.", "ln_2."), ("mlp.fc1.", "mlp.c_fc."),
                ("mlp.fc2.", "mlp.c_proj."), ("self_attn.out_proj.", "attn.out_proj."))


def _rename(rest: str, pairs) -> str:
    for diffusers_name, ldm_name in pairs:
        if rest.startswith(diffusers_name):
            return ldm_name + rest[len(diffusers_name):]
    return rest


def _split(key: str, prefix: str) -> tuple[int, int | None, str] | None:
    """``prefix{a}.{kind}.{b}.rest`` -> (a, b, 'kind.rest'); None when ``key`` does not start with ``prefix``."""
    if not key.startswith(prefix):
        return None
    block, kind, index, rest = key[len(prefix):].split(".", 3)
    return int(block), int(index), f"{kind}.{rest}"


def unet_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    per_block = config["layers_per_block"] + 1  # LDM numbers a down block's resnets and its downsampler together
    up_attention = {int(key.split(".")[1]) for key in state if key.startswith("up_blocks.") and ".attentions." in key}
    out = {}
    for key, value in state.items():
        fixed = next((ldm + key[len(name):] for name, ldm in UNET_FIXED.items() if key.startswith(name)), None)
        if fixed:
            out[fixed] = value
            continue
        part, rest = key.split(".", 1)
        if part == "mid_block":
            kind, index, inner = rest.split(".", 2)
            position = 2 * int(index) if kind == "resnets" else 1
            out[f"middle_block.{position}.{_rename(inner, UNET_RESNET) if kind == 'resnets' else inner}"] = value
            continue
        block, index, inner = _split(key, f"{part}.")
        kind, inner = inner.split(".", 1)
        if part == "down_blocks":
            if kind == "downsamplers":  # downsamplers.0.conv.weight
                out[f"input_blocks.{(block + 1) * per_block}.0.op.{inner.split('.', 1)[1]}"] = value
            else:
                slot = "0" if kind == "resnets" else "1"
                inner = _rename(inner, UNET_RESNET) if kind == "resnets" else inner
                out[f"input_blocks.{block * per_block + index + 1}.{slot}.{inner}"] = value
        elif part == "up_blocks":
            if kind == "upsamplers":  # upsamplers.0.conv.weight
                slot = 2 if block in up_attention else 1
                out[f"output_blocks.{block * per_block + per_block - 1}.{slot}.{inner}"] = value
            else:
                slot = "0" if kind == "resnets" else "1"
                inner = _rename(inner, UNET_RESNET) if kind == "resnets" else inner
                out[f"output_blocks.{block * per_block + index}.{slot}.{inner}"] = value
        else:
            raise ValueError(f"unet weight {key}: no place in the original layout")
    return {UNET_PREFIX + key: value for key, value in out.items()}


def vae_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    blocks = len(config["up_block_types"])
    out = {}
    for key, value in state.items():
        side, rest = key.split(".", 1) if key.startswith(("encoder.", "decoder.")) else ("", key)
        if rest.startswith("conv_norm_out."):
            rest = "norm_out." + rest[len("conv_norm_out."):]
        elif rest.startswith(("down_blocks.", "up_blocks.")):
            part, block, kind, index, inner = rest.split(".", 4)
            block = int(block) if part == "down_blocks" else blocks - 1 - int(block)
            name = "down" if part == "down_blocks" else "up"
            if kind == "resnets":
                rest = f"{name}.{block}.block.{index}.{inner.replace('conv_shortcut.', 'nin_shortcut.')}"
            else:  # downsamplers.0.conv.* / upsamplers.0.conv.*
                rest = f"{name}.{block}.{'downsample' if name == 'down' else 'upsample'}.{inner}"
        elif rest.startswith("mid_block.resnets."):
            _, _, index, inner = rest.split(".", 3)
            rest = f"mid.block_{int(index) + 1}.{inner.replace('conv_shortcut.', 'nin_shortcut.')}"
        elif rest.startswith("mid_block.attentions.0."):
            rest = "mid.attn_1." + _rename(rest[len("mid_block.attentions.0."):], VAE_ATTENTION)
            if rest.endswith(".weight") and value.ndim == 2:  # the original's attention is 1x1 convolutions
                value = value[:, :, None, None]
        out[f"{side}.{rest}" if side else rest] = value
    return {VAE_PREFIX + key: value for key, value in out.items()}


def open_clip_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    layers = "text_model.encoder.layers."
    for key, value in state.items():
        if key == "text_model.embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif key == "text_model.embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif key.startswith("text_model.final_layer_norm."):
            out["ln_final." + key.rsplit(".", 1)[1]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
        elif key.startswith(layers):
            index, inner = key[len(layers):].split(".", 1)
            if inner.startswith("self_attn.") and inner.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                projection, kind = inner.split(".")[1:3]
                qkv.setdefault(f"transformer.resblocks.{index}.attn.in_proj_{kind}", {})[projection] = value
            else:
                out[f"transformer.resblocks.{index}.{_rename(inner, CLIP_G_LAYER)}"] = value
        elif not key.endswith("position_ids"):
            raise ValueError(f"text_encoder_2 weight {key}: no place in the OpenCLIP layout")
    for name, parts in qkv.items():
        out[name] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]])
    return {CLIP_G_PREFIX + key: value for key, value in out.items()}


def clip_l_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The CLIP-L keys under the original's prefix, as ``text_model.*`` (transformers 5.6+ saves CLIPTextModel
    without that level; checkpoints from model sites have it, and diffusers looks for it)."""
    return {CLIP_L_PREFIX + (key if key.startswith("text_model.") else f"text_model.{key}"): value
            for key, value in state.items() if not key.endswith("position_ids")}


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    (path,) = [p for p in folder.glob("*.safetensors")]
    return load_file(str(path))


def save_single_file(model_dir: str | Path, path: str | Path) -> Path:
    """Write the SDXL pipeline saved in ``model_dir`` (diffusers layout, safetensors) as one ``.safetensors``
    checkpoint with the original key names; return its path."""
    model_dir, path = Path(model_dir), Path(path)
    unet_config = json.loads((model_dir / "unet" / "config.json").read_text())
    vae_config = json.loads((model_dir / "vae" / "config.json").read_text())
    state = {**unet_to_ldm(_weights(model_dir / "unet"), unet_config),
             **vae_to_ldm(_weights(model_dir / "vae"), vae_config),
             **clip_l_to_ldm(_weights(model_dir / "text_encoder")),
             **open_clip_to_ldm(_weights(model_dir / "text_encoder_2"))}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({key: value.contiguous() for key, value in state.items()}, str(path))
    return path


def save_tiny_single_file_sdxl(model_dir: str | Path, checkpoint: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """A tiny SDXL saved twice: as a diffusers folder (the ``--model_config`` of its checkpoint) and as the
    single-file checkpoint; returns (folder, checkpoint).

    Unlike utils/tiny/sdxl.py's model, its second text encoder is wider than the first (48 and 32, as SDXL's
    1280 and 768): diffusers tells the two encoders of a single file apart by their widths alone.
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from utils.tiny.sdxl import _tiny_vae, build_tokenizer_files, sdxl_pipeline

    vocab, merges = build_tokenizer_files()
    torch.manual_seed(seed)
    common = dict(vocab_size=len(vocab), intermediate_size=64, num_attention_heads=4, num_hidden_layers=3,
                  max_position_embeddings=77, projection_dim=32, hidden_act="gelu",
                  bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                  pad_token_id=vocab["<|endoftext|>"])
    encoders = (CLIPTextModel(CLIPTextConfig(hidden_size=32, **common)),
                CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=48, **common)))
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn", transformer_layers_per_block=(1, 1), attention_head_dim=(2, 4),
        cross_attention_dim=32 + 48, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32, norm_num_groups=32)
    model_dir = Path(model_dir)
    sdxl_pipeline(vocab, merges, encoders, unet, _tiny_vae()).save_pretrained(model_dir)
    return model_dir, save_single_file(model_dir, checkpoint)
