"""The settings of one training: its flags as given, plus what was derived from them once.

``args`` from the parser is never changed. What the trainer derives (the resolved dataset type, the
learning rate after --scale_lr, the run folder and the checkpoint to resume) lives here, made once
by ``RunSettings.make`` and then only read.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from utils.core.errors import UserError
from utils.core.secrets import scrub
from utils.core.atomic import write_text
from utils.training.checkpoints import resume_point
from utils.training.run_dir import create_unique_dir, run_name


class TrainingError(UserError):
    """A problem that stops training with a clear message instead of a traceback."""


def distributed_state():
    """accelerate's view of this launch (process index and count), known before the Accelerator exists.

    It reads the CPU flag the Accelerator reads too: without it, a multi-process CPU launch becomes N
    separate runs."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


@dataclass(frozen=True)
class RunSettings:
    """The flags of one training (``args``, as given) plus what was derived from them once."""

    args: argparse.Namespace
    dataset_type: str  # resolved ('auto', and 'hf' implied by --dataset_name)
    learning_rate: float  # after --scale_lr
    run_dir: Path
    resume_checkpoint: Path | None  # the resolved --resume_from_checkpoint

    @property
    def text_embedding_cache(self) -> bool:
        """Whether the text embeddings are cached: with --cache, unless the text encoders train or
        --shuffle_caption changes the captions at every step."""
        return bool(self.args.cache and not self.args.train_text_encoder
                    and not getattr(self.args, "shuffle_caption", False))

    def as_config(self) -> dict:
        """The flags as experiment_config.json records them: derived values in, secrets out."""
        return scrub({**vars(self.args), "dataset_type": self.dataset_type, "learning_rate": self.learning_rate,
                      "text_embedding_cache": self.text_embedding_cache,
                      "resume_checkpoint_path": str(self.resume_checkpoint) if self.resume_checkpoint else None})

    @classmethod
    def make(cls, args: argparse.Namespace, dataset_type: str, state=None) -> "RunSettings":
        """Resolve the run folder (the resumed run's, or a new unique one) on the main process and share it
        with the others, so every process works in the same folder."""
        from accelerate.utils import broadcast_object_list

        state = state or distributed_state()
        holder = [None]
        if state.is_main_process:
            run_dir, checkpoint = resume_point(args, dataset_type)
            run_dir = run_dir or create_unique_dir(Path(args.output_dir), run_name(args, dataset_type))
            run_dir.mkdir(parents=True, exist_ok=True)
            if args.run_dir_file:  # the sweep's record of where this run trains, before any other work
                write_text(args.run_dir_file, f"{run_dir.resolve()}\n")
            holder = [(str(run_dir), str(checkpoint) if checkpoint else None)]
        run_dir_text, checkpoint_text = broadcast_object_list(holder)[0]
        learning_rate = args.learning_rate
        if args.scale_lr:
            learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * state.num_processes
        return cls(args, dataset_type, learning_rate, Path(run_dir_text),
                   Path(checkpoint_text) if checkpoint_text else None)
