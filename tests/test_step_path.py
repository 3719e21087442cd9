"""The path of one optimizer step stays short: the project files whose functions a training step calls into,
counted by a profiler hook from the end of optimizer step 3 (which saves a resumable checkpoint) to the end of
step 4. It counts what a reader has to open to follow a step with its logging, guards and checkpoint."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

MAX_STEP_FILES = 6
FIRST, LAST = 3, 4  # the window: from the end of optimizer step FIRST to the end of step LAST


def project_file(filename: str) -> str | None:
    """The file's path in the project (utils/..., a top-level script), or None for libraries and tests."""
    path = Path(filename)
    if not path.is_absolute() or ".venv" in path.parts:
        return None
    try:
        relative = path.resolve().relative_to(ROOT)
    except ValueError:
        return None
    return None if relative.parts[0] == "tests" else str(relative)


def files_of_one_step(args) -> list[str]:
    """Train with ``args`` in this process; the project files called into between the end of optimizer step
    FIRST and the end of step LAST (the ends told by accelerate's optimizer step returning)."""
    from accelerate.optimizer import AcceleratedOptimizer

    from utils.training.recipe import train

    step_code = AcceleratedOptimizer.step.__code__
    steps, seen = [0], set()

    def hook(frame, event, arg):
        if event == "return" and frame.f_code is step_code:
            steps[0] += 1
        elif event == "call" and FIRST <= steps[0] < LAST:
            name = project_file(frame.f_code.co_filename)
            if name:
                seen.add(name)

    sys.setprofile(hook)
    try:
        train(args)
    finally:
        sys.setprofile(None)
    assert steps[0] > LAST, f"the run made {steps[0]} optimizer steps"
    return sorted(seen)


@pytest.mark.slow
def test_one_optimizer_step_runs_through_few_project_files(tiny_model_dir, tiny_dataset_dir, tmp_path):
    from tests.helpers import _forget_accelerate_state
    from utils.training.flags import parse_training_args

    args = parse_training_args([
        "--pretrained_model_name_or_path", str(tiny_model_dir), "--dataset_dir", str(tiny_dataset_dir),
        "--output_dir", str(tmp_path), "--resolution", "32", "--max_train_steps", "5", "--checkpointing_steps",
        str(FIRST), "--report_to", "none", "--min_image_size", "0"])
    try:
        files = files_of_one_step(args)
    finally:
        _forget_accelerate_state()
    print(f"{len(files)} project files in one optimizer step: {', '.join(files)}")
    assert len(files) <= MAX_STEP_FILES, files
