"""LoHa/LoKr files: the project's own file (PEFT weights under ``unet.``/``text_encoder*.`` with the PEFT
config in diffusers' ``lora_adapter_metadata``) and the kohya/LyCORIS file that ComfyUI, AUTOMATIC1111/Forge
and kohya read (``lora_unet_…`` names, ``hada_*``/``lokr_*`` weights, ``alpha``, ``ss_network_module``
``lycoris.kohya``). Plain LoRA files go through ``to_kohya``/``from_kohya``; ``save_kohya_copy`` picks.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from utils.core.names import LORA_WEIGHT_NAME
from utils.lora.files import (ADAPTER_METADATA_KEY, TRAINING_METADATA_KEY, adapter_config, read_metadata, read_tensors,
                              save_safetensors)
from utils.lora.from_kohya import diffusers_module
from utils.lora.kohya_names import (COMPONENTS, CONVERSION_METADATA_KEY, KOHYA_WEIGHT_NAME, LoraConversionError,
                                    safetensors_hashes, text_encoder_kohya_name, unet_config_for, unet_kohya_names,
                                    unet_layers)
from utils.lora.lokr_forms import lycoris_builds, peft_form, whole_form
from utils.lora.lycoris import (LycorisModule, adapter_type, group_roles, kind_of_roles, modules_from_peft,
                                peft_config_dict)
from utils.lora.to_kohya import convert_diffusers_to_kohya, kohya_metadata, kohya_name, tensors_by_component

logger = logging.getLogger(__name__)

LYCORIS_NETWORK_MODULE = "lycoris.kohya"


def file_adapter_type(path: str | os.PathLike) -> str:
    """'lora', 'loha' or 'lokr' of a diffusers-format or kohya-format safetensors file."""
    configs = [adapter_config(path, component) for component in COMPONENTS]
    for config in configs:
        if config:
            return adapter_type(config)
    with_roles = kind_of_roles({key.rpartition(".")[2] for key in read_tensors(path)})
    return with_roles or "lora"


def network_args(kind: str, configs: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """kohya's ``ss_network_args`` for LyCORIS (``--network_args`` values, as strings)."""
    args = {"algo": kind}
    if kind == "lokr":
        config = next(iter(configs.values()))
        args["factor"] = str(config.get("decompose_factor", -1))
        args["decompose_both"] = str(bool(config.get("decompose_both", False)))
    return args


def read_diffusers_lycoris(path: str | os.PathLike) -> tuple[list[LycorisModule], dict[str, str], dict[str, str]]:
    """(modules, header, network args) of the project's LoHa/LoKr file; unreadable keys are all listed."""
    weights, problems = tensors_by_component(path)
    configs = {component: adapter_config(path, component) for component in weights}
    modules, more = modules_from_peft(path, weights, configs)
    if problems + more:
        raise LoraConversionError(path, f"{len(problems + more)} key(s) cannot be read", problems + more)
    return modules, read_metadata(path), network_args(modules[0].kind, configs)


def mapping_problems(modules: list[LycorisModule], unet_config: Mapping[str, Any]) -> list[str]:
    """Modules without a kohya name in this base model, or whose delta does not fit the layer's shape."""
    layers = unet_layers(unet_config)
    problems = []
    for m in modules:
        if m.component != "unet":
            if text_encoder_kohya_name(m.component, m.module) is None:
                problems.append(f"{m.component}.{m.module}: kohya has no name for this text-encoder module")
            continue
        if m.module not in layers:
            problems.append(f"unet.{m.module}: no such Linear/Conv2d in the UNet (or no SGM name for it)")
            continue
        _, down_shape, up_shape = layers[m.module]
        expected = (up_shape[0], int(torch.Size(down_shape).numel()))
        if m.flat_shape() != expected:
            problems.append(f"unet.{m.module}: a delta of {m.flat_shape()} does not fit the UNet layer's {expected} "
                            "(wrong --pretrained_model_name_or_path?)")
    return problems


def layer_shape(m: LycorisModule, unet_config: Mapping[str, Any]) -> tuple[int, ...]:
    """The (out, in) or (out, in, kh, kw) shape of the layer a module belongs to (text encoders: Linear only)."""
    if m.component != "unet":
        return m.flat_shape()
    _, down_shape, up_shape = unet_layers(unet_config)[m.module]
    return (up_shape[0], *down_shape)


