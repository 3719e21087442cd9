"""The original train_sdxl_lora.py's helper functions, kept importable from that script with the same
parameters and results. Training itself does not use them: it encodes captions with utils/core/sdxl.py
and batches through utils/training/batches.py."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

TEXT_ENCODER_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection")  # the SDXL text encoders, by config name


def import_model_class_from_model_name_or_path(pretrained_model_name_or_path: str, revision: str | None,
                                               subfolder: str = "text_encoder") -> type:
    """The transformers class of a text encoder, named by ``architectures[0]`` of its config.json:
    CLIPTextModel or CLIPTextModelWithProjection; any other raises ValueError."""
    import transformers

    config = transformers.PretrainedConfig.from_pretrained(pretrained_model_name_or_path, subfolder=subfolder,
                                                           revision=revision)
    model_class = (config.architectures or [None])[0]
    if model_class not in TEXT_ENCODER_CLASSES:
        raise ValueError(f"{model_class} is not supported.")
    return getattr(transformers, model_class)


def collate_fn(examples: list[dict], dataset_type: str = "product") -> dict[str, torch.Tensor | list[str]]:
    """A batch of dataset items: ``image`` (and, for the product layout, ``product_image``) stacked into
    tensors, ``text`` as a list of captions."""
    import torch

    batch = {"image": torch.stack([example["image"] for example in examples])}
    if dataset_type == "product":
        batch["product_image"] = torch.stack([example["product_image"] for example in examples])
    batch["text"] = [example["text"] for example in examples]
    return batch


def _pick_caption(caption, proportion_empty_prompts: float, is_train: bool) -> str:
    """The original's caption choice: empty with probability ``proportion_empty_prompts``; of several
    captions, a random one in training and the first otherwise."""
    import numpy as np

    if random.random() < proportion_empty_prompts:
        return ""
    if isinstance(caption, str):
        return caption
    if isinstance(caption, (list, tuple, np.ndarray)) and len(caption):
        return random.choice(caption) if is_train else caption[0]
    raise ValueError(f"a caption must be a string or a non-empty list of strings, not {caption!r}")


def encode_prompt(prompt_batch: list, text_encoders: list, tokenizers: list, proportion_empty_prompts: float = 0,
                  is_train: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds, pooled_prompt_embeds) of a batch of captions, without gradients: SDXL's encoding
    (utils/core/sdxl.py) of the captions chosen as the original chose them."""
    import torch

    from utils.core.sdxl import encode_prompts

    captions = [_pick_caption(caption, proportion_empty_prompts, is_train) for caption in prompt_batch]
    with torch.no_grad():
        return encode_prompts(tokenizers, text_encoders, captions)
