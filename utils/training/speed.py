"""What keeps a training run fast by default: the gradient-checkpointing decision, the evaluation
budget, per-step losses read without a host sync per step, and the set-up timeline.

Kept apart from trainer.py so each piece can be tested on its own, on a CPU.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- gradient checkpointing

GIB = 1024 ** 3
ACTIVATION_MARGIN = 1.3  # allocator fragmentation, the backward's transient buffers, the loss
FIXED_MARGIN = 1 * GIB  # CUDA context growth, cuDNN/cuBLAS workspaces


def estimate_activation_bytes(unet_config, resolution: int, batch_size: int, dtype: torch.dtype,
                              lora_config=None) -> int:
    """Bytes autograd keeps for the backward of one training step without checkpointing.

    The UNet is built on the meta device (no memory, no compute) and every tensor saved for the
    backward pass is counted as the forward runs, at batch 1 and 2: their difference is one sample's
    activations (weights saved for the backward, already in memory, cancel out).
    """
    one, two = (_saved_bytes(unet_config, resolution, batch, dtype, lora_config) for batch in (1, 2))
    return (two - one) * batch_size


def _saved_bytes(unet_config, resolution: int, batch_size: int, dtype: torch.dtype, lora_config) -> int:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config).to(dtype)
    unet.requires_grad_(False)
    if lora_config is not None:
        unet.add_adapter(lora_config)
        for name, parameter in unet.named_parameters():
            if "lora_" in name:
                parameter.data = parameter.data.float()
                parameter.requires_grad_(True)
    latent = resolution // 8
    pooled_dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    meta = {"device": "meta", "dtype": dtype}
    latents = torch.zeros(batch_size, unet.config.in_channels, latent, latent, **meta)
    embeds = torch.zeros(batch_size, 77, unet.config.cross_attention_dim, **meta)
    conditions = {"text_embeds": torch.zeros(batch_size, pooled_dim, **meta),
                  "time_ids": torch.zeros(batch_size, 6, **meta)}
    timesteps = torch.full((batch_size,), 500, device="meta")
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        unet(latents, timesteps, embeds, added_cond_kwargs=conditions, return_dict=False)[0].float().mean()
    return total


def choose_gradient_checkpointing(setting, device_type: str, free_bytes: int | None = None,
                                  activation_bytes: int | None = None) -> tuple[bool, str]:
    """(on?, why). ``setting`` is True/False (forced by a flag) or 'auto'."""
    if setting is True:
        return True, "forced on by --gradient_checkpointing"
    if setting is False:
        return False, "forced off by --no-gradient_checkpointing"
    if device_type != "cuda":
        return False, (f"auto: off on {device_type.upper()} (memory is not the limit there; checkpointing would "
                       f"recompute activations, about 1.4-1.55x the time per step)")
    needed = int(activation_bytes * ACTIVATION_MARGIN) + FIXED_MARGIN
    numbers = f"estimated {activation_bytes / GIB:.1f} GiB of activations, {free_bytes / GIB:.1f} GiB free"
    if needed <= free_bytes:
        return False, f"auto: off, the step fits without it ({numbers})"
    return True, f"auto: on, the step would not fit without it ({numbers})"


# ----------------------------------------------------------------------------- evaluation budget

EVAL_BUDGET = 0.05  # share of the training compute the fixed-noise loss may take
FORWARD_PER_TRAINING_SAMPLE = 3  # a training step (forward + backward) costs about 3 forward passes
MAX_EVAL_SAMPLES = 32  # 8 images x 4 timesteps: enough for a stable comparison
MIN_EVAL_SAMPLES = 8  # fewer makes measuring every epoch pointless; measure less often instead


@dataclass(frozen=True)
class EvalPlan:
    every_epochs: int  # 0: off
    samples: int  # (image, noise, timestep) triples per measurement
    measurements: int  # the one before training and those after epochs
    share: float  # eval forward passes / training forward passes (forward + backward counted as 3)

    def after_epoch(self, epoch: int, last_epoch: int) -> bool:
        """Measure after this 0-based epoch? Every N epochs, and always after the last."""
        return self.every_epochs > 0 and ((epoch + 1) % self.every_epochs == 0 or epoch == last_epoch)

    def describe(self) -> str:
        if not self.every_epochs:
            return "fixed-noise validation loss off (best_model: lowest mean training loss per epoch)"
        return (f"fixed-noise validation loss on {self.samples} triples, before training and every "
                f"{self.every_epochs} epoch(s) and after the last: {self.measurements} measurements, "
                f"{100 * self.share:.1f}% of the training compute")


def count_measurements(every: int, num_epochs: int) -> int:
    """The measurement before training plus those after every ``every``-th epoch and after the last."""
    if num_epochs <= 0:
        return 1
    return 1 + num_epochs // every + (1 if num_epochs % every else 0)


def plan_evaluation(training_samples: int, num_epochs: int, every="auto", samples="auto") -> EvalPlan:
    """How often and on how many triples to measure the fixed-noise loss.

    ``training_samples`` = optimizer steps x effective batch. By default the measurements together cost
    at most ``EVAL_BUDGET`` of the training (one forward per triple against about three per training
    sample): the most frequent cadence that still gets ``MIN_EVAL_SAMPLES`` triples, else only
    before and after training on what the budget allows (at least one triple).
    """
    if every == 0:
        return EvalPlan(0, 0, 0, 0.0)
    budget = EVAL_BUDGET * FORWARD_PER_TRAINING_SAMPLE * max(training_samples, 1)

    def fitting_samples(cadence: int) -> int:
        return int(budget // count_measurements(cadence, num_epochs))

    def fits(cadence: int) -> bool:
        if samples == "auto":
            return fitting_samples(cadence) >= MIN_EVAL_SAMPLES
        return count_measurements(cadence, num_epochs) * samples <= budget

    if every == "auto":  # the most frequent cadence that fits (a long run may have very many epochs)
        every = next((c for c in range(1, num_epochs + 1) if fits(c)), None)
        if every is None:
            every = num_epochs if samples != "auto" else max(num_epochs, 1)
    if samples == "auto":
        samples = max(1, min(MAX_EVAL_SAMPLES, fitting_samples(every)))
    measurements = count_measurements(every, num_epochs)
    share = measurements * samples / (FORWARD_PER_TRAINING_SAMPLE * max(training_samples, 1))
    return EvalPlan(every, samples, measurements, share)


def eval_timesteps(samples: int, num_train_timesteps: int) -> torch.Tensor:
    """One timestep per triple, at the midpoints of equal slices of the schedule."""
    return torch.linspace(0, num_train_timesteps - 1, samples * 2 + 1)[1::2].round().long()


# ----------------------------------------------------------------------------- per-step losses


@dataclass
class StepRecord:
    epoch: int
    step: int
    learning_rate: float
    loss: float
    skipped: bool  # the optimizer step was skipped for a non-finite loss or gradient


@dataclass
class StepLosses:
    """Per-step losses and skip flags kept on the device, read in one transfer every ``read_every`` steps.

    On a GPU a ``.item()`` per step would make the host wait for the step to finish before queuing
    the next one; here the host reads only at log points (and where the loop needs the values:
    epoch ends, checkpoints, stops).
    """

    read_every: int
    pending: list = field(default_factory=list)
    reads: int = 0  # host transfers so far (what the test counts)

    def add(self, epoch: int, step: int, learning_rate: float, loss: torch.Tensor, skipped: torch.Tensor) -> None:
        self.pending.append((epoch, step, learning_rate, loss.detach().float().reshape(()),
                             skipped.detach().float().reshape(())))

    def due(self, step: int) -> bool:
        return bool(self.pending) and (self.read_every <= 1 or step % self.read_every == 0)

    def read(self) -> list[StepRecord]:
        if not self.pending:
            return []
        values = torch.stack([torch.stack([loss, skipped]) for *_, loss, skipped in self.pending]).cpu().tolist()
        self.reads += 1
        records = [StepRecord(epoch, step, lr, loss, bool(skipped))
                   for (epoch, step, lr, _, _), (loss, skipped) in zip(self.pending, values)]
        self.pending = []
        return records


def read_interval(device_type: str) -> int:
    """Steps between host reads of the losses: every step on a CPU (a read costs nothing there)."""
    return 1 if device_type == "cpu" else 25


# ----------------------------------------------------------------------------- set-up timeline


@dataclass
class Timeline:
    """Wall-clock marks of a run: set-up phases, first and last optimizer step (for logs/timings.json)."""

    started: float = field(default_factory=time.time)
    phases: dict = field(default_factory=dict)
    first_step: float | None = None
    last_step: float | None = None
    steps: int = 0
    step_marks: list = field(default_factory=list)

    @contextlib.contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - start

    def step_done(self) -> None:
        now = time.time()
        if self.first_step is None:
            self.first_step = now
            logger.info("First optimizer step done %.1f s after start (set-up: %s)", now - self.started,
                        ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.phases.items()))
        self.last_step = now
        self.steps += 1
        self.step_marks.append(now)

    def summary(self) -> dict:
        ended = time.time()
        rate = None
        if self.steps > 1 and self.last_step > self.first_step:
            rate = (self.steps - 1) / (self.last_step - self.first_step)
        intervals = [b - a for a, b in zip(self.step_marks[2:], self.step_marks[3:])]
        steady = 1 / sorted(intervals)[len(intervals) // 2] if intervals and min(intervals) > 0 else None
        return {"started": self.started, "first_step": self.first_step, "last_step": self.last_step,
                "ended": ended, "steps": self.steps,
                "time_to_first_step_s": None if self.first_step is None else self.first_step - self.started,
                "first_to_last_steps_per_s": rate, "steady_steps_per_s": steady, "wall_s": ended - self.started,
                "setup_phases_s": self.phases}

    def write(self, path: Path) -> dict:
        from utils.core.atomic import write_json
        summary = self.summary()
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, summary)
        rate = summary["first_to_last_steps_per_s"]
        logger.info("Timing: first step after %s s, %s steps/s from the first to the last step, %.1f s in all",
                    _fmt(summary["time_to_first_step_s"]), _fmt(rate, 3), summary["wall_s"])
        return summary


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def read_timings(path: Path) -> dict:
    return json.loads(path.read_text())
