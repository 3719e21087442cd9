"""Procedural landscape scenes in two looks, with captions: the demo model's data (the command: utils/scenes.py).

A scene is a small random description (time of day, ground, lake, houses, trees, clouds). The same
description is drawn either in a plain **photo** look (natural colours, shaded gradients, film grain,
no outlines) or in a **Ghibli-like** look (a warm pastel palette, flat cel shading, dark outlines, big
soft clouds). Its caption names what is in the picture, in the words a prompt would use:

    photo:  "a photo of a small house by a lake under the sun, with trees"
    ghibli: "The image is a Ghibli-style illustration of a small house by a lake under the sun, ..."

The photo scenes pretrain the demo's base model (utils/pretrain_demo_model.py); the Ghibli-like ones
are the demo's LoRA training set, written in the ghibli layout (``images/`` + ``captions.json``);
both, with their captions, train the demo's tiny CLIP.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

logger = logging.getLogger(__name__)

STYLES = ("photo", "ghibli")
TIMES = ("day", "sunset", "night")
RENDER_SCALE = 2  # drawn at twice the size, then reduced: smooth edges

# Every word the captions and the demo's prompts use; the demo model's tokenizer has one token for each.
CAPTION_WORDS = (
    "a an the of in on at with and by under over near between from its is this image photo picture "
    "realistic style ghibli studio illustration drawn drawing painted scene landscape view "
    "small little big old quiet peaceful house houses village forest tree trees lake river water "
    "hill hills green meadow field mountain mountains sky sun moon stars night sunset day evening "
    "cloud clouds cloudy soft warm pastel colors colours dark outlines flat shading golden blue "
    "pink orange purple white red bright light calm sunny clear blurry low quality distorted "
    "deformed ugly bad anatomy"
).split()


@dataclass(frozen=True)
class Scene:
    time: str  # day, sunset, night
    ground: str  # hills, meadow, mountains
    lake: bool
    houses: int  # 0, 1 (a house) or 3 (a village)
    trees: int  # 0, 3 (trees) or 9 (a forest)
    clouds: bool  # photo look only: the Ghibli-like look always has its soft clouds
    seed: int  # positions and shapes


def random_scene(rng: np.random.Generator) -> Scene:
    houses = int(rng.choice([0, 1, 3], p=[0.3, 0.4, 0.3]))
    trees = int(rng.choice([0, 3, 9], p=[0.3, 0.4, 0.3]))
    return Scene(time=str(rng.choice(TIMES, p=[0.5, 0.25, 0.25])),
                 ground=str(rng.choice(["hills", "meadow", "mountains"])), lake=bool(rng.random() < 0.5),
                 houses=houses, trees=trees, clouds=bool(rng.random() < 0.5), seed=int(rng.integers(1 << 31)))


def describe(scene: Scene) -> str:
    """What is in the picture: 'a small house by a lake under the sun, with trees'."""
    if scene.houses == 1:
        subject = "a small house"
    elif scene.houses:
        subject = "a village"
    elif scene.trees == 9:
        subject = "a forest"
    elif scene.lake:
        subject = "a calm lake"
    else:
        subject = {"hills": "green hills", "meadow": "a green meadow", "mountains": "mountains"}[scene.ground]
    place = []
    if scene.lake and subject != "a calm lake":
        place.append("by a lake")
    if scene.ground == "mountains" and subject != "mountains":
        place.append("near the mountains")
    elif scene.ground == "hills" and subject != "green hills":
        place.append("on green hills")
    sky = {"day": "under the sun", "sunset": "at sunset", "night": "at night under the moon"}[scene.time]
    extras = []
    if scene.trees == 3 or (scene.trees == 9 and subject != "a forest"):
        extras.append("trees" if scene.trees == 3 else "a forest")
    text = " ".join([subject, *place[:1], sky])
    return text + (f", with {extras[0]}" if extras else "")


PHOTO_TEMPLATES = ("a photo of {c}", "{c}, a photo", "a picture of {c} in a realistic style", "{c}")
GHIBLI_TEMPLATES = (
    "The image is a Ghibli-style illustration of {c}, with soft clouds and warm pastel colors.",
    "{C}, drawn in Ghibli style with dark outlines and flat pastel colors.",
    "The image is in the style of Studio Ghibli, showing {c}. Soft clouds float in the sky.",
    "A peaceful scene of {c}, in Ghibli style.",
)


def caption(scene: Scene, style: str, variant: int = 0) -> str:
    content = describe(scene)
    templates = PHOTO_TEMPLATES if style == "photo" else GHIBLI_TEMPLATES
    return templates[variant % len(templates)].format(c=content, C=content[0].upper() + content[1:])


# ----------------------------------------------------------------------------- drawing

PALETTES = {
    "photo": {
        "sky": {"day": ((62, 118, 196), (170, 200, 228)), "sunset": ((58, 62, 120), (236, 140, 72)),
                "night": ((6, 10, 30), (28, 40, 76))},
        "sun": (255, 248, 214), "sunset_sun": (255, 190, 90), "moon": (222, 222, 205),
        "cloud": (215, 218, 222), "mountain": (96, 106, 124), "snow": (225, 230, 235),
        "hills": ((74, 112, 48), (52, 88, 36)), "meadow": (96, 128, 52), "lake": ((50, 82, 120), (92, 126, 160)),
        "wall": (176, 164, 146), "roof": (118, 58, 48), "window": (40, 36, 34), "trunk": (72, 52, 36),
        "leaves": ((36, 72, 34), (52, 90, 42)),
    },
    "ghibli": {
        "sky": {"day": ((140, 200, 238), (252, 236, 204)), "sunset": ((246, 168, 160), (255, 218, 150)),
                "night": ((78, 84, 156), (150, 126, 176))},
        "sun": (255, 236, 150), "sunset_sun": (255, 200, 120), "moon": (255, 242, 170),
        "cloud": (255, 251, 242), "mountain": (150, 160, 205), "snow": (250, 250, 255),
        "hills": ((156, 210, 116), (124, 188, 104)), "meadow": (176, 218, 120),
        "lake": ((124, 196, 214), (176, 226, 232)), "wall": (255, 240, 212), "roof": (232, 110, 84),
        "window": (96, 120, 170), "trunk": (150, 100, 70), "leaves": ((96, 170, 100), (130, 196, 110)),
    },
}
OUTLINE = (48, 38, 40)
NIGHT = {"photo": (0.45, 0.5, 0.7), "ghibli": (0.72, 0.72, 0.92)}  # per-channel dimming of the ground at night


class Painter:
    """Draws shapes in one look: filled, and for the Ghibli-like look outlined in dark ink."""

    def __init__(self, image: Image.Image, style: str, time: str, scale: float):
        self.draw = ImageDraw.Draw(image)
        self.style, self.time, self.scale = style, time, scale
        self.palette = PALETTES[style]

    def color(self, rgb: tuple[int, int, int], ground: bool = True) -> tuple[int, int, int]:
        if ground and self.time == "night":
            return tuple(int(c * f) for c, f in zip(rgb, NIGHT[self.style]))
        if ground and self.time == "sunset":
            return tuple(int(min(255, c * f)) for c, f in zip(rgb, (1.08, 0.9, 0.8)))
        return rgb

    def width(self) -> int:
        return max(1, round(1.6 * self.scale)) if self.style == "ghibli" else 0

    def polygon(self, points: list[tuple[float, float]], fill, ground: bool = True) -> None:
        outline = OUTLINE if self.style == "ghibli" else None
        self.draw.polygon(points, fill=self.color(fill, ground), outline=outline, width=self.width())

    def ellipse(self, box: tuple[float, float, float, float], fill, ground: bool = True) -> None:
        outline = OUTLINE if self.style == "ghibli" else None
        self.draw.ellipse(box, fill=self.color(fill, ground), outline=outline, width=self.width())


def _sky(size: int, style: str, time: str) -> np.ndarray:
    top, bottom = (np.array(c, dtype=np.float32) for c in PALETTES[style]["sky"][time])
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    if style == "ghibli":
        ramp = np.floor(ramp * 4) / 3  # flat bands instead of a smooth gradient
    ramp = np.clip(ramp, 0, 1)[:, None, None]
    return (top * (1 - ramp) + bottom * ramp) * np.ones((1, size, 1), dtype=np.float32)


def _wave(rng: np.random.Generator, size: int, base: float, amplitude: float,
          bumps: float) -> list[tuple[float, float]]:
    xs = np.linspace(0, size, 33)
    phase = rng.uniform(0, 2 * np.pi)
    ys = base + amplitude * np.sin(xs / size * 2 * np.pi * bumps + phase)
    return [(0.0, float(size))] + list(zip(xs.tolist(), ys.tolist())) + [(float(size), float(size))]


def _clouds(paint: Painter, rng: np.random.Generator, size: int, count: int) -> None:
    palette = paint.palette
    for _ in range(count):
        cx, cy = rng.uniform(0.1, 0.9) * size, rng.uniform(0.08, 0.3) * size
        width = rng.uniform(0.18, 0.3) * size
        if paint.style == "ghibli":  # a puffy cluster: a flat base and round tops
            puffs = [(cx + dx * width, cy - dy * width, r * width) for dx, dy, r in
                     ((-0.35, 0.0, 0.28), (0.0, 0.12, 0.36), (0.35, 0.0, 0.28), (0.15, -0.05, 0.3))]
            for x, y, r in puffs:
                paint.ellipse((x - r, y - r, x + r, y + r), palette["cloud"], ground=False)
            for x, y, r in puffs:  # cover inner outlines: one soft shape with an outer outline
                inner = r - paint.width()
                paint.draw.ellipse((x - inner, y - inner, x + inner, y + inner), fill=palette["cloud"])
        else:
            paint.draw.ellipse((cx - width / 2, cy - width / 6, cx + width / 2, cy + width / 6),
                               fill=paint.color(palette["cloud"], ground=paint.time == "night"))


def _house(paint: Painter, x: float, y: float, w: float) -> None:
    palette = paint.palette
    h = 0.75 * w
    paint.polygon([(x, y - h), (x + w, y - h), (x + w, y), (x, y)], palette["wall"])
    paint.polygon([(x - 0.15 * w, y - h), (x + w / 2, y - h - 0.6 * w), (x + 1.15 * w, y - h)], palette["roof"])
    window = 0.22 * w
    wx, wy = x + 0.39 * w, y - 0.62 * h
    color = (255, 214, 120) if paint.time == "night" else palette["window"]
    paint.draw.rectangle((wx, wy, wx + window, wy + window), fill=color)


def _tree(paint: Painter, x: float, y: float, h: float, shade: int) -> None:
    palette = paint.palette
    paint.polygon([(x - 0.06 * h, y), (x - 0.06 * h, y - 0.45 * h), (x + 0.06 * h, y - 0.45 * h),
                   (x + 0.06 * h, y)], palette["trunk"])
    r = 0.3 * h
    paint.ellipse((x - r, y - h, x + r, y - h + 2.1 * r), palette["leaves"][shade])


def _paint_sky(paint: Painter, image: Image.Image, rng: np.random.Generator, scene: Scene, horizon: float) -> None:
    """Stars at night, the sun or the moon (with a glow in the photo look), and the clouds."""
    big, scale, style, palette = image.width, paint.scale, paint.style, paint.palette
    if scene.time == "night":
        for _ in range(12):
            sx, sy = rng.uniform(0, big), rng.uniform(0, horizon * 0.7)
            paint.draw.ellipse((sx, sy, sx + 1.5 * scale, sy + 1.5 * scale), fill=(255, 255, 230))
    body_x = rng.uniform(0.15, 0.85) * big
    body_y = horizon * (0.75 if scene.time == "sunset" else rng.uniform(0.2, 0.4))
    body_r = (0.09 if style == "ghibli" else 0.07) * big
    body = {"day": palette["sun"], "sunset": palette["sunset_sun"], "night": palette["moon"]}[scene.time]
    if style == "photo" and scene.time != "night":  # a glow around the sun
        glow = Image.new("L", image.size, 0)
        ImageDraw.Draw(glow).ellipse((body_x - 2.5 * body_r, body_y - 2.5 * body_r,
                                      body_x + 2.5 * body_r, body_y + 2.5 * body_r), fill=110)
        glow = glow.filter(ImageFilter.GaussianBlur(body_r))
        image.paste(Image.new("RGB", image.size, body), mask=glow)
    paint.ellipse((body_x - body_r, body_y - body_r, body_x + body_r, body_y + body_r), body, ground=False)
    if style == "ghibli":
        _clouds(paint, rng, big, int(rng.integers(2, 4)))
    elif scene.clouds:
        _clouds(paint, rng, big, int(rng.integers(2, 5)))


def _paint_ground(paint: Painter, rng: np.random.Generator, scene: Scene, horizon: float, big: int) -> None:
    """Snow-capped mountains behind, then a flat meadow or two rows of rolling hills."""
    palette = paint.palette
    if scene.ground == "mountains":
        peaks = sorted(rng.uniform(0.05, 0.95, size=3) * big)
        for peak in peaks:
            top = horizon - rng.uniform(0.22, 0.34) * big
            half = rng.uniform(0.22, 0.32) * big
            paint.polygon([(peak - half, horizon + 2), (peak, top), (peak + half, horizon + 2)], palette["mountain"])
            cap = 0.3
            paint.polygon([(peak - half * cap, top + (horizon - top) * cap), (peak, top),
                           (peak + half * cap, top + (horizon - top) * cap)], palette["snow"])
    if scene.ground == "meadow":
        paint.polygon([(0, horizon), (big, horizon), (big, big), (0, big)], palette["meadow"])
    else:
        far, near = palette["hills"]
        paint.polygon(_wave(rng, big, horizon, 0.05 * big, rng.uniform(0.8, 1.6)), far)
        paint.polygon(_wave(rng, big, horizon + 0.12 * big, 0.04 * big, rng.uniform(1.0, 2.0)), near)


def _paint_water(paint: Painter, rng: np.random.Generator, horizon: float, big: int) -> None:
    """A lake: flat highlight strokes in the Ghibli-like look, a lighter reflection in the photo look."""
    palette = paint.palette
    cx, cy = rng.uniform(0.3, 0.7) * big, horizon + 0.22 * big
    rx, ry = rng.uniform(0.25, 0.4) * big, 0.08 * big
    paint.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), palette["lake"][0])
    if paint.style == "ghibli":
        for k in (-1, 1):
            paint.draw.line((cx - rx * 0.4 + k * rx * 0.2, cy + k * ry * 0.3, cx + rx * 0.1 + k * rx * 0.2,
                             cy + k * ry * 0.3), fill=(250, 252, 255), width=max(1, round(paint.scale)))
    else:
        paint.draw.ellipse((cx - rx * 0.6, cy - ry * 0.5, cx + rx * 0.6, cy + ry * 0.2),
                           fill=paint.color(palette["lake"][1]))


def _paint_village(paint: Painter, rng: np.random.Generator, scene: Scene, horizon: float, big: int) -> None:
    house_y = horizon + rng.uniform(0.1, 0.16) * big
    slots = sorted(rng.uniform(0.08, 0.78, size=scene.houses) * big)
    for x in slots:
        _house(paint, x, house_y + rng.uniform(-0.02, 0.04) * big, rng.uniform(0.15, 0.2) * big)
    for _ in range(scene.trees):
        tx, ty = rng.uniform(0.03, 0.97) * big, horizon + rng.uniform(0.05, 0.36) * big
        _tree(paint, tx, ty, rng.uniform(0.16, 0.24) * big, int(rng.integers(2)))


def _finish(image: Image.Image, style: str, rng: np.random.Generator, horizon: float, size: int) -> Image.Image:
    """The photo look's camera (shading towards the bottom, slight blur, grain), then the reduction to ``size``."""
    if style == "photo":
        big = image.width
        pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(0.7 * big / 128)), dtype=np.float32)
        shade = np.linspace(1.0, 0.8, big, dtype=np.float32)[:, None, None]
        pixels[int(horizon):] *= shade[int(horizon):]
        pixels += rng.normal(0.0, 7.0, size=pixels.shape).astype(np.float32)
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return image.resize((size, size), Image.Resampling.LANCZOS)