def in_lycoris_shapes(modules: list[LycorisModule], unet_config: Mapping[str, Any]) -> tuple[list[LycorisModule], int]:
    """The modules with each LoKr module that kohya's LyCORIS loader cannot rebuild (a ``--lokr_factor`` larger
    than the square root of the layer's width) in the whole LoKr form, which every tool reads exactly; and how
    many those are."""
    whole, widths = [], []
    for i, m in enumerate(modules):
        if m.kind != "lokr":
            continue
        shape = layer_shape(m, unet_config)
        widths += shape[:2]
        if not lycoris_builds(m.weights, shape):
            modules[i] = LycorisModule(m.component, m.module, m.kind, whole_form(m.weights, m.scale, shape), 1.0)
            whole.append(modules[i])
    if whole:
        size = sum(m.weights["lokr_w2"].nbytes for m in whole) / 2**20
        _warn_once(f"{len(whole)} LoKr module(s), e.g. {whole[0].component}.{whole[0].module}, are written whole in "
                   f"the kohya copy ({size:.1f} MiB for them): kohya's LyCORIS loader builds the smaller Kronecker "
                   f"factor first, and their --lokr_factor is larger than the square root of their width; "
                   f"--lokr_factor {math.isqrt(min(widths))} or less keeps every module factored")
    return modules, len(whole)


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:  # once per process, not at every checkpoint
    logger.warning(message)


def in_peft_shapes(modules: list[LycorisModule], unet_config: Mapping[str, Any], factor: int) -> list[LycorisModule]:
    """The modules with each LoKr module whose ``lokr_w1`` is not of PEFT's shape for ``factor`` (a whole one)
    as two full factors of PEFT's shapes with the same delta, where there are such factors."""
    from peft.tuners.lokr.layer import factorization

    for i, m in enumerate(modules):
        if m.kind != "lokr":
            continue
        shape = layer_shape(m, unet_config)
        w1 = m.weights.get("lokr_w1", m.weights.get("lokr_w1_a"))
        cols = m.weights["lokr_w1"].shape[1] if "lokr_w1" in m.weights else m.weights["lokr_w1_b"].shape[1]
        if (int(w1.shape[0]), int(cols)) != (factorization(shape[0], factor)[0], factorization(shape[1], factor)[0]):
            factors = peft_form(m.weights, m.scale, shape, factor)  # None: left for peft_config_dict to refuse
            modules[i] = LycorisModule(m.component, m.module, m.kind, factors, 1.0) if factors else m
    return modules


def write_lycoris_kohya(modules: list[LycorisModule], metadata: Mapping[str, str], args: Mapping[str, str],
                        path: str | os.PathLike, unet_config: Mapping[str, Any], title: str | None = None,
                        dtype: torch.dtype | None = None, source: str | os.PathLike = "LoRA") -> Path:
    """Write LoHa/LoKr modules as a kohya/LyCORIS file (atomically), with kohya+LyCORIS' ``ss_*`` header."""
    problems = mapping_problems(modules, unet_config)
    if problems:
        raise LoraConversionError(source, f"{len(problems)} module(s) cannot be mapped to kohya names", problems)
    tensors = {}
    modules, whole = in_lycoris_shapes(list(modules), unet_config)
    for m in modules:
        name = kohya_name(m, unet_config)
        for role, tensor in m.weights.items():
            tensors[f"{name}.{role}"] = tensor.to(dtype or tensor.dtype).contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(m.alpha, dtype=torch.float32)
    header = kohya_metadata(modules, metadata, title)
    training = json.loads(metadata.get(TRAINING_METADATA_KEY) or "{}")
    if training.get("lora_rank"):  # LyCORIS records the trained rank (full LoKr factors have none of their own)
        header["ss_network_dim"], header["ss_network_alpha"] = str(training["lora_rank"]), str(training["lora_alpha"])
    header["ss_network_module"] = LYCORIS_NETWORK_MODULE
    header["ss_network_args"] = json.dumps(dict(args))
    header[CONVERSION_METADATA_KEY] = json.dumps({
        "from": "diffusers/peft", "algo": args["algo"],
        "alpha": "per module; LyCORIS scale alpha/dim equals PEFT's alpha/r; a LoKr module with two full "
                 "factors has no scale in LyCORIS, so PEFT's is multiplied into lokr_w1",
        "whole_lokr_modules": whole,
        "whole": "a LoKr module whose PEFT factors kohya's LyCORIS loader cannot rebuild (the larger factor "
                 "first) is lokr_w1 [[1]] and lokr_w2 its scaled delta"})
    header["sshs_model_hash"], header["sshs_legacy_hash"] = safetensors_hashes(tensors, header)
    path = Path(path)
    save_safetensors(tensors, path, header)
    return path


