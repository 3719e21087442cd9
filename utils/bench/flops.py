"""FLOP counting and the hardware's peak, for model-FLOP utilisation (MFU) in the benchmarks.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions and attention;
elementwise work is not counted, as is usual for MFU). They can be counted on the ``meta`` device,
which costs neither time nor memory, so the full-size SDXL step is counted on any machine.

Peaks: the vendors' dense (no sparsity) tensor-core figures for bf16/fp16 with fp32 accumulation,
the way PyTorch runs them; on a CPU, or a GPU not in the table, a measured matmul rate.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Callable

import torch

# (substring of torch.cuda.get_device_name(), dense bf16 TFLOP/s, dense fp16 TFLOP/s); first match wins,
# so the specific names come before the general ones. None: not supported by the chip, or no published
# figure (then the rate is measured instead).
GPU_PEAK_TFLOPS: list[tuple[str, float | None, float | None]] = [
    ("B200", 2250.0, 2250.0),
    ("H200 NVL", 835.0, 835.0),
    ("H200", 989.4, 989.4),
    ("H100 NVL", 835.0, 835.0),
    ("H100 PCIe", 756.0, 756.0),
    ("H100", 989.4, 989.4),  # SXM
    ("H800", 989.4, 989.4),
    ("A100", 312.0, 312.0),
    ("A800", 312.0, 312.0),
    ("L40S", 362.1, 362.1),
    ("L40", 181.0, 181.0),
    ("L4", 121.0, 121.0),
    ("A6000", 154.8, 154.8),  # RTX A6000
    ("A40", 149.7, 149.7),
    ("A10G", None, None),  # listed so that "A10" does not match it
    ("A10", 125.0, 125.0),
    ("RTX 6000 Ada", 364.2, 364.2),
    ("RTX 4090", 165.2, 165.2),  # GeForce: fp32 accumulation runs at half the fp16-accumulate rate
    ("RTX 4080", 97.5, 97.5),
    ("RTX 3090", 71.0, 71.0),
    ("RTX 3080", 59.5, 59.5),
    ("V100", None, 125.0),
    ("T4", None, 65.0),
    ("MI300X", 1307.4, 1307.4),
    ("MI250X", 383.0, 383.0),
]


@dataclass(frozen=True)
class Peak:
    tflops: float
    source: str  # where the number comes from, printed beside it


def table_peak(device_name: str, dtype: torch.dtype) -> float | None:
    """The spec-sheet dense peak for ``device_name`` in bf16 or fp16, or None when not in the table."""
    for name, bf16, fp16 in GPU_PEAK_TFLOPS:
        if name.lower() in device_name.lower():
            return {torch.bfloat16: bf16, torch.float16: fp16}.get(dtype)
    return None


def measure_matmul_tflops(device: torch.device, dtype: torch.dtype, size: int | None = None,
                          seconds: float = 1.0) -> float:
    """Best sustained rate of square matmuls on ``device``: the practical peak where no spec applies."""
    size = size or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    deadline = time.perf_counter() + seconds
    for repeat in range(1000):
        synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        if repeat:  # the first call includes one-off set-up
            best = min(best, time.perf_counter() - start)
        if repeat >= 3 and time.perf_counter() > deadline:
            break
    return 2 * size ** 3 / best / 1e12


def device_peak(device: torch.device, dtype: torch.dtype) -> Peak:
    """The peak to divide achieved FLOP/s by: the spec sheet on a known GPU, else a measured matmul rate."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        spec = table_peak(name, dtype)
        if spec is not None:
            return Peak(spec, f"{name}, dense {_dtype_name(dtype)} spec sheet")
        return Peak(measure_matmul_tflops(device, dtype), f"{name}, measured {_dtype_name(dtype)} matmul")
    threads = torch.get_num_threads()
    return Peak(measure_matmul_tflops(device, dtype),
                f"CPU, measured {_dtype_name(dtype)} 1024x1024 matmul on {threads} thread(s)")


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of the matmuls, convolutions and attention ``fn`` runs (its backward too, if it calls one)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


# ----------------------------------------------------------------------------- one training step, on the meta device


def step_flops(model: str, resolution: int, batch_size: int, args: argparse.Namespace) -> dict[str, int]:
    """FLOPs of one training step's parts, counted on the meta device (no memory, no time).

    unet: UNet + LoRA forward and backward (the model FLOPs of MFU); unet_checkpointed: the same with
    gradient checkpointing's recomputation; vae / text: the encoders' forward passes the naive loop adds.
    """
    from diffusers import DDPMScheduler

    from utils.bench.models import build_pipeline
    from utils.core.sdxl import SDXLComponents, encode_prompts, vae_latent_distribution
    from utils.training.loss import denoising_loss
    from utils.training.model_inputs import Batch
    from utils.training.adapters import inject_lora

    pipe = build_pipeline(model, "meta")
    components = SDXLComponents([pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2],
                                pipe.vae, pipe.unet, DDPMScheduler.from_config(pipe.scheduler.config))
    for module in [pipe.vae, pipe.unet, pipe.text_encoder, pipe.text_encoder_2]:
        module.requires_grad_(False)
    vae, unet = components.vae, components.unet
    latent = resolution // 8
    pixels = torch.zeros(batch_size, 3, resolution, resolution, device="meta")
    flops = {"vae": count_flops(lambda: vae_latent_distribution(vae, pixels).sample())}
    flops["text"] = count_flops(lambda: encode_prompts(components.tokenizers, components.text_encoders,
                                                       ["a village in ghibli style"] * batch_size))
    lora_args = argparse.Namespace(**{**vars(args), "gradient_checkpointing": False})
    inject_lora(components, lora_args)
    unet.train()
    text_dim = unet.config.cross_attention_dim
    pooled_dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    batch = Batch(torch.zeros(batch_size, 4, latent, latent, device="meta"),
                  torch.zeros(batch_size, 77, text_dim, device="meta"),
                  torch.zeros(batch_size, pooled_dim, device="meta"), torch.zeros(batch_size, 6, device="meta"))
    timesteps = torch.full((batch_size,), 500, device="meta")

    def step():
        denoising_loss(unet, components.noise_scheduler, batch, torch.zeros_like(batch.latents),
                       timesteps).backward()

    flops["unet"] = count_flops(step)
    unet.enable_gradient_checkpointing()
    flops["unet_checkpointed"] = count_flops(step)
    return flops


def executed_flops(flops: dict[str, int], result: dict, cache: bool) -> int:
    """FLOPs a measured step really ran: the UNet (recomputed under checkpointing) plus, without the
    cache, the encoders."""
    unet = flops["unet_checkpointed"] if result["gradient_checkpointing"] else flops["unet"]
    return unet + (0 if cache else flops["vae"] + flops["text"])


def print_flops(settings: dict) -> None:
    """--flops_only: the FLOPs of one step of the model at the settings, printed."""
    from utils.bench.models import describe_model
    from utils.bench.report import flops_text
    from utils.training.flags import parse_training_args

    flops = step_flops(settings["model"], settings["resolution"], settings["train_batch_size"],
                       parse_training_args([]))
    print(f"model '{settings['model']}': {describe_model(settings['model'])}")
    print(f"one training step at {settings['resolution']}x{settings['resolution']}, batch "
          f"{settings['train_batch_size']} (torch.utils.flop_counter on the meta device):")
    print(f"  UNet+LoRA forward+backward {flops_text(flops['unet'])}; with gradient checkpointing "
          f"{flops_text(flops['unet_checkpointed'])}")
    print(f"  the naive loop adds: VAE encode {flops_text(flops['vae'])}, text encoders {flops_text(flops['text'])}")
