#!/usr/bin/env python
"""Publish a trained LoRA to the Hugging Face Hub with a model card.

Uploads only the LoRA .safetensors file(s), a generated README.md (model card), a few sample
images and the run's config without secrets; nothing else in the folder is sent.

Example:
    export HF_TOKEN=...        # or: hf auth login
    python hf/upload_to_hf.py --model_path output_ghibli/<run> --repo_name you/sdxl-ghibli-lora-r4

From Python, the original's function: ``upload_model_to_hf(model_path, repo_name, token, private=False)``
(token None: HF_TOKEN or the saved login) returns the repo URL.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils.core.cli import Parser, run_cli  # noqa: E402 (needs the repo root on sys.path)
from utils.hub.token import add_token_argument, warn_about_token_flag  # noqa: E402

logger = logging.getLogger("upload_to_hf")


def upload_model_to_hf(model_path: str | os.PathLike, repo_name: str, token: str | None, private: bool = False,
                       *, license_name: str | None = None, base_model: str | None = None,
                       instance_prompt: str | None = None, sample_images: list[str] | None = None,
                       commit_message: str | None = None) -> str:
    """Publish a run directory or model folder to the Hub repo ``repo_name``; return the repo URL.

    Only the LoRA file(s), a model card, sample images and the run's config without secrets are
    sent (see utils/hub/publish.py); the repo is created (private if asked) when missing.
    ``token`` None means HF_TOKEN or the saved login; it is never saved. The keyword-only
    arguments are those of upload_to_hf.py's flags. Raises a one-line HubError/FileNotFoundError.
    """
    from utils.hub.publish import DEFAULT_LICENSE, publish

    result = publish(model_path, repo_name, token=token, private=private,
                     license_name=license_name or DEFAULT_LICENSE, base_model=base_model,
                     instance_prompt=instance_prompt, sample_images=sample_images, commit_message=commit_message)
    logger.info("Published to %s", result.url)
    return result.url


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from utils.hub.publish import DEFAULT_LICENSE

    p = Parser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python hf/upload_to_hf.py --model_path output_ghibli/<run> \\\n"
               "      --repo_name you/sdxl-ghibli-lora-r4")
    p.add_argument("--model_path", required=True,
                   help="a run directory (its final_model/ is published) or a model folder "
                        "(final_model/, best_model/, checkpoint_epoch_N/)")
    p.add_argument("--repo_name", required=True, help="namespace/name, or a name in your own namespace")
    add_token_argument(p)
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--commit_message", default=None)
    p.add_argument("--revision", default=None, help="branch to commit to (created if missing; default main)")
    p.add_argument("--create_pr", action="store_true", help="open a pull request instead of committing directly")
    p.add_argument("--license", default=DEFAULT_LICENSE, help="license in the model card")
    p.add_argument("--base_model", default=None,
                   help="Hub id of the base model for the card (default: the one recorded in the LoRA file, "
                        "when it is a Hub id)")
    p.add_argument("--instance_prompt", default=None,
                   help="trigger prompt for the card (default: the caption phrase most training images share)")
    p.add_argument("--sample_images", nargs="+", default=None,
                   help="images, or folders of inference_sdxl_ghibli.py output, to show in the card "
                        "(default: the run's last validation images)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.getLogger("httpx2").setLevel(logging.WARNING)
    from utils.hub.publish import publish

    warn_about_token_flag(args.token)
    result = publish(args.model_path, args.repo_name, token=args.token, private=args.private,
                     license_name=args.license, base_model=args.base_model, instance_prompt=args.instance_prompt,
                     sample_images=args.sample_images, commit_message=args.commit_message,
                     revision=args.revision, create_pr=args.create_pr)
    print(f"Published to {result.url}")
    if result.pr_url:
        print(f"Pull request: {result.pr_url}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
