"""What the kohya tests share: rendering the tiny pipeline with a LoRA, the same LoRA merged by hand,
utils/convert_lora.py run in-process, and LyCORIS' published LoHa/LoKr formulas."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import torch

from utils.convert_lora import main as convert_main
from utils.core.cli import run_cli

PROMPT = "a village in ghibli style"
KOHYA_KEY = re.compile(r"(lora_unet|lora_te1|lora_te2)_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)")
ATTENTIONS = [f"{prefix}_transformer_blocks_0_{attn}_{proj}"
              for prefix in ("input_blocks_3_1", "middle_block_1", "output_blocks_0_1", "output_blocks_1_1")
              for attn in ("attn1", "attn2") for proj in ("to_q", "to_k", "to_v", "to_out_0")]
# Suffixes diffusers writes for PEFT's lora_A / lora_B (parsed here without the converter under test).
DOWN_UP = [(".lora_A.weight", ".lora_B.weight"), (".lora.down.weight", ".lora.up.weight"),
           (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight")]


def render(pipe) -> tuple[np.ndarray, torch.Tensor]:
    """An image (fixed seed, no CFG to keep it cheap) and the prompt embeddings."""
    with torch.no_grad():
        embeddings = pipe.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=False)[0]
        image = pipe(PROMPT, num_inference_steps=2, guidance_scale=1.0, height=64, width=64, output_type="np",
                     generator=torch.Generator().manual_seed(0)).images[0]
    return image, embeddings


def render_with(pipe, folder: Path, weight_name: str) -> tuple[np.ndarray, torch.Tensor]:
    pipe.load_lora_weights(str(folder), weight_name=weight_name, adapter_name="under_test")
    try:
        return render(pipe)
    finally:
        pipe.unload_lora_weights()


def diffusers_file_deltas(path: Path, scale: float) -> dict[tuple[str, str], tuple]:
    """(component, module) -> (A, B, scale) from a diffusers-format file."""
    from utils.lora.files import read_tensors

    tensors, deltas = read_tensors(path), {}
    for key, down in tensors.items():
        for down_suffix, up_suffix in DOWN_UP:
            if key.endswith(down_suffix):
                component, _, module = key[: -len(down_suffix)].partition(".")
                deltas[(component, module)] = (down, tensors[key[: -len(down_suffix)] + up_suffix], scale)
    return deltas


def peft_deltas(models: dict) -> dict[tuple[str, str], tuple]:
    """(component, module) -> (A, B, scale) as PEFT applies them in memory."""
    deltas = {}
    for component, model in models.items():
        for name, layer in model.named_modules():
            if hasattr(layer, "lora_A") and "default" in layer.lora_A:
                deltas[(component, name)] = (layer.lora_A["default"].weight.detach().clone(),
                                             layer.lora_B["default"].weight.detach().clone(),
                                             layer.scaling["default"])
    return deltas


def render_merged_by_hand(pipe, deltas: dict) -> tuple[np.ndarray, torch.Tensor]:
    """Render with W + scale * B @ A written into the base weights (convolutions flattened to matrices)."""
    layers = []
    for (component, module), (down, up, scale) in deltas.items():
        model = getattr(pipe, component)
        layer = model.get_submodule(module if hasattr(model, "text_model") else module.removeprefix("text_model."))
        layers.append((layer, layer.weight.detach().clone(), scale * (up.flatten(1) @ down.flatten(1))))
    try:
        with torch.no_grad():
            for layer, weight, delta in layers:
                layer.weight += delta.reshape(weight.shape)
        return render(pipe)
    finally:
        with torch.no_grad():
            for layer, weight, _ in layers:
                layer.weight.copy_(weight)


def assert_close(a, b, tolerance: float = 2e-4) -> None:
    a, b = torch.as_tensor(np.asarray(a)), torch.as_tensor(np.asarray(b))
    assert (a - b).abs().max().item() < tolerance


def data_section_sha256(path: Path) -> str:
    blob = path.read_bytes()
    return hashlib.sha256(blob[8 + int.from_bytes(blob[:8], "little"):]).hexdigest()


def convert_cli(*argv: str) -> int:
    """utils/convert_lora.py in-process, through the runner every command uses (one test runs it as a subprocess too)."""
    return run_cli(lambda: convert_main([str(a) for a in argv]))


def lycoris_delta(weights: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """LyCORIS' published formulas, read from its kohya-format keys (which this pops, to show all are used)."""
    alpha = weights.pop("alpha").item()
    if "hada_w1_a" in weights:
        w1b = weights.pop("hada_w1_b")
        delta = (weights.pop("hada_w1_a") @ w1b) * (weights.pop("hada_w2_a") @ weights.pop("hada_w2_b"))
        return (delta * alpha / w1b.shape[0]).reshape(shape)
    dim = None
    w1 = weights.pop("lokr_w1", None)
    if w1 is None:
        w1b = weights.pop("lokr_w1_b")
        w1, dim = weights.pop("lokr_w1_a") @ w1b, w1b.shape[0]
    w2 = weights.pop("lokr_w2", None)
    if w2 is None:
        w2b = weights.pop("lokr_w2_b")
        w2, dim = weights.pop("lokr_w2_a") @ w2b, w2b.shape[0]
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    scale = alpha / dim if dim else 1.0
    return torch.kron(w1, w2).reshape(shape) * scale
