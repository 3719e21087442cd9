"""Convert SDXL LoRA files between the diffusers/PEFT format and the kohya format that ComfyUI,
AUTOMATIC1111/Forge and InvokeAI load.

    python utils/convert_lora.py output_ghibli/<run>/final_model           # -> final_model/kohya_lora.safetensors
    python utils/convert_lora.py my_lora.safetensors --output ghibli_style.safetensors
    python utils/convert_lora.py ghibli_style.safetensors --output ghibli_diffusers/   # kohya -> diffusers
    python utils/convert_lora.py peft_adapter/ --component text_encoder    # adapter_model + adapter_config

The input format is detected. Module names of the UNet come from the base model's unet/config.json
(--pretrained_model_name_or_path, by default the base model recorded in the file, else SDXL base 1.0).
A key that cannot be mapped is listed and the command exits with status 2: nothing is dropped silently.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from safetensors import safe_open

from utils.core.cli import Parser, run_cli
from utils.core.errors import UserError
from utils.lora.files import LORA_WEIGHT_NAME, read_metadata, read_tensors
from utils.lora.from_kohya import is_kohya_state_dict, read_kohya_lora, write_diffusers_lora
from utils.lora.kohya_names import (COMPONENTS, KOHYA_WEIGHT_NAME, LoraConversionError, LoraModule, ParsedLora, unet_config_for)
from utils.lora.lycoris_files import (file_adapter_type, read_diffusers_lycoris, read_lycoris_kohya, write_lycoris_diffusers, write_lycoris_kohya)
from utils.lora.to_kohya import modules_from_peft_weights, read_diffusers_lora, write_kohya_lora

PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"
UNET_MARKERS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in", "conv_out", "time_embedding.",
                "add_embedding.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python utils/convert_lora.py output_ghibli/<run>/final_model")
    p.add_argument("input", help="a LoRA .safetensors file, a model folder (pytorch_lora_weights.safetensors) "
                                 "or a PEFT adapter folder (adapter_model.safetensors + adapter_config.json)")
    p.add_argument("--output", default=None,
                   help="output file (.safetensors) or, for diffusers output, a folder (default: beside the input)")
    p.add_argument("--to", choices=["kohya", "diffusers"], default=None,
                   help="target format (default: kohya, or diffusers when the input is kohya)")
    p.add_argument("--pretrained_model_name_or_path", default=None,
                   help="base model whose unet/config.json gives the UNet layout (default: the one recorded in "
                        "the file, else SDXL base 1.0)")
    p.add_argument("--component", choices=["unet", "text_encoder", "text_encoder_2"], default=None,
                   help="which model a single PEFT adapter folder belongs to (default: detected for a UNet)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="store the kohya weights in this dtype (default: as in the input)")
    p.add_argument("--title", default=None, help="modelspec.title / comment shown by LoRA browsers")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- input detection


def detect_input(path: Path) -> tuple[str, Path]:
    """(format, path to read): format is 'kohya', 'diffusers' or 'peft'."""
    if path.is_dir():
        if (path / PEFT_CONFIG).is_file() or any((path / c / PEFT_CONFIG).is_file() for c in COMPONENTS):
            return "peft", path
        if (path / LORA_WEIGHT_NAME).is_file():
            return "diffusers", path / LORA_WEIGHT_NAME
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise FileNotFoundError(f"{path}: no {LORA_WEIGHT_NAME}, no {PEFT_CONFIG}, and "
                                    f"{len(files)} .safetensors files (name the file to convert)")
        path = files[0]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: LoRA file or folder not found")
    if path.suffix != ".safetensors":
        raise FileNotFoundError(f"{path}: only .safetensors LoRA files are supported")
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
    except Exception as error:  # safetensors raises its own error types for a damaged header
        raise FileNotFoundError(f"{path}: not a readable safetensors file ({error})") from error
    if is_kohya_state_dict(keys):
        return "kohya", path
    if path.name == PEFT_WEIGHTS:
        return "peft", path.parent
    return "diffusers", path


def _guess_component(folder: Path, keys: list[str], component: str | None) -> str:
    if component:
        return component
    modules = [k.removeprefix("base_model.model.") for k in keys]
    if any(m.startswith(UNET_MARKERS) for m in modules):
        return "unet"
    raise LoraConversionError(folder, "cannot tell which model this PEFT adapter belongs to; pass --component "
                                      "unet, text_encoder (CLIP ViT-L) or text_encoder_2 (OpenCLIP bigG)")


def read_peft_folder(folder: Path, component: str | None) -> ParsedLora:
    """LoRA modules of a PEFT adapter folder, or of unet/, text_encoder/, text_encoder_2/ adapter subfolders."""
    adapters = {c: folder / c for c in COMPONENTS if (folder / c / PEFT_CONFIG).is_file()}
    if not adapters:
        adapters = {None: folder}
    weights, configs = {}, {}
    for name, adapter in adapters.items():
        if not (adapter / PEFT_WEIGHTS).is_file():
            raise FileNotFoundError(f"{adapter}: no {PEFT_WEIGHTS} (only safetensors adapters are supported)")
        tensors = read_tensors(adapter / PEFT_WEIGHTS)
        chosen = name or _guess_component(folder, list(tensors), component)
        weights[chosen] = {k.removeprefix("base_model.model."): v for k, v in tensors.items()}
        config_path = adapter / PEFT_CONFIG
        configs[chosen] = json.loads(config_path.read_text()) if config_path.is_file() else {}
    return modules_from_peft_weights(folder, weights, configs)


# ----------------------------------------------------------------------------- conversion


def default_output(kind: str, source: Path, given: Path, to: str) -> Path:
    folder = given if given.is_dir() else source.parent
    if to == "kohya":
        return folder / KOHYA_WEIGHT_NAME if given.is_dir() else source.with_name(f"{source.stem}_kohya.safetensors")
    stem = source.stem if kind != "peft" else source.name
    return folder / f"{stem}_diffusers" / LORA_WEIGHT_NAME


def output_path(args: argparse.Namespace, kind: str, source: Path, target: str) -> Path:
    """Where the converted file goes; an existing one is replaced only with --overwrite (convert_dataset.py's
    rule), the input never."""
    if not args.output:
        output = default_output(kind, source, Path(args.input), target)
    else:
        output = Path(args.output)
        if output.suffix != ".safetensors":
            if target == "kohya":
                raise FileNotFoundError(f"{output}: give a .safetensors file name for the kohya file")
            output = output / LORA_WEIGHT_NAME
    if output.resolve() == source.resolve():
        raise FileNotFoundError(f"{output}: the output would overwrite the input")
    if output.exists() and not args.overwrite:
        raise UserError(f"{output}: output file exists (use --overwrite to replace it)")
    return output


def describe(modules: list[LoraModule]) -> str:
    counts = Counter(m.component for m in modules)
    parts = ", ".join(f"{component} {count}" for component, count in counts.items())
    ranks = sorted({m.rank for m in modules})
    alphas = sorted({round(m.alpha, 4) for m in modules})
    scales = sorted({round(m.scale, 4) for m in modules})
    return f"{len(modules)} modules ({parts}); rank {ranks}, kohya alpha {alphas}, scale alpha/rank {scales}"


def convert(args: argparse.Namespace) -> str:
    kind, source = detect_input(Path(args.input))
    target = args.to or ("diffusers" if kind == "kohya" else "kohya")
    if target == kind:
        raise LoraConversionError(source, f"is already in the {kind} format")
    if target == "diffusers" and kind != "kohya":
        raise LoraConversionError(source, "PEFT adapters convert to kohya only; diffusers loads them as they are")
    output = output_path(args, kind, source, target)

    if kind != "peft" and file_adapter_type(source) != "lora":
        return convert_lycoris(args, kind, source, target, output)
    if kind == "kohya":
        config = unet_config_for(read_metadata(source), args.pretrained_model_name_or_path)
        parsed = read_kohya_lora(source, config)
        write_diffusers_lora(parsed.modules, output, parsed.metadata)
    else:
        parsed = read_peft_folder(source, args.component) if kind == "peft" else read_diffusers_lora(source)
        dtype = getattr(torch, args.dtype) if args.dtype else None
        config = unet_config_for(parsed.metadata, args.pretrained_model_name_or_path)
        write_kohya_lora(parsed, output, config, args.title, dtype, source)
    return f"{target} LoRA written to {output}: {describe(parsed.modules)}"


def convert_lycoris(args: argparse.Namespace, kind: str, source: Path, target: str, output: Path) -> str:
    """LoHa/LoKr: the project's file to kohya/LyCORIS, or back."""
    config = unet_config_for(read_metadata(source), args.pretrained_model_name_or_path)
    if kind == "kohya":
        modules, metadata = read_lycoris_kohya(source, config)
        write_lycoris_diffusers(modules, output, metadata)
    else:
        modules, metadata, network = read_diffusers_lycoris(source)
        dtype = getattr(torch, args.dtype) if args.dtype else None
        write_lycoris_kohya(modules, metadata, network, output, config, args.title, dtype, source)
    return f"{target} {modules[0].kind} file written to {output}: {len(modules)} modules"


def main(argv: list[str] | None = None) -> int:
    """The command line; a LoRA that cannot be converted raises LoraConversionError (exit status 2)."""
    print(convert(parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
