"""The adapters PEFT adds to the frozen SDXL: the config from the flags (LoRA, LoHa or LoKr) and its
injection into the UNet and, with --train_text_encoder, both text encoders; and, with --use_ema, the
exponential moving average of the trained adapter weights, in fp32 on the device: after every
``--ema_update_every``-th optimizer step ``ema = decay * ema + (1 - decay) * weight``, starting from the
weights the training starts with. It is saved in each resumable checkpoint (``ema.safetensors``) and
restored on resume; ``weights_of`` puts it into the model for validation, evaluation and saving."""

from __future__ import annotations

import argparse
import contextlib
import warnings
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file

TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def lora_config(args: argparse.Namespace, target_modules: list[str]):
    """PEFT's LoraConfig (or LoHaConfig/LoKrConfig for --lora_type) from the flags, for the target modules."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig
    if args.lora_type == "loha":
        return LoHaConfig(r=args.lora_rank, alpha=args.lora_alpha, target_modules=target_modules)
    if args.lora_type == "lokr":
        return LoKrConfig(r=args.lora_rank, alpha=args.lora_alpha, target_modules=target_modules,
                          decompose_factor=args.lokr_factor, decompose_both=args.lokr_decompose_both)
    return LoraConfig(
        r=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=target_modules,
        init_lora_weights="gaussian" if args.init_lora_weights == "gaussian" else True,
        use_dora=args.use_dora,
        use_rslora=args.use_rslora,
    )


def adapter_name(index: int) -> str:
    """The PEFT adapter name of the ``index``-th run of a pack (utils/training/pack.py); the first has PEFT's
    default name, so that a run alone is a pack of one."""
    return "default" if index == 0 else f"run{index}"


def add_adapters(components, runs: list[argparse.Namespace]) -> list[list[torch.nn.Parameter]]:
    """One adapter per run on the UNet (and both text encoders with --train_text_encoder), trainable, fp32.

    Each adapter is initialised from its run's seed alone (the global RNG forked and seeded around it), so the
    draws that follow (data, noise, timesteps) do not depend on the rank: the runs of a grid draw the same,
    alone or packed. Returns each run's trainable parameters, in the model's order."""
    models = [components.unet] + (list(components.text_encoders) if runs[0].train_text_encoder else [])
    devices = sorted({p.device.index for m in models for p in m.parameters() if p.device.type == "cuda"})
    for index, run in enumerate(runs):
        with torch.random.fork_rng(devices=devices), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*multiple adapters.*")  # what a pack is
            torch.manual_seed(run.seed)
            components.unet.add_adapter(lora_config(run, run.lora_target_modules), adapter_name=adapter_name(index))
            for encoder in models[1:]:
                encoder.add_adapter(lora_config(run, TEXT_ENCODER_TARGETS), adapter_name=adapter_name(index))
    params = []
    for index in range(len(runs)):
        own = [p for model in models for name, p in model.named_parameters()
               if adapter_name(index) in name.split(".")]  # lora_A.run1.weight, hada_w1_a.run1
        for p in own:
            p.data = p.data.float()
            p.requires_grad_(True)
        params.append(own)
    if runs[0].enable_xformers_memory_efficient_attention:
        components.unet.enable_xformers_memory_efficient_attention()
    return params


def inject_lora(components, args: argparse.Namespace) -> list[torch.nn.Parameter]:
    """Add the run's adapter (trainable, fp32) to the UNet and, if asked, both text encoders."""
    return add_adapters(components, [args])[0]


# ----------------------------------------------------------------------------- the moving average of the adapter weights (--use_ema)


EMA_FILE = "ema.safetensors"
RAW_WEIGHT_NAME = "raw_lora_weights.safetensors"  # the raw (non-EMA) weights beside the EMA model


class AdapterEMA:
    """The fp32 moving average of ``params`` (the trainable adapter weights, in a fixed order)."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float, update_every: int = 1):
        self.params, self.decay, self.update_every = list(params), decay, update_every
        self.shadow = [p.detach().to(torch.float32).clone() for p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold the current weights in after optimizer step ``step`` (1-based), every ``update_every`` steps."""
        if step % self.update_every:
            return
        torch._foreach_mul_(self.shadow, self.decay)
        torch._foreach_add_(self.shadow, [p.detach().to(torch.float32) for p in self.params],
                            alpha=1.0 - self.decay)

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """The EMA weights in the model for the block; the raw weights back afterwards, bit for bit."""
        raw = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, average in zip(self.params, self.shadow):
                p.copy_(average)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, saved in zip(self.params, raw):
                    p.copy_(saved)

    def save(self, folder: Path) -> None:
        save_file({f"{i:05d}": t.detach().cpu().contiguous() for i, t in enumerate(self.shadow)},
                  str(folder / EMA_FILE))

    def load(self, folder: Path) -> None:
        saved = load_file(str(folder / EMA_FILE))
        if len(saved) != len(self.shadow):
            raise RuntimeError(f"{folder / EMA_FILE}: {len(saved)} averaged tensors, this run trains "
                               f"{len(self.shadow)} (resume with the same adapter flags)")
        with torch.no_grad():
            for i, average in enumerate(self.shadow):
                average.copy_(saved[f"{i:05d}"])


def weights_of(ema: AdapterEMA | None) -> contextlib.AbstractContextManager:
    """``ema.swapped()``, or nothing to do when EMA is off."""
    return ema.swapped() if ema is not None else contextlib.nullcontext()
