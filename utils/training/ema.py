"""An exponential moving average of the trainable adapter weights (``--use_ema``), in fp32 on the device.

After every ``--ema_update_every``-th optimizer step: ``ema = decay * ema + (1 - decay) * weight``, starting
from the weights the training starts with. It is saved in each resumable checkpoint (``ema.safetensors``)
and restored on resume; ``weights_of`` puts it into the model for validation, evaluation and saving.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file

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
