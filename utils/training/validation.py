"""Images generated during training from fixed prompts and a fixed seed, saved and logged."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from utils.core.layout import RunLayout
from utils.core.prompt_file import PromptSpec, read_prompt_file

logger = logging.getLogger(__name__)


def validation_specs(args) -> list[PromptSpec]:
    """The validation prompts: --validation_prompts_file's lines, else --validation_prompt's prompts."""
    if args.validation_prompts_file:
        return read_prompt_file(args.validation_prompts_file)
    return [PromptSpec(prompt) for prompt in args.validation_prompt or []]


@torch.no_grad()
def log_validation_images(accelerator, args, run_dir: Path, components, models: list,
                          epoch: int, step: int) -> list[Path]:
    """Generate ``--num_validation_images`` per validation prompt with the current LoRA."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    if not accelerator.is_main_process:
        return []
    unet = accelerator.unwrap_model(models[0])
    encoders = [accelerator.unwrap_model(m) for m in models[1:]] or components.text_encoders
    device = accelerator.device
    moved = [m for m in [components.vae, *encoders] if m.device != device]
    for module in moved:
        module.to(device)
    pipe = StableDiffusionXLPipeline(
        vae=components.vae, text_encoder=encoders[0], text_encoder_2=encoders[1],
        tokenizer=components.tokenizers[0], tokenizer_2=components.tokenizers[1], unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(components.noise_scheduler.config),
    )
    pipe.set_progress_bar_config(disable=True)
    was_training = unet.training
    unet.eval()
    saved = []
    folder = RunLayout(run_dir).validation
    folder.mkdir(parents=True, exist_ok=True)
    for prompt_index, spec in enumerate(validation_specs(args)):
        generator = torch.Generator(device="cpu").manual_seed(args.seed if spec.seed is None else spec.seed)
        options = {"guidance_scale": spec.guidance_scale} if spec.guidance_scale is not None else {}
        with accelerator.autocast():
            images = pipe(spec.prompt, negative_prompt=spec.negative_prompt,
                          num_images_per_prompt=args.num_validation_images, generator=generator,
                          num_inference_steps=spec.steps or args.validation_steps,
                          height=spec.height or args.resolution, width=spec.width or args.resolution,
                          **options).images
        for index, image in enumerate(images):
            path = folder / f"epoch_{epoch:03d}_prompt{prompt_index}_{index}.png"
            image.save(path)
            saved.append(path)
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                stacked = np.stack([np.asarray(image) for image in images])
                tracker.writer.add_images(f"validation/prompt{prompt_index}", stacked, step, dataformats="NHWC")
    unet.train(was_training)
    for module in moved:
        module.to("cpu")
    logger.info("Validation images for epoch %d saved in %s", epoch, folder)
    return saved
