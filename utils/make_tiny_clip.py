"""Build a tiny CLIP model with its processor, offline and in a second, for the demo and the tests.

It uses the real transformers classes (CLIPModel, CLIPTokenizer, CLIPImageProcessor,
CLIPProcessor) and is saved with ``save_pretrained``, so the metric code loads it exactly
as it loads ``openai/clip-vit-large-patch14``. The weights are random: the numbers it
gives are deterministic and differ between images, but they say nothing about style. The tests use
it where speed matters; the demo's metrics use the CLIP trained on procedural scenes in both looks
(``models/tiny_scenes/clip``, see utils/pretrain_demo_model.py).

    python utils/make_tiny_clip.py --output_dir tiny_clip
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils.make_tiny_sdxl import build_tokenizer_files

logger = logging.getLogger(__name__)

IMAGE_SIZE = 32
# CLIP's own normalisation constants (those of the OpenAI checkpoints).
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def build_tiny_clip(seed: int = 0):
    """Return ``(CLIPModel, CLIPProcessor)``, randomly initialised and deterministic for ``seed``."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    vocab, merges = build_tokenizer_files()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=CLIP_MEAN, image_std=CLIP_STD,
    )
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_attention_heads=4,
            num_hidden_layers=2, max_position_embeddings=77,
            bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
            image_size=IMAGE_SIZE, patch_size=8,
        ),
        projection_dim=32,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def save_tiny_clip(output_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Build the tiny CLIP and save model and processor into one folder, as the Hub's CLIP repos are laid out."""
    output_dir = Path(output_dir)
    model, processor = build_tiny_clip(seed)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    logger.info("Tiny CLIP saved to %s", output_dir)
    return output_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="tiny_clip", help="where to save the tiny CLIP")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    save_tiny_clip(args.output_dir, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
