"""The sweep's report: epoch checkpoints in order, CLIP metrics on a tiny CLIP, the verdict's rule, and the
metrics table and heat maps of the shared sweep's report."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from tests.helpers import csv_rows, pixels, read_json
from utils.core.names import LORA_WEIGHT_NAME

def test_checkpoints_are_listed_in_epoch_order(tmp_path):
    from utils.sweep.runs import epoch_checkpoints

    for epoch in (10, 2, 1):
        folder = tmp_path / f"checkpoint_epoch_{epoch}"
        folder.mkdir()
        (folder / LORA_WEIGHT_NAME).write_bytes(b"")
    (tmp_path / "checkpoint_epoch_3").mkdir()  # no weights: an unfinished save is left out
    (tmp_path / "final_model").mkdir()
    (tmp_path / "final_model" / LORA_WEIGHT_NAME).write_bytes(b"")
    assert [label for label, _ in epoch_checkpoints(tmp_path)] == ["epoch_1", "epoch_2", "epoch_10"]
    assert [label for label, _ in epoch_checkpoints(tmp_path, include_final=True)][-1] == "final"


def test_tiny_clip_metrics_respond_to_the_images(tiny_clip_dir):
    from utils.sweep.clip_metrics import ClipEmbedder, centroid, clip_scores, diversity, score_image_set

    embedder = ClipEmbedder(str(tiny_clip_dir), device="cpu")
    rng = np.random.default_rng(0)
    noise = [Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)) for _ in range(3)]
    flat = [Image.new("RGB", (48, 48), colour) for colour in ("red", "green", "blue")]
    noise_embeddings, flat_embeddings = embedder.images(noise), embedder.images(flat)
    text = embedder.texts(["a house in ghibli style"])[0]
    cosines = (flat_embeddings @ text).numpy()
    assert len(set(np.round(cosines, 6))) == 3, "prompt alignment must differ between different images"
    assert np.allclose(clip_scores(text, flat_embeddings).numpy(), 100 * np.maximum(cosines, 0), atol=1e-4)
    assert diversity(embedder.images([flat[0]] * 3)) == pytest.approx(0.0, abs=1e-5)
    assert diversity(flat_embeddings) > 1e-4
    target = centroid(noise_embeddings)
    on_noise = score_image_set(embedder, ["noise"], [noise], target)
    on_flat = score_image_set(embedder, ["noise"], [flat], target)
    assert on_noise.style != pytest.approx(on_flat.style) and on_noise.diversity != pytest.approx(on_flat.diversity)
    assert on_noise.style > on_flat.style  # images are closer to their own centroid


def test_verdict_follows_the_stated_rule():
    from utils.sweep.metrics import choose_best

    def row(name, gain, change):
        return {"run": name, "style_gain": gain, "alignment_change": change, "alignment": 30 + change}

    rows = [row("a", 0.09, -3.0), row("b", 0.05, -1.0), row("c", 0.02, 0.5)]
    best, reason = choose_best(rows, tolerance=2.0)
    assert best["run"] == "b" and "b has the highest style gain" in reason
    assert [r["within_tolerance"] for r in rows] == [False, True, True] and [r["best"] for r in rows] == [0, 1, 0]
    best, reason = choose_best([row("a", 0.09, -3.0), row("b", 0.05, -2.5)], tolerance=2.0)
    assert best["run"] == "b" and "loses the least" in reason
    assert choose_best(rows, tolerance=5.0)[0]["run"] == "a"


def test_metrics_table_heatmaps_and_verdict_agree_with_the_csv(sweep_inference):
    from matplotlib import colormaps

    from utils.sweep.metrics import METRICS
    from utils.sweep.pictures import HEATMAP_AXES, HEATMAP_CMAP, HEATMAP_DPI, HEATMAP_FIGSIZE

    report = sweep_inference / "report"
    rows = csv_rows(report / "metrics.csv")
    assert sorted((int(r["rank"]), float(r["alpha"])) for r in rows) == [(2, 4.0), (2, 8.0), (4, 4.0), (4, 8.0)]
    for column in ("alignment", "style_similarity", "diversity"):
        assert len({r[column] for r in rows}) > 1, f"{column} is constant across runs"
    for r in rows:
        assert 0 < float(r["alignment_change_se"]) < 100
        assert float(r["style_gain"]) == pytest.approx(float(r["style_similarity"]) - float(r["style_similarity_base"]),
                                                       abs=1e-6)
    verdict = read_json(report / "verdict.json")
    eligible = [r for r in rows if float(r["alignment_change"]) >= -verdict["alignment_tolerance"]]
    if eligible:
        expected = max(eligible, key=lambda r: (float(r["style_gain"]), float(r["alignment"])))
    else:
        expected = max(rows, key=lambda r: float(r["alignment"]))
    assert verdict["best_run"] == expected["run"]
    assert [r["run"] for r in rows if r["best"] == "yes"] == [expected["run"]]

    markdown = (report / "metrics.md").read_text()
    assert f"Best trade-off: {expected['run']}" in markdown and "Rule:" in markdown
    table = {cells[0].strip("*★ "): cells for cells in
             ([c.strip() for c in line.strip("|").split("|")] for line in markdown.splitlines()
              if line.startswith("| ") and "---" not in line)}
    for r in rows:
        cells = table[r["run"]]
        for index, column, digits in ((3, "alignment", 2), (5, "style_similarity", 4), (6, "style_gain", 4),
                                      (7, "diversity", 4)):
            assert float(cells[index]) == pytest.approx(float(r[column]), abs=0.51 * 10 ** -digits)

    width, height = (int(v * HEATMAP_DPI) for v in HEATMAP_FIGSIZE)
    left, bottom, axes_w, axes_h = HEATMAP_AXES
    for column, stem, _, _ in METRICS:
        image = pixels(report / f"heatmap_{stem}.png")[..., :3]
        assert image.shape[:2] == (height, width)
        values = {(int(r["rank"]), float(r["alpha"])): float(r[column]) for r in rows}
        low, high = min(values.values()), max(values.values())
        for (rank, alpha), value in values.items():
            i, j = [2, 4].index(rank), [4.0, 8.0].index(alpha)
            x = int((left + axes_w * (j + 0.15) / 2) * width)
            y = int((1 - bottom - axes_h) * height + axes_h * height * (i + 0.15) / 2)
            expected_rgb = np.array(colormaps[HEATMAP_CMAP]((value - low) / (high - low))[:3]) * 255
            assert np.abs(image[y, x] - expected_rgb).max() <= 3, f"{stem} cell r{rank} a{alpha}"
    assert re.search(r"\| base model \| \| \| [\d.]+ \|", markdown)
