"""Regularisation images (--reg_data_dir): a second dataset, in any layout the project reads, checked like
the training set and mixed into the same batches; kohya sd-scripts' rule sets how often each is seen."""

from __future__ import annotations

import argparse
import os
from dataclasses import replace

from utils.data.listing import checked_examples, list_dataset
from utils.data.records import Example

REPORT_TITLE = "Regularisation images check"


def balanced_reg_repeats(num_train_images: int, reg_repeats: list[int]) -> list[int]:
    """How often each regularisation image is seen per epoch (0: not used), by kohya sd-scripts' rule
    (DreamBoothDataset in library/train_util.py).

    ``num_train_images`` counts the training images with their repeats. The regularisation images are
    taken in order, each with its own repeat count, until their count reaches it; the ones after that are
    not used. If all of them are not enough, rounds follow that add one repeat to each in turn, again
    stopping as soon as the count is reached."""
    counts = [0] * len(reg_repeats)
    seen, first_round = 0, True
    while reg_repeats and seen < num_train_images:
        for index, repeats in enumerate(reg_repeats):
            added = repeats if first_round else 1
            counts[index] += added
            seen += added
            if seen >= num_train_images:
                break
        first_round = False
    return counts


def balance(train_examples: list[Example], reg_examples: list[Example]) -> list[Example]:
    """The regularisation examples that are used, with their per-epoch repeats set by kohya's rule."""
    counts = balanced_reg_repeats(sum(e.repeats for e in train_examples), [e.repeats for e in reg_examples])
    return [replace(example, repeats=count) for example, count in zip(reg_examples, counts) if count > 0]


def load_reg_examples(args: argparse.Namespace, report_here: bool = True,
                      cache_dir: str | os.PathLike | None = None) -> list[Example]:
    """The checked regularisation examples of --reg_data_dir (its layout told from its files; the dataset
    flags' columns and caption extension; images of a `datasets` source written to ``cache_dir``); their
    report is logged apart from the training set's. Training on the whole image: no loss masks."""
    listing = list_dataset("auto", args.reg_data_dir, image_column=args.image_column,
                           caption_column=args.caption_column, cache_dir=cache_dir,
                           caption_extension=args.caption_extension)
    examples = checked_examples(listing, args, report_here, title=REPORT_TITLE)
    return [replace(example, is_reg=True) for example in examples]
