"""Saving and reading LoRA files in the diffusers format, with their metadata.

The file holds PEFT's ``lora_A``/``lora_B`` weights under ``unet.``,
``text_encoder.`` and ``text_encoder_2.`` prefixes, plus diffusers' adapter
metadata (rank, alpha, target modules...) so ``pipe.load_lora_weights(folder)``
restores the trained alpha/rank scale instead of silently using 1.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from utils.core.atomic import replace_dir, replace_file
from utils.core.names import LORA_WEIGHT_NAME

ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers' key for the PEFT config
TRAINING_METADATA_KEY = "ghibli_training"


def _adapter_layers(model, adapter_name: str = "default") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The LoRA weights of a PEFT-injected model's adapter (PEFT ``lora_A``/``lora_B`` keys, without the
    adapter's name) and its config.

    The keys are not converted to the older ``lora.down``/``lora.up`` names: that conversion renames
    only attention layers, and diffusers decides a file's format from its first key, so a mixed
    file would silently lose the attention LoRA when loaded.
    """
    from peft.utils import get_peft_model_state_dict

    layers = get_peft_model_state_dict(model, adapter_name=adapter_name)
    layers = {key: value.detach().to("cpu", torch.float32).contiguous() for key, value in layers.items()}
    return layers, model.peft_config[adapter_name].to_dict()


def save_lora(folder: str | os.PathLike, unet, text_encoders: list | None = None,
              training_metadata: dict[str, Any] | None = None,
              extra_files: Callable[[Path], None] | None = None, adapter_name: str = "default") -> Path:
    """Write ``folder/pytorch_lora_weights.safetensors`` atomically (a temp folder renamed into place).

    ``text_encoders`` are saved too when given (both SDXL encoders, when trained). ``adapter_name``: which of
    the models' adapters (one run of a pack); the file is the same as that adapter's alone.
    ``training_metadata`` is stored as JSON in the safetensors header, with a hash of the
    weights; it must hold no secrets. ``extra_files(staging_folder)`` may add files (e.g. a
    kohya-format copy) before the folder is swapped into place.
    """
    from diffusers import StableDiffusionXLPipeline

    folder = Path(folder)
    unet_layers, unet_config = _adapter_layers(unet, adapter_name)
    kwargs: dict[str, Any] = {"unet_lora_layers": unet_layers, "unet_lora_adapter_metadata": unet_config}
    for name, encoder in zip(("text_encoder", "text_encoder_2"), text_encoders or []):
        kwargs[f"{name}_lora_layers"], kwargs[f"{name}_lora_adapter_metadata"] = _adapter_layers(encoder,
                                                                                                 adapter_name)

    for name, layers in kwargs.items():
        if name.endswith("_layers") and not all(bool(torch.isfinite(t).all()) for t in layers.values()):
            raise ValueError(f"{folder}: refusing to save LoRA weights that contain NaN or Inf ({name})")

    def write(staging: Path) -> None:
        StableDiffusionXLPipeline.save_lora_weights(staging, **kwargs)
        extra = {"sshs_model_hash": file_weights_sha256(staging / LORA_WEIGHT_NAME)}
        if training_metadata:
            extra[TRAINING_METADATA_KEY] = json.dumps(training_metadata)
        add_metadata(staging / LORA_WEIGHT_NAME, extra)
        if extra_files:
            extra_files(staging)

    replace_dir(folder, write)
    return folder / LORA_WEIGHT_NAME


def file_weights_sha256(path: str | os.PathLike) -> str:
    """sha256 of a safetensors file's data section (kohya's ``sshs_model_hash``): unchanged by header edits."""
    with open(path, "rb") as handle:
        header_size = int.from_bytes(handle.read(8), "little")
        handle.seek(8 + header_size)
        digest = hashlib.sha256()
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


def add_metadata(path: str | os.PathLike, extra: dict[str, str]) -> None:
    """Rewrite a safetensors file with ``extra`` merged into its header metadata (atomically)."""
    path = Path(path)
    tensors, metadata = read_tensors(path), read_metadata(path)
    metadata.update(extra)
    save_safetensors(tensors, path, metadata)


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str]) -> None:
    """Write a safetensors file with header ``metadata`` (atomically)."""
    replace_file(path, lambda temporary: save_file(dict(tensors), str(temporary), metadata=dict(metadata)))


def adapter_config(path: str | os.PathLike, component: str = "unet") -> dict[str, Any]:
    """The PEFT config (rank ``r``, ``lora_alpha``...) saved for one component of a LoRA file."""
    packed = json.loads(read_metadata(path).get(ADAPTER_METADATA_KEY, "{}"))
    prefix = f"{component}."
    return {key[len(prefix):]: value for key, value in packed.items() if key.startswith(prefix)}