def render(scene: Scene, style: str, size: int = 64) -> Image.Image:
    """Draw ``scene`` in ``style`` ('photo' or 'ghibli') as a ``size`` x ``size`` RGB image."""
    if style not in STYLES:
        raise ValueError(f"style {style!r}: expected one of {STYLES}")
    rng = np.random.default_rng(scene.seed)
    big = size * RENDER_SCALE
    image = Image.fromarray(_sky(big, style, scene.time).astype(np.uint8))
    paint = Painter(image, style, scene.time, big / 128)
    horizon = rng.uniform(0.52, 0.62) * big
    _paint_sky(paint, image, rng, scene, horizon)
    _paint_ground(paint, rng, scene, horizon, big)
    if scene.lake:
        _paint_water(paint, rng, horizon, big)
    _paint_village(paint, rng, scene, horizon, big)
    return _finish(image, style, rng, horizon, size)


def scene_set(count: int, seed: int) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [random_scene(rng) for _ in range(count)]


def write_style_dataset(dataset_dir: str | os.PathLike, num_images: int = 24, seed: int = 1234,
                        size: int = 64, style: str = "ghibli") -> Path:
    """A dataset in the ghibli layout: ``images/scene_{i}.png`` and ``captions.json``."""
    dataset_dir = Path(dataset_dir)
    (dataset_dir / "images").mkdir(parents=True, exist_ok=True)
    captions = {}
    for index, scene in enumerate(scene_set(num_images, seed)):
        name = f"scene_{index:03d}.png"
        render(scene, style, size).save(dataset_dir / "images" / name)
        captions[name] = caption(scene, style, index)
    (dataset_dir / "captions.json").write_text(json.dumps(captions, indent=2, ensure_ascii=False) + "\n")
    logger.info("%d %s scenes written to %s", num_images, style, dataset_dir)
    return dataset_dir
