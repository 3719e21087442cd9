"""The committed demo models: the base pipeline draws prompt-dependent pictures, the CLIP tells the two looks apart."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from utils.tiny.demo_model import DEMO_CLIP_DIR, DEMO_SDXL_DIR, RESOLUTION
from utils.tiny.scenes import caption, render, scene_set


@pytest.fixture(scope="module")
def demo_pipeline():
    from diffusers import StableDiffusionXLPipeline
    return StableDiffusionXLPipeline.from_pretrained(DEMO_SDXL_DIR, torch_dtype=torch.float32, use_safetensors=True)


def generate(pipe, prompt: str, seed: int = 0) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed)
    image = pipe(prompt, height=RESOLUTION, width=RESOLUTION, num_inference_steps=10, guidance_scale=5.0,
                 generator=generator).images[0]
    return np.asarray(image, dtype=np.float32) / 255.0


def test_committed_base_model_draws_prompt_dependent_pictures(demo_pipeline):
    lake = generate(demo_pipeline, "a small house by a lake under the sun")
    village = generate(demo_pipeline, "a village on green hills at sunset")
    assert lake.shape == (RESOLUTION, RESOLUTION, 3)
    # A picture, not a flat field or noise: a sky above and ground below give a large spread of pixel
    # values, and neighbouring pixels are alike.
    for image in (lake, village):
        assert np.isfinite(image).all() and image.std() > 0.1
        assert np.abs(np.diff(image, axis=0)).mean() < 0.5 * image.std()
    # The prompt decides the picture: the same seed gives a clearly different image.
    assert np.abs(lake - village).mean() > 0.05


def test_committed_clip_separates_the_photo_and_ghibli_looks():
    from utils.sweep.clip_metrics import ClipEmbedder, centroid

    embedder = ClipEmbedder(str(DEMO_CLIP_DIR), device="cpu")
    scenes = scene_set(8, seed=99)  # scenes the CLIP never saw
    photo = embedder.images([render(scene, "photo") for scene in scenes])
    ghibli = embedder.images([render(scene, "ghibli") for scene in scenes])
    ghibli_centre = centroid(ghibli[:4])
    # Held-out Ghibli-like scenes are closer to the Ghibli-like centroid than photos of the same scenes are.
    assert float((ghibli[4:] @ ghibli_centre).mean()) > float((photo[4:] @ ghibli_centre).mean()) + 0.1
    # And each image is closest to its own caption among the captions of both looks.
    texts = embedder.texts([caption(scene, style) for style in ("ghibli", "photo") for scene in scenes])
    ghibli_matches = (ghibli @ texts.T).argmax(dim=1)
    assert (ghibli_matches < len(scenes)).float().mean() >= 0.75


def test_committed_vae_reconstructs_both_looks(demo_pipeline):
    """The VAE draws the look the LoRA learns, as SDXL's VAE draws any look: a decoder that knows only
    photos blurs the Ghibli-like outlines and palette away (mean error 0.24 before it learned both)."""
    from utils.tiny.pretrain import to_tensor

    vae = demo_pipeline.vae
    scenes = [scene for scene in scene_set(16, seed=99) if scene.time == "day"][:6]
    for style, limit in (("photo", 0.06), ("ghibli", 0.15)):
        pixels = to_tensor([render(scene, style) for scene in scenes])
        with torch.no_grad():
            rebuilt = vae.decode(vae.encode(pixels).latent_dist.mean).sample.clamp(-1, 1)
        assert float((rebuilt - pixels).abs().mean()) < limit, style


def test_demo_seed_spread_without_base_images_names_the_folder(tmp_path):
    from utils.core.errors import UserError
    from utils.demo import base_seed_spread
    from utils.tiny.scenes import write_style_dataset

    data = write_style_dataset(tmp_path / "data", num_images=2)
    (tmp_path / "inference" / "base_model_results").mkdir(parents=True)
    with pytest.raises(UserError, match="base_model_results: no prompt with two or more base images"):
        base_seed_spread(tmp_path / "inference", data, DEMO_CLIP_DIR)
