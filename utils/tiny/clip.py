"""Small CLIP models with their processors, offline and in a second (the command: utils/make_tiny_clip.py).

They use the real transformers classes (CLIPModel, CLIPTokenizer, CLIPImageProcessor, CLIPProcessor) and
are saved with ``save_pretrained``, so the metric code loads them exactly as it loads
``openai/clip-vit-large-patch14``. Two shapes use it: the tests' tiny CLIP (random weights, 32 px) and
the demo's CLIP (64 px, the demo's words; trained by utils/pretrain_demo_model.py).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from utils.tiny.sdxl import WORDS, build_tokenizer_files

logger = logging.getLogger(__name__)

IMAGE_SIZE = 32
# CLIP's own normalisation constants (those of the OpenAI checkpoints).
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def build_clip(words: Sequence[str] = WORDS, image_size: int = IMAGE_SIZE, width: int = 32, vision_layers: int = 2,
               seed: int = 0):
    """Return ``(CLIPModel, CLIPProcessor)`` in eval mode, randomly initialised and deterministic for ``seed``.

    ``words`` each get a whole-word token; ``width`` is the hidden size of both towers and the projection;
    the text tower has two layers, the vision tower ``vision_layers``, with 8 px patches of ``image_size``."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    vocab, merges = build_tokenizer_files(list(words))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        image_mean=CLIP_MEAN, image_std=CLIP_STD,
    )
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab), hidden_size=width, intermediate_size=2 * width, num_attention_heads=4,
            num_hidden_layers=2, max_position_embeddings=77,
            bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
        ),
        vision_config=dict(
            hidden_size=width, intermediate_size=2 * width, num_attention_heads=4, num_hidden_layers=vision_layers,
            image_size=image_size, patch_size=8,
        ),
        projection_dim=width,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def save_tiny_clip(output_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Build the tests' tiny CLIP and save model and processor into one folder, as the Hub's CLIP repos are laid
    out."""
    output_dir = Path(output_dir)
    model, processor = build_clip(seed=seed)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    logger.info("Tiny CLIP saved to %s", output_dir)
    return output_dir
