"""diffusers/PEFT LoRA files -> the kohya format (names, alphas, the ``ss_*`` header and the weights' hashes)."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from utils.core.names import SDXL_BASE_MODEL_VERSION
from utils.lora.files import (LORA_WEIGHT_NAME, TRAINING_METADATA_KEY, adapter_config, read_metadata, read_tensors,
                              save_safetensors)
from utils.lora.kohya_names import (COMPONENTS, CONVERSION_METADATA_KEY, KOHYA_WEIGHT_NAME, LoraConversionError, LoraModule, ParsedLora, most_common, safetensors_hashes, text_encoder_kohya_name, unet_config_for, unet_kohya_names, unet_layers)

logger = logging.getLogger(__name__)

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


def tensors_by_component(path: str | os.PathLike) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """The tensors of a project-format file grouped by component (``unet``, ``text_encoder``, ``text_encoder_2``,
    prefix removed), and one problem line per key without such a prefix."""
    weights: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in read_tensors(path).items():
        component, _, rest = key.partition(".")
        if component in COMPONENTS and rest:
            weights.setdefault(component, {})[rest] = tensor
        else:
            unknown.append(f"{key}: no unet./text_encoder./text_encoder_2. prefix")
    return weights, unknown


def read_diffusers_lora(path: str | os.PathLike) -> ParsedLora:
    """LoRA modules of a diffusers-format file (``unet.``/``text_encoder.``/``text_encoder_2.`` keys) and its header."""
    weights, unknown = tensors_by_component(path)
    configs = {component: adapter_config(path, component) for component in weights}
    parsed = modules_from_peft_weights(path, weights, configs)
    parsed.metadata, parsed.problems = read_metadata(path), unknown + parsed.problems
    return parsed


# ----------------------------------------------------------------------------- kohya names and files


def mapping_problems(modules: list[LoraModule], unet_config: Mapping[str, Any]) -> list[str]:
    """Modules that have no kohya name in this base model, by name or by shape."""
    layers = unet_layers(unet_config)
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


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.6g}"


def kohya_metadata(modules: list[LoraModule], source_metadata: Mapping[str, str], title: str | None = None,
                   rslora: bool = False) -> dict[str, str]:
    """The ``ss_*``/``modelspec.*`` header kohya's trainer writes, filled from our training metadata."""
    training = json.loads(source_metadata.get(TRAINING_METADATA_KEY) or "{}")
    components = {m.component for m in modules}
    dim, alpha = most_common(m.rank for m in modules), most_common(m.alpha for m in modules)
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
        "ss_loraplus_lr_ratio": training.get("loraplus_lr_ratio"),
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
    save_safetensors(tensors, path, metadata)
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
