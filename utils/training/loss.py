"""The training objective: the noise (with --noise_offset), the timesteps a step trains on (uniform by
default, biased as in the diffusers SDXL example with ``--timestep_bias_*``, or logit-normal), and the
denoising loss with its options (min-SNR-γ, a loss mask, per-image loss weights); for a pack of runs, each
run's loss on its own copy of the batch."""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from utils.training.model_inputs import Batch


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023): min(SNR, γ)/SNR for ε, min(SNR, γ)/(SNR+1) for v."""
    from diffusers.training_utils import compute_snr
    snr = compute_snr(noise_scheduler, timesteps)
    clipped = torch.clamp(snr, max=gamma)
    if noise_scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


def denoising_loss(unet, noise_scheduler, batch: Batch, noise: torch.Tensor, timesteps: torch.Tensor,
                   snr_gamma: float | None = None) -> torch.Tensor:
    """Mean squared error of the UNet's prediction against the scheduler's target."""
    prediction, target = predict(unet, noise_scheduler, batch, noise, timesteps)
    return batch_loss(prediction, target, batch, noise_scheduler, timesteps, snr_gamma)


def predict(unet, noise_scheduler, batch: Batch, noise: torch.Tensor,
            timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the UNet's prediction for the noised latents, the scheduler's target: the noise, or v)."""
    noisy = noise_scheduler.add_noise(batch.latents, noise, timesteps)
    prediction = unet(
        noisy, timesteps, batch.prompt_embeds,
        added_cond_kwargs={"text_embeds": batch.pooled, "time_ids": batch.time_ids},
        return_dict=False,
    )[0]
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(batch.latents, noise, timesteps)
    else:
        target = noise
    return prediction, target


def batch_loss(prediction: torch.Tensor, target: torch.Tensor, batch: Batch, noise_scheduler,
               timesteps: torch.Tensor, snr_gamma: float | None = None) -> torch.Tensor:
    """The batch's loss: per image the squared error averaged over its pixels, or with a mask over the
    mask, sum(l*m) / sum(m); then times the image's min-SNR weight and its loss weight; then the batch mean.

    The mask only chooses which latent pixels an image's loss averages, whatever the target is (noise, or
    v with --prediction_type v_prediction); min-SNR-γ then weights that per-image loss by its timestep
    exactly as the unmasked loss, and --prior_loss_weight multiplies a regularisation image's loss last
    (kohya sd-scripts' order). The batch mean divides by the batch size, as kohya does, so an image of
    weight 0 still counts in it."""
    per_pixel = F.mse_loss(prediction.float(), target.float(), reduction="none")
    if batch.mask is None:
        per_sample = per_pixel.mean(dim=(1, 2, 3))
    else:
        mask = batch.mask.float().expand_as(per_pixel)
        per_sample = (per_pixel * mask).sum(dim=(1, 2, 3)) / mask.sum(dim=(1, 2, 3)).clamp(min=1e-8)
    if snr_gamma:
        per_sample = per_sample * min_snr_weights(noise_scheduler, timesteps, snr_gamma)
    if batch.loss_weights is not None:
        per_sample = per_sample * batch.loss_weights.float()
    return per_sample.mean()


# ----------------------------------------------------------------------------- a pack of runs (utils/training/pack.py)


def pack_losses(unet, noise_scheduler, batch: Batch, noise: torch.Tensor, timesteps: torch.Tensor,
                copies: int, snr_gamma: float | None = None) -> torch.Tensor:
    """Each run's loss on its own copy of the batch, shape (copies,), in one forward of the UNet; with one copy,
    ``denoising_loss``. With several, call it (and the backward) inside the pack's route (pack.Routing)."""
    size = batch.latents.shape[0]
    packed = repeat_batch(batch, copies)
    packed_noise, packed_timesteps = torch.cat([noise] * copies), torch.cat([timesteps] * copies)
    prediction, target = predict(unet, noise_scheduler, packed, packed_noise, packed_timesteps)
    losses = []
    for i in range(copies):
        own = slice(i * size, (i + 1) * size)
        losses.append(batch_loss(prediction[own], target[own], _rows(packed, own), noise_scheduler,
                                 packed_timesteps[own], snr_gamma))
    return torch.stack(losses)


def _rows(batch: Batch, rows: slice) -> Batch:
    return replace(batch, **{name: value[rows] for name, value in vars(batch).items()
                             if isinstance(value, torch.Tensor)})


def repeat_batch(batch: Batch, copies: int) -> Batch:
    """The batch ``copies`` times over along the batch dimension (run i's copy is the i-th block)."""
    if copies == 1:
        return batch
    fields = {name: (torch.cat([value] * copies) if isinstance(value, torch.Tensor) else value)
              for name, value in vars(batch).items()}
    return replace(batch, **fields)


# ----------------------------------------------------------------------------- noise


def sample_noise(latents: torch.Tensor, noise_offset: float) -> torch.Tensor:
    # randn with an explicit shape: randn_like's draws depend on the tensor's memory layout,
    # which differs between cached and freshly encoded latents.
    noise = torch.randn(latents.shape, device=latents.device, dtype=latents.dtype)
    if noise_offset:
        noise = noise + noise_offset * torch.randn(latents.shape[0], latents.shape[1], 1, 1,
                                                   device=latents.device, dtype=latents.dtype)
    return noise


# ----------------------------------------------------------------------------- timesteps


def timestep_weights(strategy: str, multiplier: float, begin: int, end: int, portion: float,
                     num_timesteps: int) -> torch.Tensor:
    """Probability of each timestep 0..num_timesteps-1: equal, except that the favoured ones (the first
    ``portion`` for 'earlier', the last ``portion`` for 'later', [begin, end) for 'range') weigh
    ``multiplier`` times as much."""
    weights = torch.ones(num_timesteps, dtype=torch.float64)
    count = int(portion * num_timesteps)
    favoured = {"earlier": slice(0, count), "later": slice(num_timesteps - count, None),
                "range": slice(begin, end)}.get(strategy)
    if favoured is not None:
        weights[favoured] *= multiplier
    return weights / weights.sum()


def sample_timesteps(args, num_timesteps: int, count: int, device: torch.device) -> torch.Tensor:
    """``count`` timesteps (long) on ``device``, drawn from torch's global generator. Uniform draws are
    exactly the ones the trainer always made. Reads --timestep_bias_* and --timestep_sampling (with
    --logit_mean, --logit_std)."""
    if args.timestep_bias_strategy != "none":
        weights = timestep_weights(args.timestep_bias_strategy, args.timestep_bias_multiplier,
                                   args.timestep_bias_begin, args.timestep_bias_end,
                                   args.timestep_bias_portion, num_timesteps)
        return torch.multinomial(weights.float(), count, replacement=True).to(device)
    if args.timestep_sampling == "logit_normal":
        normal = torch.randn(count) * args.logit_std + args.logit_mean
        fraction = torch.sigmoid(normal)
        return (fraction * num_timesteps).long().clamp(max=num_timesteps - 1).to(device)
    return torch.randint(0, num_timesteps, (count,), device=device).long()
