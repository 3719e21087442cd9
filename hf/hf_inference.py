#!/usr/bin/env python
"""Generate an image with an SDXL base model and a LoRA, each given as a Hub id or a local path.

Example:
    python hf/hf_inference.py --prompt "a beautiful landscape in Ghibli style" \\
        --base_model_id stabilityai/stable-diffusion-xl-base-1.0 \\
        --lora_model_id moving-j/sdxl-base-1.0-ghibli-lora-r4 --seed 42 --output generated_image.png
With --remote, a hosted endpoint generates the image (huggingface_hub.InferenceClient) instead.
Private repos: set HF_TOKEN or run `hf auth login`.

From Python, the original's function: ``generate_image_with_hf_api(prompt, base_model_id=...,
lora_model_id=None, token=None, num_inference_steps=50, guidance_scale=7.5, negative_prompt=None)``
returns the PIL image.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils.core.cli import Parser, run_cli  # noqa: E402 (needs the repo root on sys.path)
from utils.core.names import SDXL_BASE_ID  # noqa: E402
from utils.core.atomic import save_image  # noqa: E402
from utils.hub.errors import hub_errors  # noqa: E402
from utils.hub.token import add_token_argument, hub_token, warn_about_token_flag  # noqa: E402

logger = logging.getLogger("hf_inference")
DEFAULT_BASE = SDXL_BASE_ID


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python hf/hf_inference.py --prompt \"a beautiful landscape in Ghibli style\" \\\n"
               "      --lora_model_id moving-j/sdxl-base-1.0-ghibli-lora-r4 --output generated_image.png")
    p.add_argument("--prompt", required=True)
    p.add_argument("--base_model_id", default=None,
                   help="Hub id, diffusers folder or .safetensors file (default: the base model a local LoRA was "
                        f"trained on, as its run records it; else {DEFAULT_BASE})")
    p.add_argument("--lora_model_id", default=None,
                   help="Hub id, run folder, LoRA folder or .safetensors file (none: base only)")
    p.add_argument("--weight_name", default=None, help="which .safetensors file of the LoRA repo/folder to load")
    add_token_argument(p)
    p.add_argument("--output", default="output.png")
    p.add_argument("--steps", "--num_inference_steps", dest="steps", type=int, default=50)
    p.add_argument("--guidance", "--guidance_scale", dest="guidance", type=float, default=7.5)
    p.add_argument("--negative_prompt", default=None)
    p.add_argument("--lora_scale", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="default: a random seed, printed so it can be reused")
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--variant", default="fp16", help="weights variant; falls back to the regular weights")
    remote = p.add_argument_group("remote generation")
    remote.add_argument("--remote", action="store_true",
                        help="ask a hosted endpoint (huggingface_hub.InferenceClient) instead of running locally")
    remote.add_argument("--endpoint_url", default=None,
                        help="URL of a deployed endpoint (default: Hub inference providers for the LoRA or base id)")
    remote.add_argument("--provider", default=None, help="inference provider (default: auto)")
    args = p.parse_args(argv)
    if args.endpoint_url and not args.remote:
        p.error("--endpoint_url needs --remote")
    check_numbers(args)
    return args


def check_numbers(args: argparse.Namespace) -> None:
    """Sizes and steps that cannot work, refused before anything is loaded or asked of an endpoint."""
    from utils.core.errors import UserError
    from utils.inference.sources import check_side

    check_side("--height", args.height)
    check_side("--width", args.width)
    if args.steps < 1:
        raise UserError(f"--steps (--num_inference_steps) {args.steps}: must be at least 1")
    if args.guidance < 0:
        raise UserError(f"--guidance {args.guidance}: must not be negative")


def generate_image_with_hf_api(prompt: str, base_model_id: str = DEFAULT_BASE, lora_model_id: str | None = None,
                               token: str | None = None, num_inference_steps: int = 50,
                               guidance_scale: float = 7.5, negative_prompt: str | None = None, *,
                               seed: int | None = None, height: int | None = None, width: int | None = None,
                               lora_scale: float = 1.0, weight_name: str | None = None, device: str | None = None,
                               variant: str | None = "fp16") -> Image.Image:
    """One image (PIL) from an SDXL base model and an optional LoRA, each a Hub id or a local path.

    ``token`` (default: HF_TOKEN or the saved login) is used for this call only and never saved.
    ``seed`` None draws a random one (logged); ``height``/``width`` None use the model's own size.
    Raises a one-line HubError/UserError/FileNotFoundError for a model that cannot be found.
    """
    from utils.core.model_source import check_base_model
    from utils.inference.flags import GenerationSettings
    from utils.inference.generation import generate
    from utils.inference.pipeline import load_adapter, open_pipeline
    from utils.inference.sources import lora_model_folder

    if lora_model_id:
        lora_model_id = lora_model_folder(lora_model_id, flag="--lora_model_id")
    check_base_model(base_model_id, "--base_model_id")
    if seed is None:
        seed = random.SystemRandom().randrange(2**32)
        logger.info("seed %d", seed)
    with hub_token(token):
        with hub_errors(f"base model {base_model_id!r}"):
            pipe, _ = open_pipeline(base_model_id, variant=variant, device=device)
        if lora_model_id:
            with hub_errors(f"LoRA {lora_model_id!r}"):
                load_adapter(pipe, lora_model_id, lora_scale, weight_name)
    settings = GenerationSettings(negative_prompt or "", num_inference_steps, guidance_scale, height, width)
    return generate(pipe, prompt, [seed], settings)[0]


def generate_locally(args: argparse.Namespace, seed: int):
    from utils.inference.sources import base_model_for

    base_model_id = base_model_for(args.base_model_id, args.lora_model_id, "--base_model_id")
    return generate_image_with_hf_api(args.prompt, base_model_id, args.lora_model_id, None, args.steps,
                                      args.guidance, args.negative_prompt, seed=seed, height=args.height,
                                      width=args.width, lora_scale=args.lora_scale, weight_name=args.weight_name,
                                      device=args.device, variant=args.variant)


def generate_remotely(args: argparse.Namespace, seed: int):
    from huggingface_hub import InferenceClient

    model = args.endpoint_url or args.lora_model_id or args.base_model_id or DEFAULT_BASE
    if args.lora_scale != 1.0:
        logger.warning("--lora_scale is not sent to remote endpoints; the endpoint's own setting applies.")
    client = InferenceClient(model=model, provider=args.provider)
    with hub_errors(f"inference endpoint {model!r}"):
        return client.text_to_image(args.prompt, negative_prompt=args.negative_prompt, height=args.height,
                                    width=args.width, num_inference_steps=args.steps,
                                    guidance_scale=args.guidance, seed=seed)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.getLogger("httpx2").setLevel(logging.WARNING)
    warn_about_token_flag(args.token)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    logger.info("seed %d", seed)
    with hub_token(args.token):  # read by huggingface_hub at every request, for this call only
        image = generate_remotely(args, seed) if args.remote else generate_locally(args, seed)
    save_image(image, Path(args.output))
    print(f"Image written to {args.output} (seed {seed})")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
