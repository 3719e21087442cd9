"""Digests of the final LoRA tensors of a few fixed-seed tiny trainings, to show that a change to the training
step leaves its results bit-equal.

    python -m tests.step_digests write before.json    # on the code before the change
    python -m tests.step_digests compare before.json  # after it: every configuration's digest must match

Each configuration trains the tiny SDXL in this process through train_sdxl_lora.py; its digest is the SHA-256
of every tensor (name, dtype, shape, bytes) of every .safetensors file in final_model/, and of the step losses
in the per-step log. Digests compare only between the same torch, diffusers and peft versions on the same kind
of device.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.helpers import csv_rows, run_in_process  # noqa: E402
from utils.core.layout import CONFIG_FILE, RunLayout  # noqa: E402

BASE = ["--resolution", "32", "--train_batch_size", "1", "--num_train_epochs", "2", "--learning_rate", "1e-2",
        "--report_to", "none", "--min_image_size", "0", "--seed", "7"]
# name -> (dataset, flags after BASE)
CONFIGS = {
    "default": ("plain", []),
    "buckets_no_cache_min_snr": ("sizes", ["--resolution", "128", "--no-cache", "--snr_gamma", "5"]),
    "resume_mid_run": ("plain", ["--checkpointing_steps", "2", "--random_flip"]),
    "lokr_ema": ("plain", ["--lora_type", "lokr", "--use_ema", "--ema_update_every", "1"]),
    "masked_reg": ("masked", ["--masked_loss", "--reg_data_dir", "{reg}", "--prior_loss_weight", "0.5"]),
}


def noise_image(path: Path, seed: int, width: int = 32, height: int = 32, alpha: bool = False) -> None:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 4 if alpha else 3), dtype=np.uint8)
    if alpha:
        pixels[:, :, 3] = 0
        pixels[:, : width // 2, 3] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode="RGBA" if alpha else "RGB").save(path)


def make_datasets(root: Path) -> dict[str, Path]:
    """plain: 3 square images; sizes: 4 images of different aspect ratios; masked: one image with a mask
    file, one with an alpha mask; reg: 3 regularisation images in a kohya folder."""
    sets = {}
    for name, sizes in {"plain": [(32, 32)] * 3, "sizes": [(160, 96), (96, 160), (128, 128), (192, 64)],
                        "masked": [(32, 32)] * 2}.items():
        folder = root / name
        captions = {}
        for index, (width, height) in enumerate(sizes):
            file = f"image_{index}.png"
            noise_image(folder / "images" / file, 10 * len(sets) + index, width, height,
                        alpha=name == "masked" and index == 1)
            captions[file] = f"a painted landscape number {index}, ghibli style"
        (folder / "captions.json").write_text(json.dumps(captions))
        sets[name] = folder
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[:, :16] = 255
    (sets["masked"] / "masks").mkdir()
    Image.fromarray(mask).save(sets["masked"] / "masks" / "image_0.png")
    for index in range(3):
        image = root / "reg" / "1_picture" / f"reg_{index}.png"
        noise_image(image, 100 + index)
        image.with_suffix(".txt").write_text(f"a picture {index}")
    sets["reg"] = root / "reg"
    return sets


def digest(run_dir: Path) -> str:
    import torch
    from safetensors.torch import load_file

    layout = RunLayout(run_dir)
    hasher = hashlib.sha256()
    for file in sorted(layout.final_model.glob("*.safetensors")):
        tensors = load_file(str(file))
        for key in sorted(tensors):
            tensor = tensors[key].contiguous()
            hasher.update(f"{file.name}:{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            hasher.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    for row in csv_rows(layout.step_log):
        hasher.update(f"{row['step']}:{row['loss']}".encode())
    return hasher.hexdigest()


def train(model: Path, dataset: Path, output: Path, *flags: str) -> Path:
    run_in_process("train_sdxl_lora.py", "--pretrained_model_name_or_path", str(model), "--dataset_dir",
                   str(dataset), "--output_dir", str(output), *BASE, *flags)
    (run_dir,) = [p for p in output.iterdir() if p.is_dir() and (p / CONFIG_FILE).is_file()]
    return run_dir


def resumed_copy(model: Path, dataset: Path, straight: Path, work: Path, *flags: str) -> Path:
    """The straight run copied as it stood at checkpoint-2 (mid epoch 0 of 3 steps), then resumed to the end."""
    copy = work / "resumed" / straight.name
    shutil.copytree(straight, copy)
    layout = RunLayout(copy)
    shutil.rmtree(layout.final_model)
    for checkpoint in layout.checkpoints.iterdir():
        if RunLayout.checkpoint_step(checkpoint) != 2:
            shutil.rmtree(checkpoint)
    run_in_process("train_sdxl_lora.py", "--pretrained_model_name_or_path", str(model), "--dataset_dir",
                   str(dataset), "--output_dir", str(copy.parent), *BASE, *flags,
                   "--resume_from_checkpoint", str(layout.checkpoint(2)))
    return copy


def digests(work: Path) -> dict:
    import diffusers
    import peft
    import torch

    from utils.tiny.sdxl import save_tiny_sdxl

    model = work / "tiny_sdxl"
    if not model.is_dir():
        save_tiny_sdxl(model)
    sets = make_datasets(work / "data")
    result = {"versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                           "peft": peft.__version__}, "digests": {}}
    for name, (dataset, flags) in CONFIGS.items():
        flags = [flag.format(reg=sets["reg"]) for flag in flags]
        run_dir = train(model, sets[dataset], work / name, *flags)
        result["digests"][name] = digest(run_dir)
        if name == "resume_mid_run":
            result["digests"]["resume_mid_run_resumed"] = digest(
                resumed_copy(model, sets[dataset], run_dir, work / name, *flags))
        print(f"{name}: {result['digests'][name]}", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["write", "compare"])
    parser.add_argument("file", type=Path)
    parser.add_argument("--work_dir", type=Path, default=None, help="keep the runs here (default: a temp folder)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as temporary:
        work = args.work_dir or Path(temporary)
        work.mkdir(parents=True, exist_ok=True)
        result = digests(work)
    if args.action == "write":
        args.file.write_text(json.dumps(result, indent=2) + "\n")
        return 0
    expected = json.loads(args.file.read_text())
    if expected["versions"] != result["versions"]:
        print(f"versions differ: {expected['versions']} then, {result['versions']} now")
    different = [name for name in expected["digests"] if expected["digests"][name] != result["digests"].get(name)]
    for name in expected["digests"]:
        print(f"{name}: {'different' if name in different else 'bit-equal'}")
    return 1 if different else 0


if __name__ == "__main__":
    sys.exit(main())
