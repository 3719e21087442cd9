"""LoRA files in the kohya layout that ComfyUI, AUTOMATIC1111/Forge and InvokeAI load, to and from diffusers/PEFT.

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
import math
import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from safetensors.torch import save as safetensors_bytes
from safetensors.torch import save_file

from utils.core.atomic import replace_file
from utils.lora.files import (ADAPTER_METADATA_KEY, LORA_WEIGHT_NAME, TRAINING_METADATA_KEY, adapter_config, read_metadata, read_tensors)

logger = logging.getLogger(__name__)

KOHYA_WEIGHT_NAME = "kohya_lora.safetensors"  # must not end with diffusers' pytorch_lora_weights.safetensors
CONVERSION_METADATA_KEY = "ghibli_kohya_conversion"
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
SDXL_BASE_MODEL_VERSION = "sdxl_base_v1-0"
SDXL_BASE_MODEL_ID = "stabilityai/stable-diffusion-xl-base-1.0"

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
DIFFUSERS_SUFFIXES = [
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    ("_lora.down.weight", "old_down"), ("_lora.up.weight", "old_up"),  # attention processors: to_q_lora.down
    (".alpha", "alpha"),
]
OLD_PROCESSOR_NAMES = {
    "unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
    "text_encoder": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"},
}
DORA_MESSAGE = ("DoRA adapters (use_dora / lora_magnitude_vector) have no kohya networks.lora form: a DoRA "
                "module rescales the whole merged weight, which alpha/rank cannot express; LyCORIS' dora_scale "
                "key is read differently by different tools. Use the diffusers file, or train without --use_dora")


class LoraConversionError(ValueError):
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
    if base_model and base_model != SDXL_BASE_MODEL_ID:
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


# ----------------------------------------------------------------------------- reading diffusers / PEFT files


def _split_diffusers_key(component: str, key: str) -> tuple[str, str] | None:
    """(module path, role) of one key of a component's LoRA weights, or None if it is no LoRA weight."""
    for suffix, role in DIFFUSERS_SUFFIXES:
        if key.endswith(suffix):
            module = key[: -len(suffix)].replace(".processor.", ".")
            if role.startswith("old_"):
                parent, _, last = module.rpartition(".")
                renamed = OLD_PROCESSOR_NAMES["unet" if component == "unet" else "text_encoder"].get(last)
                if renamed is None:
                    return None
                module, role = f"{parent}.{renamed}", role[len("old_"):]
            return module, role
    return None


def _config_alpha(config: Mapping[str, Any], module: str, rank: int) -> float:
    """The kohya alpha giving this module the scale PEFT gives it (alpha/r, or alpha/sqrt(r) with rsLoRA)."""
    from peft.utils.other import get_pattern_key

    if not config:
        return float(rank)  # no metadata: diffusers loads such a file with scale 1
    alpha = config.get("lora_alpha", rank)
    pattern = config.get("alpha_pattern") or {}
    if pattern:
        alpha = pattern.get(get_pattern_key(list(pattern), module), alpha)
    if config.get("use_rslora"):
        return float(alpha) * math.sqrt(rank)  # kohya's alpha/r then equals rsLoRA's alpha/sqrt(r)
    return float(alpha)


def modules_from_peft_weights(source: str | os.PathLike, weights: Mapping[str, Mapping[str, torch.Tensor]],
                              configs: Mapping[str, Mapping[str, Any]]) -> ParsedLora:
    """LoRA modules from per-component weights in diffusers/PEFT naming and their PEFT configs."""
    if any(config.get("use_dora") for config in configs.values()) or any(
            "lora_magnitude_vector" in key for tensors in weights.values() for key in tensors):
        raise LoraConversionError(source, DORA_MESSAGE)
    modules, problems = [], []
    for component, tensors in weights.items():
        if not configs.get(component) and not any(key.endswith(".alpha") for key in tensors):
            logger.warning("%s: no alpha recorded for %s; assuming alpha = rank (scale 1), as diffusers does",
                           source, component)
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            split = _split_diffusers_key(component, key)
            if split is None:
                problems.append(f"{component}.{key}: not a LoRA down/up/alpha weight")
                continue
            parts.setdefault(split[0], {})[split[1]] = tensor
        for module, part in sorted(parts.items()):
            if "down" not in part or "up" not in part:
                problems.append(f"{component}.{module}: has no {'up' if 'down' in part else 'down'} weight")
                continue
            rank = int(part["down"].shape[0])
            alpha = float(part["alpha"]) if "alpha" in part else _config_alpha(configs.get(component, {}), module,
                                                                                 rank)
            modules.append(LoraModule(component, module, part["down"], part["up"], alpha))
    return ParsedLora(modules, {}, problems, any(config.get("use_rslora") for config in configs.values()))


