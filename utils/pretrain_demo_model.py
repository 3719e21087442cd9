"""Pretrain the demo's base model and its CLIP on procedural scenes, on a CPU, reproducibly from a seed.

    python -m utils.pretrain_demo_model                 (writes models/tiny_scenes/sdxl and models/tiny_scenes/clip)

Four stages, each with its own progress bar:

1. the VAE learns to reconstruct 64 px scenes of both looks (reconstruction loss plus a small KL term);
   its latent scaling factor is then set from the spread of the latents, as SDXL's is;
2. the UNet and both text encoders learn to denoise latents of **photo-look** scenes given their captions
   (one caption in ten is dropped to the empty prompt, so classifier-free guidance works); the saved UNet
   is an exponential moving average of its weights;
3. a CLIP learns, contrastively, to match scenes of both looks (and their VAE reconstructions) with their
   captions, so the demo's prompt alignment and style similarity measure content and look;
4. both are saved in fp16 safetensors (loaded in fp32 by the scripts), with a preview of the base model's
   pictures (``preview.png``) and ``pretraining_info.json``.

The base model never sees the Ghibli-like look: that is what the demo's LoRA has to learn.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils.core.cli import Parser
from utils.tiny.demo_model import DEMO_MODELS_DIR
from utils.tiny.pretrain import STAGES, pretrain


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = Parser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python -m utils.pretrain_demo_model --seed 0")
    parser.add_argument("--output_dir", default=str(DEMO_MODELS_DIR))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_scenes", type=int, default=4000, help="photo scenes (half as many Ghibli-like ones)")
    parser.add_argument("--vae_steps", type=int, default=400)
    parser.add_argument("--vae_batch_size", type=int, default=16)
    parser.add_argument("--vae_lr", type=float, default=1e-3)
    parser.add_argument("--unet_steps", type=int, default=2000)
    parser.add_argument("--unet_batch_size", type=int, default=32)
    parser.add_argument("--unet_lr", type=float, default=1e-3)
    parser.add_argument("--decoder_steps", type=int, default=500)
    parser.add_argument("--decoder_lr", type=float, default=5e-4)
    parser.add_argument("--clip_steps", type=int, default=1000)
    parser.add_argument("--clip_batch_size", type=int, default=64)
    parser.add_argument("--clip_lr", type=float, default=1e-3)
    parser.add_argument("--clip_style_weight", type=float, default=0.8,
                        help="share of the CLIP's contrastive target on images of the same look (the rest: same caption)")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES),
                        help="run only these stages; without vae and unet, the saved pipeline in --output_dir "
                             "is loaded and continued")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch CPU threads: 2 on a quiet 2-core machine (1.6x faster than 1); use 1 on a "
                             "busy one, where idle threads spin")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    pretrain(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
