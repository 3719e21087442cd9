"""utils/gpu_check.sh on a CPU with the tiny SDXL: every part runs, under its own timeout, and the summary
reports finite figures; the plan for the full-size model stays within its budget."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT
from utils.bench.gpu_plan import CAPS, DEFAULT_BUDGET_S, PARTS, Places, make_plan
from utils.gpu_check import missing_wheels

SCRIPT = ROOT / "utils" / "gpu_check.sh"


def run_check(out: Path, work: Path, *flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", str(SCRIPT), "--device", "cpu", "--out", str(out), "--work", str(work), *flags],
                          capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def cpu_check(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict]:
    base = tmp_path_factory.mktemp("gpu_check")
    completed = run_check(base / "out", base / "work")
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return completed, json.loads((base / "out" / "gpu_check.json").read_text())


def finite_numbers(value) -> list[float]:
    if isinstance(value, dict):
        return [n for v in value.values() for n in finite_numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in finite_numbers(v)]
    return [float(value)] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


@pytest.mark.slow
def test_every_part_runs_on_the_cpu_and_reports_finite_figures(cpu_check):
    completed, summary = cpu_check
    assert set(summary["parts"]) == set(PARTS)
    for name, entry in summary["parts"].items():
        if name == "adamw8bit" and "bitsandbytes" in entry["status"]:
            assert entry["status"].startswith("skipped"), entry  # bitsandbytes: CUDA only
            continue
        assert entry["status"] == "ok", (name, entry["status"])
        assert all(math.isfinite(n) for n in finite_numbers(entry["figures"])), name
    steps = [row for name in ("bench_full_b1", "bench_full_b4", "bench_half_b1", "compile")
             for row in summary["parts"][name]["figures"]["steps"]]
    assert {r["variant"] for r in steps} == {"naive", "ours", "gc", "compile"}
    assert all(r["s_per_step"] > 0 and r["peak_gib"] > 0 and 0 < r["mfu"] < 1 for r in steps)
    assert {(r["resolution"], r["batch"]) for r in steps} == {(128, 1), (128, 4), (64, 1)}
    assert summary["parts"]["compile"]["figures"]["steps"][0]["compile_s"] > 0


@pytest.mark.slow
def test_training_runs_and_the_checkpointing_choice_are_checked(cpu_check):
    _, summary = cpu_check
    for name in ("train_bf16", "train_fp16"):
        run = summary["parts"][name]["figures"]
        assert run["losses_finite"] and run["weights_finite"] and run["weights_trained"], run
        # per module: diffusers' lora_A and lora_B; kohya's lora_down, lora_up and alpha
        assert run["kohya_tensors"] == run["lora_tensors"] // 2 * 3 > 0
        assert run["diffusers_loads"] and run["kohya_loads"] and run["image_finite"]
        assert run["resolved_gradient_checkpointing"] is False  # auto: off on a CPU
    configs = summary["parts"]["auto_checkpointing"]["figures"]["configs"]
    assert set(configs) == {"bench_full_b1", "bench_full_b4", "bench_half_b1"}
    for config in configs.values():
        assert config["chose"] == "off" and config["verdict"].startswith("right")
        assert config["estimated_activation_bytes"] > 0 and config["measured_step_bytes"] > 0
    b1, b4 = configs["bench_full_b1"], configs["bench_full_b4"]
    assert b4["estimated_activation_bytes"] == 4 * b1["estimated_activation_bytes"]


@pytest.mark.slow
def test_the_summary_table_is_printed_and_saved(cpu_check, tmp_path):
    completed, summary = cpu_check
    assert summary["table"] in completed.stdout
    for name in PARTS:
        assert f"\n{name} " in summary["table"]
    for heading in ("training step", "auto checkpointing", "published anchors", "goal: >= 45% MFU"):
        assert heading in summary["table"]


def test_a_spent_budget_skips_parts_and_still_summarises(tmp_path):
    completed = run_check(tmp_path / "out", tmp_path / "work", "--budget_s", "5")
    assert completed.returncode == 0, completed.stderr
    summary = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert {entry["status"] for entry in summary["parts"].values()} == {"skipped: no time left in the 5 s budget"}


def test_the_full_size_plan_shares_one_saved_model_and_fits_the_budget(tmp_path):
    places = Places(tmp_path / "out", tmp_path / "work")
    plan = make_plan("sdxl", "cuda", places)
    assert [part.name for part in plan] == list(PARTS)
    benches = [part.command for part in plan if "benchmark_train.py" in part.command[1]]
    assert len(benches) == 5 and all(str(places.model_dir) in command for command in benches)
    full_b1 = next(part.command for part in plan if part.name == "bench_full_b1")
    assert full_b1[full_b1.index("--resolution") + 1] == "1024" and "naive,ours,gc" in full_b1
    assert DEFAULT_BUDGET_S < 540 and set(CAPS["sdxl"]) == set(CAPS["tiny"]) == set(PARTS)
    assert f'BUDGET="${{BUDGET:-{DEFAULT_BUDGET_S}}}"' in SCRIPT.read_text()  # the script's default is the same


def test_only_missing_distributions_get_wheels(tmp_path):
    (tmp_path / "wheels").mkdir()
    for name in ("no_such_distribution_here-1.0-py3-none-any.whl", "numpy-1.0-cp312-cp312-manylinux_2_28_x86_64.whl"):
        (tmp_path / "wheels" / name).write_bytes(b"")
    listing = tmp_path / "list.txt"
    listing.write_text("# comment\nnumpy==1.0\nNo.Such-Distribution_Here==1.0  # missing, has a wheel\n"
                       "another-absent-distribution==2.0\n")
    found = missing_wheels(listing, tmp_path / "wheels")  # numpy is installed; the last has no wheel (logged)
    assert [path.name for path in found] == ["no_such_distribution_here-1.0-py3-none-any.whl"]