def read_diffusers_lora(path: str | os.PathLike) -> ParsedLora:
    """LoRA modules of a diffusers-format file (``unet.``/``text_encoder.``/``text_encoder_2.`` keys) and its header."""
    tensors = read_tensors(path)
    weights: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in tensors.items():
        component, _, rest = key.partition(".")
        if component in COMPONENTS and rest:
            weights.setdefault(component, {})[rest] = tensor
        else:
            unknown.append(f"{key}: no unet./text_encoder./text_encoder_2. prefix")
    configs = {component: adapter_config(path, component) for component in weights}
    parsed = modules_from_peft_weights(path, weights, configs)
    parsed.metadata, parsed.problems = read_metadata(path), unknown + parsed.problems
    return parsed


# ----------------------------------------------------------------------------- kohya names and files


def mapping_problems(modules: list[LoraModule], unet_config: Mapping[str, Any]) -> list[str]:
    """Modules that have no kohya name in this base model, by name or by shape."""
    layers = _unet_layers(_config_key(unet_config))
    problems = []
    for m in modules:
        if m.component == "unet":
            if m.module not in layers:
                problems.append(f"unet.{m.module}: no such Linear/Conv2d in the UNet (or no SGM name for it)")
                continue
            _, down_shape, up_shape = layers[m.module]
            if tuple(m.down.shape[1:]) != down_shape or (tuple(m.up.shape[:1]) + tuple(m.up.shape[2:])) != up_shape:
                problems.append(f"unet.{m.module}: shapes {tuple(m.down.shape)}/{tuple(m.up.shape)} do not fit the "
                                "UNet of the base model (wrong --pretrained_model_name_or_path?)")
        elif text_encoder_kohya_name(m.component, m.module) is None:
            problems.append(f"{m.component}.{m.module}: kohya LoRA has no name for this text-encoder module")
        if m.up.shape[1] != m.rank:
            problems.append(f"{m.component}.{m.module}: up and down weights disagree on the rank")
    return problems


def kohya_name(module: LoraModule, unet_config: Mapping[str, Any]) -> str:
    if module.component == "unet":
        return unet_kohya_names(unet_config)[module.module]
    return text_encoder_kohya_name(module.component, module.module)


def kohya_tensors(modules: list[LoraModule], unet_config: Mapping[str, Any],
                  dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    tensors = {}
    for m in modules:
        name = kohya_name(m, unet_config)
        tensors[f"{name}.lora_down.weight"] = m.down.to(dtype or m.down.dtype).contiguous()
        tensors[f"{name}.lora_up.weight"] = m.up.to(dtype or m.up.dtype).contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(m.alpha, dtype=torch.float32)
    return tensors


def safetensors_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """kohya's ``sshs_model_hash`` (sha256 of the file's data section, independent of the header) and
    ``sshs_legacy_hash`` (sd-webui-additional-networks' old short hash), as sd-scripts computes them."""
    blob = safetensors_bytes(dict(tensors), {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header_size = int.from_bytes(blob[:8], "little")
    return (hashlib.sha256(blob[8 + header_size:]).hexdigest(),
            hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8])


def _most_common(values: Iterable[float]) -> float:
    return Counter(values).most_common(1)[0][0]


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.6g}"


def kohya_metadata(modules: list[LoraModule], source_metadata: Mapping[str, str], title: str | None = None,
                   rslora: bool = False) -> dict[str, str]:
    """The ``ss_*``/``modelspec.*`` header kohya's trainer writes, filled from our training metadata."""
    training = json.loads(source_metadata.get(TRAINING_METADATA_KEY) or "{}")
    components = {m.component for m in modules}
    dim, alpha = _most_common(m.rank for m in modules), _most_common(m.alpha for m in modules)
    comment = f"{title or 'SDXL LoRA'}; converted from the diffusers/PEFT format"
    if rslora:
        comment += (f"; trained with rsLoRA (scale alpha/sqrt(rank)), so ss_network_alpha = lora_alpha*sqrt(rank) "
                    f"= {_number(alpha)} gives kohya's alpha/rank the same scale")
    resolution = training.get("resolution")
    values: dict[str, Any] = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": dim,
        "ss_network_alpha": _number(alpha),
        "ss_base_model_version": training.get("base_model_version") or SDXL_BASE_MODEL_VERSION,
        "ss_v2": False,
        "ss_network_train_unet_only": components == {"unet"},
        "ss_network_train_text_encoder_only": "unet" not in components,
        "ss_sd_model_name": training.get("base_model"),
        "ss_resolution": f"({resolution}, {resolution})" if resolution else None,
        "ss_steps": training.get("steps"),
        "ss_epoch": training.get("epoch"),
        "ss_max_train_steps": training.get("max_train_steps"),
        "ss_learning_rate": training.get("learning_rate"),
        "ss_lr_scheduler": training.get("lr_scheduler"),
        "ss_optimizer": training.get("optimizer"),
        "ss_batch_size_per_device": training.get("train_batch_size"),
        "ss_gradient_accumulation_steps": training.get("gradient_accumulation_steps"),
        "ss_mixed_precision": training.get("mixed_precision"),
        "ss_seed": training.get("seed"),
        "ss_noise_offset": training.get("noise_offset"),
        "ss_min_snr_gamma": training.get("snr_gamma"),
        "ss_num_train_images": training.get("num_train_images"),
        "ss_tag_frequency": json.dumps({"dataset": training["tag_frequency"]}, ensure_ascii=False)
        if training.get("tag_frequency") else None,
        "ss_training_comment": comment,
        "ss_training_command": training.get("training_command"),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": title or "SDXL LoRA",
        "modelspec.resolution": f"{resolution}x{resolution}" if resolution else None,
    }
    metadata = {key: str(value) for key, value in values.items() if value is not None}
    if TRAINING_METADATA_KEY in source_metadata:
        metadata[TRAINING_METADATA_KEY] = source_metadata[TRAINING_METADATA_KEY]
    metadata[CONVERSION_METADATA_KEY] = json.dumps({
        "from": "diffusers/peft", "use_rslora": rslora,
        "alpha": "per module; kohya scale alpha/rank equals the trained scale"
                 + (" (rsLoRA: alpha = lora_alpha*sqrt(rank))" if rslora else ""),
    })
    return metadata


