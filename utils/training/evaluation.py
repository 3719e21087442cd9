"""The fixed-noise validation loss: how often and on how many (latent, noise, timestep) triples it is
measured within its share of the training compute (``EvalPlan``), the triples themselves, fixed once
(``EvalSet``), the measurement, and the seeded share of the images held out for it (--validation_split)."""

from __future__ import annotations

import argparse
import math
import random
from dataclasses import dataclass, field

import torch

from utils.core.errors import TrainingError
from utils.core.sdxl import encode_prompts, scale_latents, vae_latent_distribution
from utils.data.records import Example
from utils.training.batches import Item, orientation_time_ids, prepare_item
from utils.training.loss import denoising_loss
from utils.training.model_inputs import Batch, caption_text

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


def evaluation_plan(args: argparse.Namespace, steps_per_epoch: int, max_train_steps: int,
                    num_processes: int) -> EvalPlan:
    """The fixed-noise loss's cadence and size for this run's planned training compute (the run's optimizer
    steps, as the recipe counted them; --train_batch_size, --gradient_accumulation_steps, --eval_loss_epochs
    and --eval_loss_samples)."""
    effective_batch = args.train_batch_size * args.gradient_accumulation_steps * num_processes
    return plan_evaluation(max_train_steps * effective_batch, math.ceil(max_train_steps / steps_per_epoch),
                           args.eval_loss_epochs, args.eval_loss_samples)


@dataclass
class EvalSet:
    """Fixed (latent, noise, timestep, conditioning) triples, in batches: the same every time it is measured."""

    batches: list[tuple[Batch, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    plan: EvalPlan = field(default_factory=lambda: EvalPlan(0, 0, 0, 0.0))


@torch.no_grad()
def build_eval_set(components, items: list[Item], plan: EvalPlan, args, weight_dtype: torch.dtype,
                   device: torch.device) -> EvalSet:
    """``plan.samples`` triples: images in turn, one timestep each spread over the schedule, seeded noise."""
    eval_set = EvalSet(plan=plan)
    if not plan.every_epochs or not items:
        return eval_set
    generator = torch.Generator().manual_seed(args.seed + 1)
    timesteps = eval_timesteps(plan.samples, components.noise_scheduler.config.num_train_timesteps)
    encoded = {}
    for index in sorted({k % len(items) for k in range(plan.samples)}):
        item = items[index]
        prepared = prepare_item(item, center_crop=True)
        distribution = vae_latent_distribution(components.vae, prepared.pixels[None])
        embeds, pooled = encode_prompts(components.tokenizers, components.text_encoders, [caption_text(item.example.caption, args, shuffle=False)])
        encoded[index] = (scale_latents(components.vae, distribution.mean.float())[0], embeds[0], pooled[0],
                          orientation_time_ids(prepared)[0])
    triples = [encoded[k % len(items)] for k in range(plan.samples)]
    chunk = max(1, 4 * args.train_batch_size)
    for start in range(0, plan.samples, chunk):
        part = triples[start:start + chunk]
        latents = torch.stack([t[0] for t in part])
        noise = torch.randn(latents.shape, generator=generator)
        batch = Batch(*(torch.stack([t[i] for t in part]).to(device, weight_dtype) for i in range(4)))
        eval_set.batches.append((batch, noise.to(device, weight_dtype), timesteps[start:start + chunk].to(device)))
    return eval_set


@torch.no_grad()
def evaluate(unet, noise_scheduler, eval_set: EvalSet) -> float | None:
    """Mean loss over the triples, batched, without gradients, in the compute dtype (the prepared model's
    autocast); one host read at the end."""
    if not eval_set.batches:
        return None
    was_training = unet.training
    unet.eval()
    total = sum(denoising_loss(unet, noise_scheduler, batch, noise, t) * len(t) for batch, noise, t in eval_set.batches)
    unet.train(was_training)
    return float(total) / sum(len(t) for *_, t in eval_set.batches)


def evaluate_base(run) -> float | None:
    """The loss before training, measured with the adapters off: LoRA starts as the identity (B = 0),
    so this equals the loss at step 0 without costing set-up time before the first step."""
    unet = run.accelerator.unwrap_model(run.components.unet)
    unet.disable_adapters()
    try:
        return evaluate(run.components.unet, run.components.noise_scheduler, run.eval_set)
    finally:
        unet.enable_adapters()


def split_examples(examples: list[Example], validation_split: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out a fixed, seeded share of the images for the validation loss (at least one if asked)."""
    if validation_split <= 0:
        return examples, []
    count = max(1, round(len(examples) * validation_split))
    if count >= len(examples):
        raise TrainingError(f"--validation_split {validation_split} leaves no training images "
                            f"out of {len(examples)}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held_out = set(order[:count])
    return ([e for i, e in enumerate(examples) if i not in held_out],
            [e for i, e in enumerate(examples) if i in held_out])
