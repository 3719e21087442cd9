"""A training run: its settings (the flags as given plus what is derived from them once), where it stands
(``TrainState``, saved in each resumable checkpoint), its wall-clock marks (``Timeline``), the trained adapter
with what updates it (``Adapter``), and the live objects the loop works with (``Run``).

These are plain records: ``recipe.set_up`` builds each of them whole, with keyword arguments; the recipe's
functions do the work. ``open_run`` is the one function here that acts: it opens the run folder.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from utils.core.layout import RunLayout, run_name
from utils.core.secrets import scrub
from utils.training.adapters import AdapterEMA
from utils.training.batches import BucketBatchSampler
from utils.training.checkpoints import resume_point
from utils.training.evaluation import EvalSet
from utils.training.loss_log import CsvLog
from utils.training.model_inputs import BatchMaker

logger = logging.getLogger(__name__)


def distributed_state():
    """accelerate's view of this launch (process index and count), known before the Accelerator exists.

    It reads the CPU flag the Accelerator reads too: without it, a multi-process CPU launch becomes N
    separate runs."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


@dataclass(frozen=True)
class RunSettings:
    """The flags of one training (``args``, as given, never changed) plus what was derived from them once."""

    args: argparse.Namespace
    dataset_type: str  # resolved ('auto', and 'hf' implied by --dataset_name)
    learning_rate: float  # after --scale_lr
    layout: RunLayout  # the run folder and the names in it
    resume_checkpoint: Path | None  # the resolved --resume_from_checkpoint

    @property
    def run_dir(self) -> Path:
        return self.layout.root

    @property
    def text_embedding_cache(self) -> bool:
        """Whether the text embeddings are cached: with --cache, unless the text encoders train or
        --shuffle_caption changes the captions at every step."""
        return bool(self.args.cache and not self.args.train_text_encoder and not self.args.shuffle_caption)

    def as_config(self) -> dict:
        """The flags as experiment_config.json records them: derived values in, secrets out."""
        return scrub({**vars(self.args), "dataset_type": self.dataset_type, "learning_rate": self.learning_rate,
                      "text_embedding_cache": self.text_embedding_cache,
                      "resume_checkpoint_path": str(self.resume_checkpoint) if self.resume_checkpoint else None})


def open_run(args: argparse.Namespace, dataset_type: str, state=None) -> RunSettings:
    """Create the run folder (or take the resumed run's) on the main process and share it with the others,
    so every process works in the same folder; the settings of the run in it."""
    from accelerate.utils import broadcast_object_list

    state = state or distributed_state()
    holder = [None]
    if state.is_main_process:
        run_dir, checkpoint = resume_point(args, dataset_type)
        run_dir = run_dir or create_unique_dir(Path(args.output_dir), run_name(
            dataset_type, args.lora_rank, args.lora_alpha, args.learning_rate))
        run_dir.mkdir(parents=True, exist_ok=True)
        holder = [(str(run_dir), str(checkpoint) if checkpoint else None)]
    run_dir_text, checkpoint_text = broadcast_object_list(holder)[0]
    learning_rate = args.learning_rate
    if args.scale_lr:
        learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * state.num_processes
    return RunSettings(args=args, dataset_type=dataset_type, learning_rate=learning_rate,
                       layout=RunLayout(Path(run_dir_text), args.logging_dir),
                       resume_checkpoint=Path(checkpoint_text) if checkpoint_text else None)


