"""Caption augmentation as kohya sd-scripts does it: the caption is split at ``--caption_separator``,
the first ``--keep_tokens`` pieces stay in front, the rest are shuffled (``--shuffle_caption``), the
pieces are joined again with ", ", and ``--caption_prefix`` (e.g. a trigger word) goes in front of it all."""

from __future__ import annotations

import torch


def shuffles(args) -> bool:
    """Whether captions change from step to step (then their text embeddings cannot be cached)."""
    return bool(getattr(args, "shuffle_caption", False))


def caption_text(caption: str, args, generator: torch.Generator | None = None, shuffle: bool = True) -> str:
    """The caption a step trains on. Without shuffling it is fixed (the prefix, if any, added); with it,
    the order of the tokens after the kept ones is drawn from ``generator`` (default: torch's global one,
    which a resumed run restores). ``shuffle=False``: the fixed form (the fixed-noise loss uses it)."""
    separator = getattr(args, "caption_separator", ",")
    prefix = getattr(args, "caption_prefix", None)
    if shuffle and shuffles(args):
        tokens = [token.strip() for token in caption.strip().split(separator)]
        keep = max(0, getattr(args, "keep_tokens", 0))
        fixed, free = tokens[:keep], tokens[keep:]
        order = torch.randperm(len(free), generator=generator).tolist()
        caption = ", ".join(fixed + [free[i] for i in order])
    if prefix:
        caption = f"{prefix} {caption}"
    return caption
