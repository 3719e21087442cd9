#!/usr/bin/env python
"""Publish a trained LoRA to the Hugging Face Hub with a model card.

Uploads only the LoRA .safetensors file(s), a generated README.md (model card), a few sample
images and the run's config without secrets; nothing else in the folder is sent.

Example:
    export HF_TOKEN=...        # or: hf auth login
    python hf/upload_to_hf.py --model_path output_ghibli/<run> --repo_name you/sdxl-ghibli-lora-r4
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils.cli import run_cli  # noqa: E402 (needs the repo root on sys.path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from utils.hub_publish import DEFAULT_LICENSE

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", required=True,
                   help="a run directory (its final_model/ is published) or a model folder "
                        "(final_model/, best_model/, checkpoint_epoch_N/)")
    p.add_argument("--repo_name", required=True, help="namespace/name, or a name in your own namespace")
    p.add_argument("--token", default=None,
                   help="Hub token (discouraged: visible in the process list; use HF_TOKEN or `hf auth login`)")
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
    from utils.hub_publish import publish

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