def _atomic_save(tensors: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str]) -> None:
    replace_file(path, lambda temporary: save_file(dict(tensors), str(temporary), metadata=dict(metadata)))


def write_kohya_lora(parsed: ParsedLora, path: str | os.PathLike, unet_config: Mapping[str, Any],
                     title: str | None = None, dtype: torch.dtype | None = None,
                     source: str | os.PathLike = "LoRA") -> Path:
    """Write a LoRA as a kohya-format file (atomically), with ``ss_*`` metadata and the weights' hashes.

    Nothing is written when any key or module cannot be mapped: all of them are listed in the error.
    """
    problems = parsed.problems + mapping_problems(parsed.modules, unet_config)
    if problems:
        raise LoraConversionError(source, f"{len(problems)} key(s) cannot be mapped to kohya names", problems)
    if not parsed.modules:
        raise LoraConversionError(source, "holds no LoRA weights")
    tensors = kohya_tensors(parsed.modules, unet_config, dtype)
    metadata = kohya_metadata(parsed.modules, parsed.metadata, title, parsed.use_rslora)
    metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = safetensors_hashes(tensors, metadata)
    path = Path(path)
    _atomic_save(tensors, path, metadata)
    return path


def convert_diffusers_to_kohya(source: str | os.PathLike, destination: str | os.PathLike,
                               unet_config: Mapping[str, Any] | None = None, title: str | None = None,
                               dtype: torch.dtype | None = None) -> Path:
    """A diffusers-format LoRA file -> a kohya-format file. ``unet_config`` defaults to the recorded base model's."""
    parsed = read_diffusers_lora(source)
    unet_config = unet_config if unet_config is not None else unet_config_for(parsed.metadata)
    return write_kohya_lora(parsed, destination, unet_config, title, dtype, source)


def save_kohya_copy(folder: str | os.PathLike, unet_config: Mapping[str, Any] | None = None,
                    title: str | None = None) -> Path:
    """Beside ``folder/pytorch_lora_weights.safetensors``, write ``folder/kohya_lora.safetensors``.

    The training hook: ``save_kohya_copy(folder, unet.config)`` after ``save_lora``.
    """
    folder = Path(folder)
    return convert_diffusers_to_kohya(folder / LORA_WEIGHT_NAME, folder / KOHYA_WEIGHT_NAME, unet_config,
                                      title or folder.parent.name or None)


# ----------------------------------------------------------------------------- kohya -> diffusers


def is_kohya_state_dict(keys: Iterable[str]) -> bool:
    keys = list(keys)
    return bool(keys) and all(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys)


def _diffusers_module(name: str, unet_modules: Mapping[str, str]) -> tuple[str, str] | None:
    """(component, module path) of a kohya module name."""
    if name.startswith(KOHYA_PREFIXES["unet"]):
        module = unet_modules.get(name)
        return ("unet", module) if module else None
    for prefix, component in (("lora_te1_", "text_encoder"), ("lora_te_", "text_encoder"),
                              ("lora_te2_", "text_encoder_2")):
        if name.startswith(prefix):
            rest = name[len(prefix):]
            match = KOHYA_TEXT_ENCODER_MODULE.fullmatch(rest)
            if not match:
                return None
            part = match.group(2).replace("self_attn_", "self_attn.").replace("mlp_", "mlp.")
            return component, f"text_model.encoder.layers.{match.group(1)}.{part}"
    return None


