"""Training examples as tensors: bucket assignment, batching by bucket, pixels and SDXL time ids.
(The per-image latent and text caches are in caching.py.)"""

from __future__ import annotations

import argparse
import logging
import random
from dataclasses import dataclass

import torch

from utils.core.sdxl import time_ids
from utils.data.images import open_rgb, upright_size
from utils.data.masks import open_mask
from utils.data.records import Example
from utils.training.buckets import Prepared, make_buckets, nearest_bucket, prepare_image

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Item:
    example: Example
    bucket: tuple[int, int]  # (width, height)
    crop_seed: int  # fixes the random crop of this image, so a cache stays valid


def assign_buckets(examples: list[Example], resolution: int, use_buckets: bool, seed: int) -> list[Item]:
    buckets = make_buckets(resolution) if use_buckets else [(resolution, resolution)]
    items = []
    for index, example in enumerate(examples):
        bucket = nearest_bucket(*upright_size(example.image_path), buckets)
        items.append(Item(example, bucket, seed * 100_003 + index))
    return items


def prepare_item(item: Item, center_crop: bool) -> Prepared:
    rng = random.Random(item.crop_seed)
    return prepare_image(open_rgb(item.example.image_path), item.bucket, center_crop, rng)


def prepare_mask(item: Item, center_crop: bool) -> torch.Tensor:
    """(H, W) in [0, 1]: the item's loss mask resized and cropped exactly as its image (the same function
    and the same crop seed, at the image's size); all ones for an item without a mask (regularisation)."""
    if item.example.mask_path is None:
        width, height = item.bucket
        return torch.ones(height, width)
    mask = open_mask(item.example.mask_path, item.example.image_path).convert("RGB")
    prepared = prepare_image(mask, item.bucket, center_crop, random.Random(item.crop_seed))
    return (prepared.pixels[0] + 1.0) / 2.0


def latent_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Masks (..., H, W) averaged down to the latents' (h, w): each latent pixel gets its area's share."""
    flat = mask.reshape(-1, 1, *mask.shape[-2:]).float()
    return torch.nn.functional.interpolate(flat, size=size, mode="area").reshape(*mask.shape[:-2], *size)


class BucketBatchSampler(torch.utils.data.Sampler):
    """Batches whose images all share one bucket; order reshuffled each epoch from ``seed + epoch``.

    ``repeats[i]``: how many times image ``i`` appears per epoch (kohya's N_name/ folders; default
    once). Each copy is a separate draw into its bucket's batches, as in kohya, so the epoch, the
    step count and the LR schedule all count the repeats, while the image is cached only once.

    There is deliberately no ``batch_size`` attribute: accelerate then shards the batches across
    processes whole, round robin, whatever their length. Given a ``batch_size`` it assumes fixed-size
    batches and mishandles the shorter last batch of each bucket (images dropped, buckets mixed in one
    batch, unequal step counts per process, which hangs DDP).
    """

    def __init__(self, buckets: list[tuple[int, int]], batch_size: int, seed: int, drop_last: bool = False,
                 repeats: list[int] | None = None):
        self.buckets, self.images_per_batch, self.seed, self.drop_last = buckets, batch_size, seed, drop_last
        self.repeats = repeats if repeats is not None else [1] * len(buckets)
        self.epoch = 0

    def use_epoch(self, epoch: int) -> None:
        # Deliberately not named set_epoch: accelerate calls set_epoch with its own loader's counter,
        # which restarts at 0 for the loaders of a resumed run.
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        rng = random.Random(self.seed + self.epoch)
        groups: dict[tuple[int, int], list[int]] = {}
        for index, bucket in enumerate(self.buckets):
            groups.setdefault(bucket, []).extend([index] * self.repeats[index])
        batches = []
        for bucket in sorted(groups):
            indices = groups[bucket]
            rng.shuffle(indices)
            for start in range(0, len(indices), self.images_per_batch):
                batch = indices[start:start + self.images_per_batch]
                if len(batch) == self.images_per_batch or not self.drop_last:
                    batches.append(batch)
        rng.shuffle(batches)
        return batches

    def __iter__(self):
        return iter(self._batches())

    def __len__(self) -> int:
        # Counted per bucket, without building and shuffling an epoch: the batch count does not depend on
        # the order, and accelerate and the schedule ask for it often.
        sizes: dict[tuple[int, int], int] = {}
        for bucket, repeat in zip(self.buckets, self.repeats):
            sizes[bucket] = sizes.get(bucket, 0) + repeat
        if self.drop_last:
            return sum(size // self.images_per_batch for size in sizes.values())
        return sum(-(-size // self.images_per_batch) for size in sizes.values())


class PixelDataset(torch.utils.data.Dataset):
    """Index -> pixels, the time ids of both orientations and, with ``masks``, the loss mask at pixel size
    (used when caching is off)."""

    def __init__(self, items: list[Item], center_crop: bool, masks: bool = False):
        self.items, self.center_crop, self.masks = items, center_crop, masks

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        prepared = prepare_item(self.items[index], self.center_crop)
        item = {"index": index, "pixels": prepared.pixels, "time_ids": orientation_time_ids(prepared)}
        if self.masks:
            item["mask"] = prepare_mask(self.items[index], self.center_crop)
        return item


def orientation_time_ids(prepared: Prepared) -> torch.Tensor:
    """(2, 6): the SDXL time ids of the image as is (row 0) and mirrored (row 1)."""
    flipped = prepared.flipped()
    return torch.stack([
        time_ids(prepared.original_size, prepared.crop_top_left, prepared.target_size),
        time_ids(flipped.original_size, flipped.crop_top_left, flipped.target_size),
    ])


def make_loader(args: argparse.Namespace, items: list) -> tuple[BucketBatchSampler, torch.utils.data.DataLoader]:
    """Batches of one bucket each, in a seeded order (kohya's repeats counted); dataset indices when
    cached (everything else is in memory then), else pixels."""
    sampler = BucketBatchSampler([item.bucket for item in items], args.train_batch_size, args.seed,
                                 repeats=[item.example.repeats for item in items])
    dataset = ([{"index": index} for index in range(len(items))] if args.cache
               else PixelDataset(items, args.center_crop, args.masked_loss))
    dataloader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=args.dataloader_num_workers,
        generator=torch.Generator().manual_seed(args.seed),  # keeps the global RNG untouched for resume
    )
    return sampler, dataloader
