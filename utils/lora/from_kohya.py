"""kohya-format SDXL LoRA files -> the diffusers format that ``load_lora_weights`` reads."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from utils.lora.files import ADAPTER_METADATA_KEY, read_metadata, read_tensors, save_safetensors
from utils.lora.kohya_names import (COMPONENTS, KOHYA_PREFIXES, KOHYA_TEXT_ENCODER_MODULE, LoraConversionError, LoraModule, ParsedLora, most_common, safetensors_hashes, unet_config_for, unet_kohya_names)


def is_kohya_state_dict(keys: Iterable[str]) -> bool:
    keys = list(keys)
    return bool(keys) and all(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys)


def diffusers_module(name: str, unet_modules: Mapping[str, str]) -> tuple[str, str] | None:
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
        target = diffusers_module(name, unet_modules)
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

    rank, alpha = most_common(m.rank for m in modules), most_common(m.alpha for m in modules)
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
    save_safetensors(tensors, path, metadata)
    return path


def convert_kohya_to_diffusers(source: str | os.PathLike, destination: str | os.PathLike,
                               unet_config: Mapping[str, Any] | None = None) -> Path:
    """A kohya-format SDXL LoRA file -> a diffusers-format file; the ``ss_*`` header is carried over."""
    unet_config = unet_config if unet_config is not None else unet_config_for(read_metadata(source))
    parsed = read_kohya_lora(source, unet_config)
    return write_diffusers_lora(parsed.modules, destination, parsed.metadata)