def create_unique_dir(parent: Path, name: str) -> Path:
    """mkdir is atomic, so two runs starting in the same second get different folders (``name_2``, ...)."""
    parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, 1000):
        candidate = parent / (name if attempt == 1 else f"{name}_{attempt}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise RuntimeError(f"{parent}: could not create a unique run directory for {name}")


@dataclass
class TrainState:
    """Where a run stands: its step, its best epoch, its losses so far and the facts recorded with it. Saved in
    each resumable checkpoint (training_state.json) and restored from it."""

    max_train_steps: int
    steps_per_epoch: int
    global_step: int = 0
    best_metric: float = math.inf
    best_epoch: int = 0
    initial_eval_loss: float | None = None
    last_eval_loss: float | None = None
    skipped_steps: int = 0  # optimizer steps skipped for a non-finite loss or gradient
    epoch_losses: list = field(default_factory=list)  # finite step losses of the current epoch so far
    dataset_info: dict = field(default_factory=dict)  # image count and caption tag frequencies
    speed_info: dict = field(default_factory=dict)  # resolved speed settings (checkpointing, evaluation plan)


@dataclass
class Timeline:
    """Wall-clock marks of a run: its set-up phases and the end of each optimizer step (``step_marks``, appended
    by the loop), written to logs/timings.json."""

    started: float = field(default_factory=time.time)
    phases: dict = field(default_factory=dict)
    step_marks: list = field(default_factory=list)

    @contextlib.contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - start

    def summary(self) -> dict:
        ended = time.time()
        marks = self.step_marks
        first, last = (marks[0], marks[-1]) if marks else (None, None)
        rate = (len(marks) - 1) / (last - first) if len(marks) > 1 and last > first else None
        intervals = [b - a for a, b in zip(marks[2:], marks[3:])]
        steady = 1 / sorted(intervals)[len(intervals) // 2] if intervals and min(intervals) > 0 else None
        return {"started": self.started, "first_step": first, "last_step": last, "ended": ended,
                "steps": len(marks), "time_to_first_step_s": None if first is None else first - self.started,
                "first_to_last_steps_per_s": rate, "steady_steps_per_s": steady, "wall_s": ended - self.started,
                "setup_phases_s": self.phases}

    def describe_setup(self) -> str:
        """The time to the first step and its set-up phases, for the log."""
        return (f"First optimizer step done {self.step_marks[0] - self.started:.1f} s after start (set-up: "
                + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.phases.items()) + ")")

    def write(self, path: Path) -> dict:
        from utils.core.atomic import write_json
        summary = self.summary()
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, summary)
        rate = summary["first_to_last_steps_per_s"]
        logger.info("Timing: first step after %s s, %s steps/s from the first to the last step, %.1f s in all",
                    _fmt(summary["time_to_first_step_s"]), _fmt(rate, 3), summary["wall_s"])
        return summary


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def read_timings(path: Path) -> dict:
    return json.loads(path.read_text())


@dataclass
class Adapter:
    """One trained adapter and what updates it at each optimizer step: its weights, optimizer, learning-rate
    schedule, gradient clip, non-finite guard and moving average. The step takes it whole, so several adapters
    on one frozen model each carry their own."""

    params: list[torch.nn.Parameter]  # the adapter weights that train
    optimizer: object  # accelerate's AcceleratedOptimizer
    lr_scheduler: object  # accelerate's AcceleratedScheduler
    max_grad_norm: float  # the gradient clip (math.inf: none)
    skips_on_device: bool  # the optimizer skips a flagged step on the device (the fused AdamW's found_inf)
    max_nonfinite_steps: int  # non-finite steps in a row that stop the run
    ema: AdapterEMA | None = None  # --use_ema: the moving average of the adapter weights
    nonfinite_in_a_row: int = 0
    name: str = "default"  # its PEFT adapter name (a run of a pack: adapters.adapter_name)


@dataclass
class Run:
    """Everything the training loop works with, built whole by ``recipe.set_up``."""

    settings: RunSettings
    accelerator: object  # accelerate's Accelerator
    components: object  # utils.core.sdxl.SDXLComponents; the trained models in it as accelerate prepared them
    models: list  # the trained models (components.unet, then with --train_text_encoder the text encoders)
    adapter: Adapter
    dataloader: object
    sampler: BucketBatchSampler
    batch_maker: BatchMaker
    eval_set: EvalSet
    state: TrainState
    num_epochs: int
    timeline: Timeline
    gradient_checkpointing: bool
    epoch_log: CsvLog  # logs/training_log.csv: one row per epoch
    step_log: CsvLog  # logs/training_steps.csv: one row per optimizer step
    routing: object | None = None  # a run of a pack: the pack's pack.Routing, shared by its runs
    failure: str | None = None  # a run of a pack that stopped (the others go on): why
