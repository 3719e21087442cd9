"""Plain helpers shared by the tests (no fixtures here: those live in tests/conftest.py).

Heavy libraries (numpy, PIL, torch, diffusers) are imported inside the functions that need them, so importing
this module stays cheap.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import runpy
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent


def run_script(*args: str, env: dict | None = None, timeout: int = 600, check: bool = True,
               cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run one of the project's scripts in a subprocess, as a user would."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    result = subprocess.run([sys.executable, *args], cwd=cwd or ROOT, env=full_env, capture_output=True,
                            text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{args[0]} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-6000:]}")
    return result


def run_in_process(*args: str, env: dict | None = None, check: bool = True,
                   cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run one of the project's scripts (``path.py ...`` or ``-m module ...``) in this process, as
    ``python`` would run it: ``__main__``, its flags in ``sys.argv``, the working folder ``cwd``, its
    exit status, and its stdout and stderr (log lines included) captured.

    For the commands whose test is not about processes: it saves the seconds a fresh Python spends
    importing torch, diffusers and transformers. An unexpected exception propagates (a subprocess would
    print its traceback and exit 1).
    """
    target, *flags = args
    module = flags.pop(0) if target == "-m" else None
    path = None if module else (ROOT / target if not Path(target).is_absolute() else Path(target))
    stdout, stderr = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root, saved_env, saved_argv, saved_cwd = logging.getLogger(), dict(os.environ), sys.argv, os.getcwd()
    saved_level, code = root.level, 0
    os.environ.update(env or {})
    sys.argv = [module or str(path), *flags]
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        os.chdir(cwd or ROOT)
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            if module:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(str(path), run_name="__main__")
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    finally:
        os.chdir(saved_cwd)
        sys.argv = saved_argv
        root.removeHandler(handler)
        root.setLevel(saved_level)
        os.environ.clear()
        os.environ.update(saved_env)
        _forget_accelerate_state()
    result = subprocess.CompletedProcess([target, *flags], code, stdout.getvalue(), stderr.getvalue())
    if check and code != 0:
        raise AssertionError(f"{target} failed ({code}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


def _forget_accelerate_state() -> None:
    """accelerate keeps one process state per Python (a fresh process starts without one): drop it, so that
    the next in-process run sets up its own, as its own process would."""
    state = sys.modules.get("accelerate.state")
    if state is not None:
        state.AcceleratorState._reset_state(reset_partial_state=True)
        state.GradientState._reset_state()


def csv_rows(path: Path) -> list[dict]:
    """Every row of a CSV file with a header, as dicts of strings."""
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def only_run_dir(output_dir: Path) -> Path:
    """The one run folder a training wrote under ``output_dir`` (hidden folders such as .cache are skipped)."""
    runs = [p for p in Path(output_dir).iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(runs) == 1, f"expected one run directory, found {[p.name for p in runs]}"
    return runs[0]


def wait_for(condition: Callable[[], bool], timeout: float, what: str,
             process: subprocess.Popen | None = None) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` seconds, or as soon as ``process`` has exited."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert process is None or process.poll() is None, f"the process exited before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def pixels(path: Path):
    """An image file as an (H, W, 3) int16 array (signed, so differences do not wrap)."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def find_tile(grid, tile) -> tuple[int, int]:
    """(y, x) of the top-left corner where ``tile`` sits in ``grid``."""
    import numpy as np

    height, width = tile.shape[:2]
    corner = np.all(grid[: grid.shape[0] - height + 1, : grid.shape[1] - width + 1] == tile[0, 0], -1)
    for y, x in zip(*np.nonzero(corner)):
        if np.array_equal(grid[y:y + height, x:x + width], tile):
            return int(y), int(x)
    raise AssertionError("tile not found in grid")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def assert_same_lora(a: Path, b: Path, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """The two LoRA files hold the same tensor names and (within tolerance) the same values."""
    import torch

    from utils.lora.files import read_tensors

    first, second = read_tensors(a), read_tensors(b)
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(second[key], first[key], rtol=rtol, atol=atol)


def load_pipe(model_dir: Path):
    """The SDXL pipeline of ``model_dir`` on the CPU, progress bars off."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------- the sweep's shell scripts

# One thread per process: on a shared 2-core machine, torch's thread pools oversubscribe the cores and
# a 6-second tiny training can take ten times as long.
SCRIPT_ENV = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}


def run_bash(script: str, *args: str, env: dict | None = None, timeout: int = 300,
             cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run one of the project's shell scripts (run_*.sh) with bash, as a user would."""
    return subprocess.run(["bash", str(ROOT / script), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**SCRIPT_ENV, **(env or {})})


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains ``text`` (zombies have an empty command line)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def read_status(work: Path, rank: str, alpha: str, lr: str = "1e-4") -> dict | None:
    """The sweep's status.json of one run, or None before it started."""
    path = work / "experiment_results" / "runs" / f"r{rank}_a{alpha}_lr{lr}" / "status.json"
    return read_json(path) if path.is_file() else None


def run_folders(work: Path) -> list[Path]:
    """What the original's user sees: ``ls -d output_ghibli/*/``."""
    runs = work / "output_ghibli"
    return sorted(p for p in runs.iterdir() if p.is_dir() and not p.name.startswith(".")) if runs.is_dir() else []
