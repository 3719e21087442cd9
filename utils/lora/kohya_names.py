"""kohya LoRA names: LoRA files in the kohya layout that ComfyUI, AUTOMATIC1111/Forge and InvokeAI load, to and from diffusers/PEFT.

kohya sd-scripts trains SDXL on the original (SGM/LDM) UNet, so its module names follow that
model, with dots replaced by underscores:

    lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight   (= PEFT lora_A)
    lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight     (= PEFT lora_B)
    lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.alpha              (scalar; scale = alpha / rank)
    lora_te1_text_model_encoder_layers_0_self_attn_q_proj.*   (CLIP ViT-L, text_encoder)
    lora_te2_text_model_encoder_layers_0_self_attn_q_proj.*   (OpenCLIP bigG, text_encoder_2)

The diffusers block -> SGM block index mapping is computed from the UNet config (layers per
block, block types), so it fits SDXL and the project's tiny test model alike.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch
from safetensors.torch import save as safetensors_bytes

from utils.core.errors import UserError
from utils.core.layout import KOHYA_WEIGHT_NAME  # noqa: F401  (the kohya copy beside a LoRA folder's weights)
from utils.core.names import SDXL_BASE_ID
from utils.lora.files import TRAINING_METADATA_KEY

logger = logging.getLogger(__name__)

CONVERSION_METADATA_KEY = "ghibli_kohya_conversion"
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}

# The UNet of stabilityai/stable-diffusion-xl-base-1.0 (its public unet/config.json), used when no
# base model config can be read: only the block layout matters for the names.
SDXL_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "center_input_sample": False,
    "flip_sin_to_cos": True, "freq_shift": 0, "block_out_channels": [320, 640, 1280], "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn", "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20], "cross_attention_dim": 2048, "use_linear_projection": True,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816, "norm_num_groups": 32, "act_fn": "silu",
}

# Inside a resnet the SGM UNet uses Sequential indices; kohya's SDXL UNet keeps them.
RESNET_PARTS = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
TOP_LEVEL = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
             "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
# The modules kohya's LoRA puts on a CLIP text encoder (CLIPAttention and CLIPMLP children).
TEXT_ENCODER_MODULE = re.compile(r"encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])")
KOHYA_TEXT_ENCODER_MODULE = re.compile(r"text_model_encoder_layers_(\d+)_(self_attn_(q|k|v|out)_proj|mlp_fc[12])")

# Suffixes of the diffusers/PEFT spellings of a LoRA weight (diffusers mixes them in one file).

class LoraConversionError(UserError, ValueError):
    """A LoRA file that cannot be converted; ``problems`` lists each key or module that could not be mapped."""

    def __init__(self, source: str | os.PathLike, reason: str, problems: Iterable[str] = ()):
        self.problems = list(problems)
        shown = "".join(f"\n  {problem}" for problem in self.problems)
        super().__init__(f"{source}: {reason}{shown}")


@dataclass
class LoraModule:
    """One LoRA'd layer: ``W' = W + (alpha / rank) * up @ down``."""

    component: str  # "unet", "text_encoder" or "text_encoder_2"
    module: str  # the diffusers/transformers module path, e.g. down_blocks.1.attentions.0.proj_in
    down: torch.Tensor  # PEFT lora_A, kohya lora_down: (rank, in_features[, kh, kw])
    up: torch.Tensor  # PEFT lora_B, kohya lora_up: (out_features, rank[, 1, 1])
    alpha: float  # in kohya's convention: the effective scale is alpha / rank

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass
class ParsedLora:
    """What a LoRA file holds: its modules, its header, and every key that could not be read as a LoRA weight."""

    modules: list[LoraModule]
    metadata: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    use_rslora: bool = False  # the alphas were converted from rsLoRA's alpha/sqrt(rank) scale


# ----------------------------------------------------------------------------- UNet names


def sgm_block_prefixes(config: Mapping[str, Any]) -> dict[str, str]:
    """Diffusers block prefixes and their SGM equivalents, e.g. down_blocks.1.attentions.0 -> input_blocks.4.1."""
    down_types, up_types = list(config["down_block_types"]), list(config["up_block_types"])
    layers = config["layers_per_block"]
    layers = list(layers) if isinstance(layers, (list, tuple)) else [layers] * len(down_types)
    prefixes: dict[str, str] = {}
    index = 1  # input_blocks.0 is conv_in
    for i, block_type in enumerate(down_types):
        for j in range(layers[i]):
            prefixes[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{index}.0"
            if "CrossAttn" in block_type:
                prefixes[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{index}.1"
            index += 1
        if i < len(down_types) - 1:
            prefixes[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{index}.0.op"
            index += 1
    if config.get("mid_block_type", "UNetMidBlock2DCrossAttn"):
        prefixes.update({"mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
                         "mid_block.resnets.1": "middle_block.2"})
    index = 0
    for i, (block_type, num_layers) in enumerate(zip(up_types, reversed(layers))):
        has_attention = "CrossAttn" in block_type
        for j in range(num_layers + 1):
            prefixes[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{index}.0"
            if has_attention:
                prefixes[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{index}.1"
            if j == num_layers and i < len(up_types) - 1:  # the upsampler closes the block's last layer
                prefixes[f"up_blocks.{i}.upsamplers.0"] = f"output_blocks.{index}.{2 if has_attention else 1}"
            index += 1
    return prefixes


def sgm_module_name(module: str, prefixes: Mapping[str, str]) -> str | None:
    """The SGM (original SDXL) path of a diffusers UNet module, or None when it has none."""
    if module in TOP_LEVEL:
        return TOP_LEVEL[module]
    for diffusers_prefix, sgm_prefix in prefixes.items():
        if module == diffusers_prefix:
            return sgm_prefix
        if module.startswith(diffusers_prefix + "."):
            rest = module[len(diffusers_prefix) + 1:]
            if ".resnets." in diffusers_prefix:
                rest = RESNET_PARTS.get(rest)
            return f"{sgm_prefix}.{rest}" if rest else None
    return None


def _config_key(config: Mapping[str, Any]) -> str:
    return json.dumps({k: v for k, v in config.items() if not k.startswith("_")}, sort_keys=True, default=str)


@functools.lru_cache(maxsize=4)
def _unet_layers(config_json: str) -> dict[str, tuple[str, tuple[int, ...], tuple[int, ...]]]:
    """Every Linear/Conv2d of the UNet built from the config on the meta device (no memory, no weights):
    diffusers path -> (kohya name, lora_down shape without rank, lora_up shape without rank)."""
    from diffusers import UNet2DConditionModel

    config = json.loads(config_json)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    prefixes = sgm_block_prefixes(config)
    layers = {}
    for name, layer in unet.named_modules():
        if isinstance(layer, torch.nn.Linear):
            shapes = ((layer.in_features,), (layer.out_features,))
        elif isinstance(layer, torch.nn.Conv2d):
            shapes = ((layer.in_channels, *layer.kernel_size), (layer.out_channels, 1, 1))
        else:
            continue
        sgm = sgm_module_name(name, prefixes)
        if sgm is not None:
            layers[name] = (KOHYA_PREFIXES["unet"] + sgm.replace(".", "_"), *shapes)
    return layers


def unet_kohya_names(config: Mapping[str, Any]) -> dict[str, str]:
    """Diffusers UNet module path -> kohya module name, for every Linear/Conv2d of the UNet."""
    return {module: names[0] for module, names in _unet_layers(_config_key(config)).items()}


def text_encoder_kohya_name(component: str, module: str) -> str | None:
    """kohya name of a CLIP module path (with or without transformers' ``text_model.`` prefix)."""
    module = module.removeprefix("text_model.")
    if not TEXT_ENCODER_MODULE.fullmatch(module):
        return None
    return KOHYA_PREFIXES[component] + "text_model_" + module.replace(".", "_")


def load_unet_config(base_model: str | None) -> dict[str, Any]:
    """The UNet config of a base model folder or Hub id; SDXL base 1.0's when none is given or readable."""
    if base_model and base_model != SDXL_BASE_ID:
        from diffusers import UNet2DConditionModel

        try:
            return dict(UNet2DConditionModel.load_config(base_model, subfolder="unet"))
        except (OSError, ValueError) as error:
            logger.warning("%s: no readable unet/config.json (%s); using the SDXL base 1.0 UNet layout",
                           base_model, str(error).splitlines()[0][:120])
    return dict(SDXL_UNET_CONFIG)


def unet_config_for(metadata: Mapping[str, str], base_model: str | None = None) -> dict[str, Any]:
    """The UNet layout for a LoRA file: ``base_model``'s if given, else that of the base model its header records."""
    recorded = json.loads(metadata.get(TRAINING_METADATA_KEY) or "{}").get("base_model")
    return load_unet_config(base_model or recorded)



def unet_layers(config: Mapping[str, Any]) -> dict[str, tuple[str, tuple[int, ...], tuple[int, ...]]]:
    """Every Linear/Conv2d of the UNet of ``config``: diffusers path -> (kohya name, down shape, up shape)."""
    return _unet_layers(_config_key(config))


# ----------------------------------------------------------------------------- shared by both directions


def safetensors_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """kohya's ``sshs_model_hash`` (sha256 of the file's data section, independent of the header) and
    ``sshs_legacy_hash`` (sd-webui-additional-networks' old short hash), as sd-scripts computes them."""
    blob = safetensors_bytes(dict(tensors), {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header_size = int.from_bytes(blob[:8], "little")
    return (hashlib.sha256(blob[8 + header_size:]).hexdigest(),
            hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8])


def most_common(values: Iterable[float]) -> float:
    return Counter(values).most_common(1)[0][0]
