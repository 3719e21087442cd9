"""Which timesteps a step trains on: uniform (the default), biased as in the diffusers SDXL example
(``--timestep_bias_*``), or logit-normal (``--timestep_sampling logit_normal``)."""

from __future__ import annotations

import torch


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


def biased(args) -> bool:
    return getattr(args, "timestep_bias_strategy", "none") != "none"


def sample_timesteps(args, num_timesteps: int, count: int, device: torch.device) -> torch.Tensor:
    """``count`` timesteps (long) on ``device``, drawn from torch's global generator. Uniform draws are
    exactly the ones the trainer always made."""
    if biased(args):
        weights = timestep_weights(args.timestep_bias_strategy, args.timestep_bias_multiplier,
                                   args.timestep_bias_begin, args.timestep_bias_end,
                                   args.timestep_bias_portion, num_timesteps)
        return torch.multinomial(weights.float(), count, replacement=True).to(device)
    if getattr(args, "timestep_sampling", "uniform") == "logit_normal":
        normal = torch.randn(count) * args.logit_std + args.logit_mean
        fraction = torch.sigmoid(normal)
        return (fraction * num_timesteps).long().clamp(max=num_timesteps - 1).to(device)
    return torch.randint(0, num_timesteps, (count,), device=device).long()