def read_lycoris_kohya(path: str | os.PathLike, unet_config: Mapping[str, Any]) -> tuple[list[LycorisModule],
                                                                                          dict[str, str]]:
    """LoHa/LoKr modules of a kohya/LyCORIS file in diffusers naming; every key must be read, else all are listed."""
    tensors = read_tensors(path)
    kind = kind_of_roles({key.rpartition(".")[2] for key in tensors})
    if kind is None:
        raise LoraConversionError(path, "holds no LoHa (hada_*) or LoKr (lokr_*) weights")
    problems: list[str] = []
    grouped = group_roles(path, kind, tensors, problems)
    unet_modules = {name: module for module, name in unet_kohya_names(unet_config).items()}
    modules = []
    for name, part in sorted(grouped.items()):
        target = diffusers_module(name, unet_modules)
        if target is None:
            problems.append(f"{name}: no module of the SDXL UNet/text encoders has this kohya name")
            continue
        alpha = part.pop("alpha", None)
        module = LycorisModule(target[0], target[1], kind, part, 0.0)
        module.alpha = float(alpha) if alpha is not None else float(module.rank)  # no alpha: scale 1
        modules.append(module)
    problems += mapping_problems(modules, unet_config)
    if problems:
        raise LoraConversionError(path, f"{len(problems)} key(s) cannot be mapped", problems)
    metadata = read_metadata(path)
    return in_peft_shapes(modules, unet_config, network_factor(metadata)), metadata


def write_lycoris_diffusers(modules: list[LycorisModule], path: str | os.PathLike,
                            metadata: Mapping[str, str]) -> Path:
    """Write LoHa/LoKr modules as the project's own file: PEFT weights and config per component."""
    tensors: dict[str, torch.Tensor] = {}
    configs: dict[str, Any] = {}
    for component, (config, state) in peft_configs(modules, metadata).items():
        configs.update({f"{component}.{key}": value for key, value in config.items()})
        tensors.update({f"{component}.{key}": tensor.contiguous() for key, tensor in state.items()})
    header = {k: v for k, v in metadata.items() if not k.startswith(("sshs_", "modelspec.hash"))}
    header[ADAPTER_METADATA_KEY] = json.dumps(configs, default=_json_default)
    header["format"] = "pt"
    header["sshs_model_hash"] = safetensors_hashes(tensors, {})[0]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(tensors, path, header)
    return path


def peft_configs(modules: list[LycorisModule], metadata: Mapping[str, str]) -> dict[str, tuple[dict, dict]]:
    """``{component: (PEFT config dict, PEFT state dict)}`` rebuilding these modules (two full LoKr factors
    get scale 1, as in LyCORIS)."""
    factor = network_factor(metadata)
    states = {}
    for component in COMPONENTS:
        chosen = [m for m in modules if m.component == component]
        if chosen:
            states[component] = (peft_config_dict(chosen, factor),
                                 {f"{m.module}.{role}": t for m in chosen for role, t in m.weights.items()})
    return states


def network_factor(metadata: Mapping[str, str]) -> int:
    """The LoKr factor a kohya/LyCORIS header records (``ss_network_args``), -1 (automatic) when none."""
    return int(json.loads(metadata.get("ss_network_args") or "{}").get("factor", -1))


def _json_default(value: Any) -> Any:
    return sorted(value) if isinstance(value, set) else str(value)


def save_kohya_copy(folder: str | os.PathLike, unet_config: Mapping[str, Any] | None = None,
                    title: str | None = None) -> Path:
    """``folder/kohya_lora.safetensors`` beside ``folder/pytorch_lora_weights.safetensors``, for any adapter type."""
    folder = Path(folder)
    source, destination = folder / LORA_WEIGHT_NAME, folder / KOHYA_WEIGHT_NAME
    title = title or folder.parent.name or None
    if file_adapter_type(source) == "lora":
        return convert_diffusers_to_kohya(source, destination, unet_config, title)
    modules, metadata, args = read_diffusers_lycoris(source)
    unet_config = unet_config if unet_config is not None else unet_config_for(metadata)
    return write_lycoris_kohya(modules, metadata, args, destination, unet_config, title, source=source)


def peft_states(path: str | os.PathLike, unet_config: Mapping[str, Any] | None = None) -> dict[str, tuple[dict, dict]]:
    """``{component: (PEFT config dict, PEFT state dict)}`` of a LoHa/LoKr file in either format, for
    ``inject_adapter_in_model`` and ``set_peft_model_state_dict``."""
    tensors = read_tensors(path)
    if not any(key.startswith("lora_") for key in tensors):  # the project's own file
        states: dict[str, tuple[dict, dict]] = {}
        for key, tensor in tensors.items():
            component, _, rest = key.partition(".")
            states.setdefault(component, (adapter_config(path, component), {}))[1][rest] = tensor
        return states
    metadata = read_metadata(path)
    modules, _ = read_lycoris_kohya(path, unet_config if unet_config is not None else unet_config_for(metadata))
    return peft_configs(modules, metadata)