def read_kohya_lora(path: str | os.PathLike, unet_config: Mapping[str, Any]) -> ParsedLora:
    """LoRA modules of a kohya-format SDXL file, in diffusers naming; every key must map, else all are listed."""
    tensors = read_tensors(path)
    unet_modules = {name: module for module, name in unet_kohya_names(unet_config).items()}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    problems = []
    for key, tensor in tensors.items():
        name, _, role = key.partition(".")
        if role not in ("lora_down.weight", "lora_up.weight", "alpha"):
            reason = "DoRA (dora_scale) is not supported" if role == "dora_scale" else "not a kohya LoRA weight"
            problems.append(f"{key}: {reason}")
            continue
        parts.setdefault(name, {})[role] = tensor
    modules = []
    for name, part in sorted(parts.items()):
        target = _diffusers_module(name, unet_modules)
        if target is None:
            problems.append(f"{name}: no module of the SDXL UNet/text encoders has this kohya name")
        elif "lora_down.weight" not in part or "lora_up.weight" not in part:
            problems.append(f"{name}: has no {'lora_up' if 'lora_down.weight' in part else 'lora_down'} weight")
        else:
            down, up = part["lora_down.weight"], part["lora_up.weight"]
            alpha = float(part["alpha"]) if "alpha" in part else float(down.shape[0])  # kohya: no alpha = rank
            modules.append(LoraModule(target[0], target[1], down, up, alpha))
    if not modules and not problems:
        problems.append("no lora_down/lora_up weights at all")
    if problems:
        raise LoraConversionError(path, f"{len(problems)} key(s) cannot be mapped", problems)
    return ParsedLora(modules, read_metadata(path))


def peft_adapter_config(modules: list[LoraModule]) -> dict[str, Any]:
    """A plain (non-rsLoRA) PEFT LoraConfig dict reproducing each module's rank and alpha."""
    from peft import LoraConfig

    # Text-encoder names without transformers' "text_model." prefix match both the flattened CLIPTextModel
    # of recent transformers and the older nested one (PEFT matches target names by suffix).
    def name(m: LoraModule) -> str:
        return m.module.removeprefix("text_model.")

    rank, alpha = _most_common(m.rank for m in modules), _most_common(m.alpha for m in modules)
    config = LoraConfig(
        r=int(rank), lora_alpha=alpha, target_modules=sorted({name(m) for m in modules}),
        rank_pattern={name(m): m.rank for m in modules if m.rank != rank},
        alpha_pattern={name(m): m.alpha for m in modules if m.alpha != alpha},
    )
    return config.to_dict()


def write_diffusers_lora(modules: list[LoraModule], path: str | os.PathLike,
                         extra_metadata: Mapping[str, str] | None = None) -> Path:
    """Write modules as a diffusers-format file (PEFT keys + adapter metadata) that ``load_lora_weights`` reads."""
    from diffusers import StableDiffusionXLPipeline

    path = Path(path)
    kwargs: dict[str, Any] = {}
    for component in COMPONENTS:
        chosen = [m for m in modules if m.component == component]
        if chosen:
            layers = {}
            for m in chosen:
                layers[f"{m.module}.lora_A.weight"] = m.down.contiguous()
                layers[f"{m.module}.lora_B.weight"] = m.up.contiguous()
            kwargs[f"{component}_lora_layers"] = layers
            kwargs[f"{component}_lora_adapter_metadata"] = peft_adapter_config(chosen)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as staging:
        StableDiffusionXLPipeline.save_lora_weights(staging, weight_name=path.name, **kwargs)
        tensors, metadata = read_tensors(Path(staging) / path.name), read_metadata(Path(staging) / path.name)
    # The source's own hashes describe other bytes: drop them, and hash this file's weights.
    metadata.update({k: v for k, v in (extra_metadata or {}).items()
                     if k != ADAPTER_METADATA_KEY and not k.startswith(("sshs_", "modelspec.hash"))})
    metadata["sshs_model_hash"] = safetensors_hashes(tensors, {})[0]
    _atomic_save(tensors, path, metadata)
    return path


def convert_kohya_to_diffusers(source: str | os.PathLike, destination: str | os.PathLike,
                               unet_config: Mapping[str, Any] | None = None) -> Path:
    """A kohya-format SDXL LoRA file -> a diffusers-format file; the ``ss_*`` header is carried over."""
    unet_config = unet_config if unet_config is not None else unet_config_for(read_metadata(source))
    parsed = read_kohya_lora(source, unet_config)
    return write_diffusers_lora(parsed.modules, destination, parsed.metadata)
