"""The diffusers-example whole run's parsing: step stamps from a tqdm bar and the imagefolder it trains on
(the example itself is not part of the project and is not run here)."""

import json
import sys

import pytest

from utils.bench.diffusers_run import STEP_PATTERN, launch, step_figures, write_imagefolder


def test_step_pattern_reads_tqdm_counts():
    text = b"Steps:   0%|          | 0/24 [00:00<?, ?it/s]\rSteps:   4%|4         | 1/24 [00:01<00:30, 1.2s/it, lr=1]"
    assert [int(m.group(1)) for m in STEP_PATTERN.finditer(text)] == [0, 1]


def test_step_figures_from_stamps():
    figures = step_figures(100.0, {1: 110.0, 2: 111.0, 3: 112.0, 5: 116.0})
    assert figures["time_to_first_step_s"] == pytest.approx(10.0)
    assert figures["first_to_last_steps_per_s"] == pytest.approx(4 / 6)
    assert figures["steady_steps_per_s"] == pytest.approx(1.0)  # intervals per step: 1, 1, 2 -> median 1
    assert figures["steps"] == 5


def test_launch_stamps_steps_and_peak_rss():
    script = ("import sys, time\n"
              "for i in range(3):\n"
              "    sys.stderr.write(f'\\rSteps: {33 * i}%|#| {i}/2 [00:00<00:00]'); sys.stderr.flush(); time.sleep(0.05)\n")
    result = launch([sys.executable, "-c", script], {}, step_stamps=True)
    assert result["returncode"] == 0
    assert sorted(result["stamps"]) == [1, 2]
    assert result["stamps"][2] > result["stamps"][1] >= result["launched"]
    assert result["peak_rss_bytes"] > 1 << 20


def test_write_imagefolder_links_images_and_captions(tmp_path):
    (tmp_path / "data" / "images").mkdir(parents=True)
    (tmp_path / "data" / "images" / "a.png").write_bytes(b"png")
    (tmp_path / "data" / "captions.json").write_text(json.dumps({"a.png": "a sky"}))
    folder = write_imagefolder(tmp_path / "data", tmp_path / "folder")
    assert (folder / "a.png").read_bytes() == b"png"
    assert [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()] == [
        {"file_name": "a.png", "text": "a sky"}]
