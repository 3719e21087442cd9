"""The training objective: model inputs from a batch, the denoising loss with its options (min-SNR,
noise offset), and the fixed-noise loss measured on the same triples every time."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from utils.core.sdxl import encode_prompts, scale_latents, vae_latent_distribution
from utils.training.batches import Item, latent_mask, orientation_time_ids, prepare_item
from utils.training.captions import caption_text
from utils.training.speed import EvalPlan, eval_timesteps

logger = logging.getLogger(__name__)


@dataclass
class Batch:
    latents: torch.Tensor
    prompt_embeds: torch.Tensor
    pooled: torch.Tensor
    time_ids: torch.Tensor
    mask: torch.Tensor | None = None  # --masked_loss: (B, 1, h, w) in [0, 1] at latent size
    loss_weights: torch.Tensor | None = None  # (B,): --prior_loss_weight for regularisation images, else 1


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


@dataclass
class BatchMaker:
    """Turns a batch of dataset indices into model inputs, from the cache or by encoding on the fly."""

    components: object
    items: list[Item]
    settings: object  # the run's RunSettings (or the parsed flags)
    weight_dtype: torch.dtype
    device: torch.device
    latent_cache: object = None
    text_cache: dict | None = None

    def __post_init__(self) -> None:
        self.has_reg = any(item.example.is_reg for item in self.items)

    def __call__(self, loader_batch: dict) -> Batch:
        indices = loader_batch["index"].tolist()
        count = len(indices)
        flips = (torch.rand(count) < 0.5) if self.settings.random_flip else torch.zeros(count, dtype=torch.bool)
        vae = self.components.vae
        if self.latent_cache is not None:
            from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
            params = torch.stack([self.latent_cache.parameters[i][int(f)] for i, f in zip(indices, flips)])
            latents = DiagonalGaussianDistribution(self.to_device(params)).sample()
            ids = torch.stack([self.latent_cache.time_ids[i][int(f)] for i, f in zip(indices, flips)])
        else:
            pixels = loader_batch["pixels"].clone()
            pixels[flips] = pixels[flips].flip(-1)
            latents = vae_latent_distribution(vae, pixels).sample()
            ids = loader_batch["time_ids"][torch.arange(count), flips.long()]
        latents = scale_latents(vae, latents.float()).to(self.weight_dtype).contiguous()
        captions = [caption_text(self.items[i].example.caption, self.settings) for i in indices]
        embeds, pooled = self.encode(captions)
        if self.settings.caption_dropout > 0:
            # Dropped captions get zero embeddings: SDXL's unconditional input at inference
            # (force_zeros_for_empty_prompt), which classifier-free guidance contrasts with.
            keep = (torch.rand(count) >= self.settings.caption_dropout).to(self.device)
            embeds = embeds * keep[:, None, None].to(embeds.dtype)
            pooled = pooled * keep[:, None].to(pooled.dtype)
        return Batch(latents, embeds.to(self.weight_dtype), pooled.to(self.weight_dtype),
                     ids.to(self.device, self.weight_dtype), self.masks(indices, flips, loader_batch, latents),
                     self.loss_weights(indices))

    def masks(self, indices: list[int], flips: torch.Tensor, loader_batch: dict,
              latents: torch.Tensor) -> torch.Tensor | None:
        """--masked_loss: the batch's masks (B, 1, h, w) at latent size, mirrored where the image is."""
        if not getattr(self.settings, "masked_loss", False):
            return None
        if self.latent_cache is not None:
            masks = torch.stack([self.latent_cache.masks[i][int(f)] for i, f in zip(indices, flips)])
        else:
            pixels = loader_batch["mask"].clone()
            pixels[flips] = pixels[flips].flip(-1)
            masks = latent_mask(pixels, tuple(latents.shape[-2:]))
        return self.to_device(masks[:, None].contiguous())

    def loss_weights(self, indices: list[int]) -> torch.Tensor | None:
        """(B,): --prior_loss_weight for regularisation images, 1 for the others; None without them."""
        if not self.has_reg:
            return None
        weight = float(getattr(self.settings, "prior_loss_weight", 1.0))
        return self.to_device(torch.tensor([weight if self.items[i].example.is_reg else 1.0 for i in indices]))

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.text_cache is not None:
            embeds = self.to_device(torch.stack([self.text_cache[c][0] for c in captions]))
            pooled = self.to_device(torch.stack([self.text_cache[c][1] for c in captions]))
            return embeds, pooled
        return encode_prompts(self.components.tokenizers, self.components.text_encoders, captions)

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """Host-to-GPU copies from pinned memory, asynchronous: a pageable copy would wait for the GPU."""
        if self.device.type != "cuda":
            return tensor.to(self.device)
        return tensor.pin_memory().to(self.device, non_blocking=True)


def sample_noise(latents: torch.Tensor, noise_offset: float) -> torch.Tensor:
    # randn with an explicit shape: randn_like's draws depend on the tensor's memory layout,
    # which differs between cached and freshly encoded latents.
    noise = torch.randn(latents.shape, device=latents.device, dtype=latents.dtype)
    if noise_offset:
        noise = noise + noise_offset * torch.randn(latents.shape[0], latents.shape[1], 1, 1,
                                                   device=latents.device, dtype=latents.dtype)
    return noise


@dataclass
class EvalSet:
    """Fixed (latent, noise, timestep, conditioning) triples, in batches: the same every time it is measured."""

    batches: list[tuple[Batch, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    plan: EvalPlan = field(default_factory=lambda: EvalPlan(0, 0, 0, 0.0))


@torch.no_grad()
def build_eval_set(components, items: list[Item], plan: EvalPlan, settings, weight_dtype: torch.dtype,
                   device: torch.device) -> EvalSet:
    """``plan.samples`` triples: images in turn, one timestep each spread over the schedule, seeded noise."""
    eval_set = EvalSet(plan=plan)
    if not plan.every_epochs or not items:
        return eval_set
    generator = torch.Generator().manual_seed(settings.seed + 1)
    timesteps = eval_timesteps(plan.samples, components.noise_scheduler.config.num_train_timesteps)
    encoded = {}
    for index in sorted({k % len(items) for k in range(plan.samples)}):
        item = items[index]
        prepared = prepare_item(item, center_crop=True)
        distribution = vae_latent_distribution(components.vae, prepared.pixels[None])
        embeds, pooled = encode_prompts(components.tokenizers, components.text_encoders, [caption_text(item.example.caption, settings, shuffle=False)])
        encoded[index] = (scale_latents(components.vae, distribution.mean.float())[0], embeds[0], pooled[0],
                          orientation_time_ids(prepared)[0])
    triples = [encoded[k % len(items)] for k in range(plan.samples)]
    chunk = max(1, 4 * settings.train_batch_size)
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
    unet = run.accelerator.unwrap_model(run.unet)
    unet.disable_adapters()
    try:
        return evaluate(run.unet, run.components.noise_scheduler, run.eval_set)
    finally:
        unet.enable_adapters()
