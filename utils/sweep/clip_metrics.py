"""CLIP measurements of generated images: prompt alignment, style similarity, diversity across seeds.

- prompt alignment: CLIP score, 100 * max(cos(text, image), 0), averaged over images
  (the definition of Hessel et al., 2021, with w = 100 as in common implementations);
- style similarity: mean cosine between each image's CLIP embedding and the centroid
  (normalised mean) of the training images' embeddings;
- diversity: mean pairwise cosine distance (1 - cos) between the images of one prompt
  (its seeds), averaged over prompts.

Any CLIP checkpoint that ``CLIPModel``/``CLIPProcessor`` can load works: a Hub id such as
``openai/clip-vit-large-patch14`` or a local folder (the tests use utils/make_tiny_clip.py).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

logger = logging.getLogger(__name__)

DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"


def _features(output) -> torch.Tensor:
    """transformers 5 returns a model output whose pooler_output is the projected embedding; 4.x a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipEmbedder:
    """Normalised CLIP embeddings of images and texts, computed in batches without gradients."""

    def __init__(self, model_name_or_path: str = DEFAULT_CLIP_MODEL, device: str | None = None,
                 batch_size: int = 16):
        from utils.core.model_source import hub_reachable, in_hub_cache, is_hub_id

        # Offline, transformers retries the Hub for about a minute before it gives up: say so at once,
        # before transformers is even imported.
        if not Path(model_name_or_path).exists() and is_hub_id(model_name_or_path) \
                and not in_hub_cache(model_name_or_path) and not hub_reachable():
            raise OSError("not in the Hub cache, and the Hub cannot be reached from here (offline)")
        from transformers import CLIPModel, CLIPProcessor

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.batch_size = batch_size
        self.name = model_name_or_path
        self.model = CLIPModel.from_pretrained(model_name_or_path).to(self.device).eval()
        self.processor = CLIPProcessor.from_pretrained(model_name_or_path)

    @torch.no_grad()
    def images(self, images: list[Image.Image]) -> torch.Tensor:
        chunks = []
        for start in range(0, len(images), self.batch_size):
            batch = [image.convert("RGB") for image in images[start:start + self.batch_size]]
            pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"].to(self.device)
            chunks.append(_features(self.model.get_image_features(pixel_values=pixels)).float())
        return torch.nn.functional.normalize(torch.cat(chunks), dim=-1).cpu()

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        tokens = self.processor(text=texts, return_tensors="pt", padding=True, truncation=True,
                                max_length=self.processor.tokenizer.model_max_length)
        tokens = {k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        return torch.nn.functional.normalize(_features(self.model.get_text_features(**tokens)).float(), dim=-1).cpu()


def clip_scores(text_embedding: torch.Tensor, image_embeddings: torch.Tensor) -> torch.Tensor:
    """CLIP score of each image against one text (both normalised)."""
    return 100.0 * (image_embeddings @ text_embedding).clamp(min=0)


def paired_standard_error(values: list[float], reference: list[float]) -> float:
    """Standard error of the mean of ``values[i] - reference[i]`` (same prompt and seed); NaN below two pairs."""
    if len(values) != len(reference):
        raise ValueError("paired_standard_error: both lists need one value per image")
    differences = torch.tensor(values, dtype=torch.float64) - torch.tensor(reference, dtype=torch.float64)
    if differences.numel() < 2:
        return math.nan
    return float(differences.std() / math.sqrt(differences.numel()))


def centroid(embeddings: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(embeddings.mean(dim=0), dim=-1)


def style_similarity(image_embeddings: torch.Tensor, style_centroid: torch.Tensor) -> float:
    return float((image_embeddings @ style_centroid).mean())


def diversity(image_embeddings: torch.Tensor) -> float:
    """Mean pairwise cosine distance; NaN for fewer than two images."""
    count = image_embeddings.shape[0]
    if count < 2:
        return math.nan
    similarity = image_embeddings @ image_embeddings.T
    off_diagonal = similarity[~torch.eye(count, dtype=torch.bool)]
    return float((1.0 - off_diagonal).mean())


@dataclass(frozen=True)
class ImageSetScores:
    alignment: float  # mean CLIP score against each image's prompt
    per_image_alignment: list[float]  # in prompt order, then seed order, for paired comparisons
    style: float  # mean cosine to the training-set centroid
    diversity: float  # mean over prompts of the pairwise cosine distance between seeds
    num_images: int


def score_image_set(embedder: ClipEmbedder, prompts: list[str], images_per_prompt: list[list[Image.Image]],
                    style_centroid: torch.Tensor) -> ImageSetScores:
    """Scores of one run's images: ``images_per_prompt[k]`` are the seeds of ``prompts[k]``."""
    if not prompts or len(prompts) != len(images_per_prompt) or not all(images_per_prompt):
        raise ValueError("score_image_set: need at least one image for every prompt")
    text_embeddings = embedder.texts(prompts)
    alignments, similarities, diversities = [], [], []
    for text_embedding, images in zip(text_embeddings, images_per_prompt):
        embeddings = embedder.images(images)
        alignments.append(clip_scores(text_embedding, embeddings))
        similarities.append(embeddings @ style_centroid)
        diversities.append(diversity(embeddings))
    finite = [d for d in diversities if not math.isnan(d)]
    scores = torch.cat(alignments)
    return ImageSetScores(
        alignment=float(scores.mean()),
        per_image_alignment=scores.tolist(),
        style=float(torch.cat(similarities).mean()),
        diversity=sum(finite) / len(finite) if finite else math.nan,
        num_images=sum(len(images) for images in images_per_prompt),
    )


def style_centroid_of(embedder: ClipEmbedder, image_paths: list[Path]) -> torch.Tensor:
    """Centroid of the CLIP embeddings of the training images (read a batch at a time)."""
    if not image_paths:
        raise ValueError("style centroid: no training images")
    chunks = []
    for start in range(0, len(image_paths), embedder.batch_size):
        images = []
        for path in image_paths[start:start + embedder.batch_size]:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        chunks.append(embedder.images(images))
    logger.info("Style reference: %d training images", len(image_paths))
    return centroid(torch.cat(chunks))
