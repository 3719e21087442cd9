"""The run's LoRA folders (best_model/, checkpoint_epoch_N/, final_model/, interrupted_model/): the weights in
diffusers format with the training facts in their metadata, the info JSON beside them, the raw weights
beside an EMA average, and the kohya copy."""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path

from utils.core.atomic import write_json
from utils.core.layout import model_info_file
from utils.core.names import SDXL_BASE_MODEL_VERSION
from utils.lora.files import save_lora
from utils.training.adapters import RAW_WEIGHT_NAME, weights_of
from utils.training.experiment_config import command_line


def unwrapped(accelerator, models: list) -> tuple:
    models = [accelerator.unwrap_model(m) for m in models]
    return models[0], (models[1:] or None)


def save_model_folder(accelerator, folder: Path, models: list, settings, state, info: dict, ema=None,
                      adapter_name: str = "default") -> None:
    """Write a LoRA folder (diffusers format) and, beside the weights, its info JSON (named for the folder:
    ``best_model_info.json``, ``checkpoint_info.json``, ...). With ``ema`` the folder's model is the moving
    average, and the raw weights are kept beside it (``raw_lora_weights.safetensors``). ``settings`` is the
    run's ``RunSettings``, ``state`` its ``TrainState``; ``adapter_name`` its adapter in the models (a run of a
    pack)."""
    if not accelerator.is_main_process:
        return
    unet, text_encoders = unwrapped(accelerator, models)
    metadata = lora_metadata(settings, state)
    copies = []
    if settings.args.save_kohya or settings.args.lora_type != "lora":  # LoHa/LoKr: the copy other tools read
        from utils.lora.lycoris_files import save_kohya_copy
        copies.append(lambda staging: save_kohya_copy(staging, unet.config, title=folder.parent.name))
    info = {**info, "lora_type": settings.args.lora_type, "adapter_weights": "ema" if ema is not None else "raw"}
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}.raw.") as raw_dir:
        if ema is not None:
            raw = save_lora(Path(raw_dir) / "raw", unet, text_encoders, {**metadata, "adapter_weights": "raw"},
                            adapter_name=adapter_name)
            copies.append(lambda staging: shutil.copyfile(raw, staging / RAW_WEIGHT_NAME))
            info.update(raw_weights_file=RAW_WEIGHT_NAME, ema_decay=settings.args.ema_decay)
        with weights_of(ema):
            save_lora(folder, unet, text_encoders, training_metadata={**metadata, "adapter_weights": info[
                "adapter_weights"]}, extra_files=lambda staging: [copy(staging) for copy in copies],
                      adapter_name=adapter_name)
    write_json(folder / model_info_file(folder.name), info)


def lora_metadata(settings, state) -> dict:
    """Facts about the training stored in the LoRA file's header (no secrets, no local paths but the model's)."""
    return {
        "base_model": settings.args.pretrained_model_name_or_path,
        "base_model_version": SDXL_BASE_MODEL_VERSION,
        "num_train_images": state.dataset_info.get("num_train_images"),
        "tag_frequency": state.dataset_info.get("tag_frequency"),
        "epoch": math.ceil(state.global_step / state.steps_per_epoch),
        "max_train_steps": state.max_train_steps,
        "train_batch_size": settings.args.train_batch_size,
        "gradient_accumulation_steps": settings.args.gradient_accumulation_steps,
        "lr_scheduler": settings.args.lr_scheduler,
        "optimizer": settings.args.optimizer,
        "mixed_precision": settings.args.mixed_precision,
        "seed": settings.args.seed,
        "noise_offset": settings.args.noise_offset,
        "snr_gamma": settings.args.snr_gamma,
        "lora_target_modules": settings.args.lora_target_modules,
        "training_command": command_line(),
        "lora_rank": settings.args.lora_rank,
        "lora_alpha": settings.args.lora_alpha,
        "use_rslora": settings.args.use_rslora,
        "use_dora": settings.args.use_dora,
        "lora_type": settings.args.lora_type,
        "lokr_factor": settings.args.lokr_factor if settings.args.lora_type == "lokr" else None,
        "lokr_decompose_both": settings.args.lokr_decompose_both if settings.args.lora_type == "lokr" else None,
        "loraplus_lr_ratio": settings.args.loraplus_lr_ratio,
        "use_ema": settings.args.use_ema,
        "resolution": settings.args.resolution,
        "learning_rate": settings.learning_rate,
        "steps": state.global_step,
        "train_text_encoder": settings.args.train_text_encoder,
    }
