"""One way to set up SDXL for inference, and to find and load a LoRA into it.

``open_pipeline`` is what inference_sdxl_ghibli.py, hf/hf_inference.py and the sweep's ``generate`` share:
the device (cuda when available), fp16 on CUDA and fp32 elsewhere, and the pickle rule (.bin/.ckpt weights
only with ``allow_pickle``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from utils.core.errors import UserError
from utils.core.layout import FINAL_MODEL
from utils.core.names import LORA_WEIGHT_NAME
from utils.core.sdxl import load_pipeline
from utils.inference.sources import lora_model_folder
from utils.lora.lycoris import match_module_names
from utils.lora.lycoris_files import file_adapter_type, peft_states

ADAPTER_NAME = "style"
WEIGHTS_FILE = LORA_WEIGHT_NAME
PICKLE_WARNING = ("is a pickle-based file, which can run arbitrary code when loaded; convert it to .safetensors "
                  "or pass --allow_pickle if you trust its source")


def pick_device(requested: str | None) -> str:
    if requested:
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"--device {requested}: CUDA is not available on this machine")
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def open_pipeline(model: str, *, revision: str | None = None, variant: str | None = "fp16",
                  device: str | None = None, allow_pickle: bool = False, model_config: str | None = None):
    """(pipeline on its device, device): fp16 on CUDA, fp32 elsewhere. ``model_config``: the local diffusers
    folder a single-file checkpoint takes its configs from."""
    device = pick_device(device)
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    pipe = load_pipeline(model, revision, variant, dtype, allow_pickle=allow_pickle,
                         model_config=model_config).to(device)
    return pipe, device


def resolve_lora_source(path: str, allow_pickle: bool = False, flag: str = "--lora_model_path") -> tuple[str, dict]:
    """``load_lora_weights`` arguments for a run folder (its final_model/), a model folder, a single LoRA file,
    or a Hub id that can be fetched here."""
    path = lora_model_folder(path, flag=flag)
    candidate = Path(path)
    if candidate.is_file():
        if candidate.suffix != ".safetensors" and not allow_pickle:
            raise UserError(f"{candidate} {PICKLE_WARNING}")
        return str(candidate.parent), {"weight_name": candidate.name, "use_safetensors": not allow_pickle}
    if candidate.is_dir():
        files = sorted(candidate.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{candidate}: no .safetensors LoRA file in this folder")
        if not (candidate / WEIGHTS_FILE).is_file() and len(files) == 1:
            return str(candidate), {"weight_name": files[0].name, "use_safetensors": True}
        return str(candidate), {"use_safetensors": True}
    return path, {"use_safetensors": not allow_pickle}  # a Hub repo id, fetchable (lora_model_folder checked)


def newest_final_model(runs_dir: Path) -> Path | None:
    """``{runs_dir}/*/final_model`` holding LoRA weights, the one written last; None when there is none."""
    if not runs_dir.is_dir():
        return None
    found = [p / FINAL_MODEL for p in runs_dir.iterdir() if (p / FINAL_MODEL / WEIGHTS_FILE).is_file()]
    return max(found, key=lambda p: (p / WEIGHTS_FILE).stat().st_mtime, default=None)


def load_adapter(pipe, lora_path: str, scale: float, weight_name: str | None = None,
                 allow_pickle: bool = False) -> None:
    """Load a LoRA as a named adapter and set its scale (any value, 0 and 1 included)."""
    source, kwargs = resolve_lora_source(lora_path, allow_pickle)
    if weight_name:
        kwargs["weight_name"] = weight_name
    local = Path(source) / kwargs.get("weight_name", WEIGHTS_FILE)
    if local.is_file() and local.suffix == ".safetensors" and file_adapter_type(local) != "lora":
        load_lycoris_adapter(pipe, local)
    else:
        pipe.load_lora_weights(source, adapter_name=ADAPTER_NAME, **kwargs)
    pipe.set_adapters([ADAPTER_NAME], adapter_weights=[scale])


def load_lycoris_adapter(pipe, path: Path) -> None:
    """A LoHa/LoKr file (the project's own or a kohya/LyCORIS one) as the named adapter, through PEFT;
    ``--lora_scale`` then works as for LoRA (PEFT's set_scale)."""
    from peft import PeftConfig, inject_adapter_in_model
    from peft.utils import set_peft_model_state_dict

    for component, (config, state) in peft_states(path, pipe.unet.config).items():
        model = getattr(pipe, component)
        peft_config = PeftConfig.from_peft_type(**{k: v for k, v in config.items() if v is not None})
        inject_adapter_in_model(peft_config, model, adapter_name=ADAPTER_NAME)
        state = match_module_names(state, {name for name, _ in model.named_modules()})
        result = set_peft_model_state_dict(model, state, adapter_name=ADAPTER_NAME)
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        if unexpected:
            raise UserError(f"{path}: {len(unexpected)} weight(s) fit no layer of the {component}, e.g. "
                            f"{unexpected[0]}")
        if hasattr(model, "_hf_peft_config_loaded"):
            model._hf_peft_config_loaded = True


def unload_adapter(pipe) -> None:
    """Delete the adapter ``load_adapter`` loaded, when it is there (the base weights stay as they were)."""
    if ADAPTER_NAME in {name for names in pipe.get_list_adapters().values() for name in names}:
        pipe.delete_adapters(ADAPTER_NAME)
