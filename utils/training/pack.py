"""Several runs of a rank x alpha grid trained at once on one frozen SDXL: a pack.

The runs of a sweep's grid differ only in their adapter. A pack puts one PEFT adapter per run on the one
frozen UNet (and text encoders), makes each step's batch once, repeats it once per run and routes each copy
to its own adapter, layer by layer: PEFT's LoRA layers take ``adapter_names`` (one name per sample), the
routing its mixed-batch inference uses. PEFT's model API refuses that argument in training mode, but the
layers' own routing trains correctly, so a forward pre-hook on every LoRA layer (``Routing``) passes it. A
run's loss is the mean over its own copy of the batch, so the gradient of the summed losses is, for each
adapter, the gradient of its own run alone.

Each run keeps what makes it a run of its own: its optimizer and learning-rate schedule, the clipping of its
own gradient norm, its own non-finite guard (one run's NaN skips that run's step only) and its own EMA. The
trainer's loop (utils/training/recipe.py: ``set_up_pack``, ``train_step``, ``update``) trains a pack with the
parts here: ``Routing``, ``own_adapter`` for a run's evaluation and images, ``save_run_state`` and
``load_run_state`` for its checkpoints, ``check_pack``.

What cannot pack (``unpackable_reason``): PEFT's routing exists only in its LoRA layers, and refuses DoRA;
LoHa and LoKr layers pass the argument on to the frozen layer, which fails. Text-encoder LoRA routes too
(measured), but the trainer encodes a step's captions once, before the routing, so it trains alone; so do
runs with trackers (one per process) and fp16 on a GPU (no loss scaling). ``--lora_dropout`` packs, but
the dropout masks are drawn for the whole packed batch, so those runs match separate ones in distribution,
not draw for draw.

``--pack auto`` (``choose_pack_size``): the largest pack whose activations (the estimate that decides
gradient checkpointing, ``memory.estimate_activation_bytes``, times the runs) and adapter states fit in the
free accelerator memory (or the available RAM on a CPU) beside the frozen weights, with the same margins as
that decision, never more runs than the grid has.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
from pathlib import Path
from typing import Iterator

import torch

from utils.core.layout import CHECKPOINT_LORA_FILES
from utils.training.adapters import lora_config
from utils.training.memory import ACTIVATION_MARGIN, FIXED_MARGIN, GIB, estimate_activation_bytes

logger = logging.getLogger(__name__)

# The flags in which the runs of one pack may differ: everything else is shared (one model, one batch).
# and each run's own --run_dir_file (the sweep's record) and --resume_from_checkpoint
PACKABLE_DIFFERENCES = ("lora_rank", "lora_alpha", "run_dir_file", "resume_from_checkpoint")
# fp32 adapter weight + gradient + AdamW's two moments + the EMA copy, per trained parameter
ADAPTER_STATE_BYTES = 5 * 4


# ----------------------------------------------------------------------------- which runs pack


def unpackable_reason(args: argparse.Namespace) -> str | None:
    """Why a run with these flags cannot train in a pack, or None when it can."""
    if args.use_dora:
        return "--use_dora: PEFT refuses to route a batch between DoRA adapters"
    if args.lora_type != "lora":
        return f"--lora_type {args.lora_type}: PEFT routes a batch between adapters only in its LoRA layers"
    if args.train_text_encoder:
        return "--train_text_encoder: a pack encodes each step's captions once, not through each run's adapter"
    if args.report_to != "none":
        return f"--report_to {args.report_to}: the trackers log one run per process (pack with --report_to none)"
    if args.mixed_precision == "fp16" and torch.cuda.is_available():
        return "--mixed_precision fp16: the packed step has no loss scaling (pack with bf16)"
    return None


def check_pack(runs: list[argparse.Namespace]) -> None:
    """Refuse a pack whose runs cannot train together (one run alone always can)."""
    if len(runs) < 2:
        return
    from utils.core.errors import TrainingError
    for args in runs:
        reason = unpackable_reason(args)
        if reason:
            raise TrainingError(f"cannot train r{args.lora_rank} a{args.lora_alpha:g} in a pack: {reason}")
    differing = sorted({key for args in runs[1:] for key, value in vars(args).items()
                        if key not in PACKABLE_DIFFERENCES and vars(runs[0]).get(key) != value})
    if differing:
        raise TrainingError(f"the runs of a pack differ in --{', --'.join(differing)}: only --lora_rank and "
                            "--lora_alpha may differ")
    names = {(args.lora_rank, args.lora_alpha) for args in runs}
    if len(names) < len(runs):
        raise TrainingError("a pack holds each (rank, alpha) once")


def pack_key(args: argparse.Namespace) -> tuple:
    """Runs pack together when their keys are equal: every flag but the adapter's rank and alpha."""
    return tuple(sorted((k, repr(v)) for k, v in vars(args).items() if k not in PACKABLE_DIFFERENCES))


# ----------------------------------------------------------------------------- adapters and routing


def plan_packs(runs: list[argparse.Namespace], pack: str, device: torch.device | None = None,
               steps: list[int] | None = None) -> tuple[list[list[int]], list[str]]:
    """How a sweep trains ``runs`` (each run's trainer flags) with ``--pack N`` or ``auto``: (the packs, as
    lists of indices into ``runs``; one log line for each run that trains alone, saying why). Runs pack when
    their flags are equal but for rank and alpha and they stand at the same step (``steps``: where each
    resumes, 0 for a new run); ``auto`` sizes each pack by ``auto_pack_size`` on ``device``."""
    if pack != "auto" and (not pack.isdigit() or int(pack) < 1):
        from utils.core.errors import UserError
        raise UserError(f"--pack {pack}: a number of runs (1: each run alone) or auto")
    steps = steps or [0] * len(runs)
    packs, lines, groups = [], [], {}
    for index, args in enumerate(runs):
        reason = None if pack == "1" else unpackable_reason(args)
        if pack == "1" or reason:
            packs.append([index])
            if reason:
                lines.append(f"r{args.lora_rank} a{args.lora_alpha:g} trains alone: {reason}")
            continue
        groups.setdefault((pack_key(args), steps[index]), []).append(index)
    if len({step for _, step in groups}) > 1:
        lines.append("runs that resume from different steps train in different packs")
    for members in groups.values():
        size = int(pack) if pack != "auto" else None
        if size is None:
            largest = max(members, key=lambda i: runs[i].lora_rank)  # activations barely depend on the rank
            size, why = auto_pack_size(runs[largest], len(members), device or torch.device("cpu"))
            lines.append(f"--pack auto: {why}")
        packs += [members[start:start + size] for start in range(0, len(members), size)]
    return sorted(packs), lines


class Routing:
    """A forward pre-hook on every PEFT adapter layer of ``models`` that passes ``adapter_names`` while a route
    is set (``with routing.route(names):``, forward and backward, so that gradient checkpointing's recompute
    routes too); without one the layers run their active adapters as usual.

    ``names`` is one adapter name per sample, or one name for every sample of whatever batch comes (one run's
    evaluation, or its validation images, where classifier-free guidance doubles the batch). PEFT's
    ``set_adapter`` would do the latter too, but it also freezes the other adapters' weights."""

    def __init__(self, models: list[torch.nn.Module]):
        from peft.tuners.tuners_utils import BaseTunerLayer  # every kind, so that one that cannot route fails
        self.names: list[str] | str | None = None
        self.handles = [module.register_forward_pre_hook(self._hook, with_kwargs=True)
                        for model in models for module in model.modules() if isinstance(module, BaseTunerLayer)]

    def _hook(self, module, args, kwargs):
        if isinstance(self.names, str):
            kwargs["adapter_names"] = [self.names] * len(args[0] if args else kwargs["x"])
        elif self.names is not None:
            kwargs["adapter_names"] = self.names
        return args, kwargs

    @contextlib.contextmanager
    def route(self, names: list[str] | str) -> Iterator[None]:
        self.names = names
        try:
            yield
        finally:
            self.names = None

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def adapter_state_dict(model: torch.nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The adapter ``name`` of ``model`` under the keys a run alone saves (PEFT drops the name)."""
    from peft.utils import get_peft_model_state_dict
    return get_peft_model_state_dict(model, adapter_name=name)


def own_adapter(run) -> contextlib.AbstractContextManager:
    """For a run of a pack (a ``run.Run``), every sample routed to its adapter (its evaluation, its validation
    images); nothing to do for a run alone."""
    return run.routing.route(run.adapter.name) if run.routing is not None else contextlib.nullcontext()


def run_label(run) -> str:
    """' (r4 a8)' for a run of a pack, in the log lines the runs share; nothing for a run alone."""
    return f" (r{run.settings.args.lora_rank} a{run.settings.args.lora_alpha:g})" if run.routing is not None else ""


def routes(size: int, names: list[str]) -> list[str]:
    """``adapter_names`` for a batch of ``size`` repeated once per name: the i-th name on the i-th block."""
    return [name for name in names for _ in range(size)]


# ----------------------------------------------------------------------------- one run's resumable state


def state_writer(run):
    """How a run's checkpoint writes its accelerate state: ``accelerator.save_state`` for a run alone (None);
    for a run of a pack, its own adapter, optimizer and schedule (``save_run_state``)."""
    if run.routing is None:
        return None
    return functools.partial(save_run_state, run.accelerator, models=run.models, adapter=run.adapter,
                             dataloaders=[run.dataloader])


def save_run_state(accelerator, folder: str | Path, models: list, adapter, dataloaders: list = ()) -> None:
    """The pack's ``index``-th run's resumable state in ``folder``, in the files ``accelerator.save_state``
    writes for that run alone (with the trainer's checkpoint hooks): its LoRA of each trained model, its
    optimizer and schedule, the RNG states (the pack's, which are the run's: every run draws the same). A
    run of a pack can so go on alone with ``train_sdxl_lora.py --resume_from_checkpoint``."""
    from accelerate.checkpointing import save_accelerator_state
    from safetensors.torch import save_file

    if accelerator.is_main_process:
        for model, name in zip(models, CHECKPOINT_LORA_FILES):
            lora = adapter_state_dict(accelerator.unwrap_model(model), adapter.name)
            save_file({key: value.contiguous() for key, value in lora.items()}, str(Path(folder) / name))
    save_accelerator_state(str(folder), [], [adapter.optimizer], [adapter.lr_scheduler], list(dataloaders),
                           accelerator.process_index, accelerator.step, accelerator.scaler)


def load_run_state(accelerator, folder: str | Path, models: list, adapter, dataloaders: list = ()) -> None:
    """``save_run_state``'s files (or a lone run's checkpoint) into a run of a pack (its ``adapter``: a
    ``run.Adapter``, or anything with its name, optimizer and schedule)."""
    from accelerate.checkpointing import load_accelerator_state
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    for model, name in zip(models, CHECKPOINT_LORA_FILES):
        result = set_peft_model_state_dict(accelerator.unwrap_model(model), load_file(str(Path(folder) / name)),
                                           adapter_name=adapter.name)
        if getattr(result, "unexpected_keys", None):
            raise RuntimeError(f"{folder}: unexpected LoRA keys {result.unexpected_keys[:3]}")
    load_accelerator_state(str(folder), [], [adapter.optimizer], [adapter.lr_scheduler], list(dataloaders),
                           accelerator.process_index, accelerator.scaler)


# ----------------------------------------------------------------------------- --pack auto


def run_bytes(unet_config, args: argparse.Namespace, dtype: torch.dtype) -> int:
    """Memory one more run adds to a pack: its activations (counted as for gradient checkpointing's choice,
    without checkpointing, so an upper bound with it) and its adapter's fp32 states."""
    config = lora_config(args, args.lora_target_modules)
    activations = estimate_activation_bytes(unet_config, args.resolution, args.train_batch_size, dtype, config)
    return activations + adapter_parameters(unet_config, config) * ADAPTER_STATE_BYTES


def adapter_parameters(unet_config, config) -> int:
    """Trainable parameters of one adapter of ``config`` on a UNet of ``unet_config`` (built on meta)."""
    from diffusers import UNet2DConditionModel
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
    unet.add_adapter(config)
    return sum(p.numel() for name, p in unet.named_parameters() if "lora_" in name)


def free_bytes(device: torch.device) -> int:
    """Free accelerator memory, or on a CPU the RAM the system can still give (MemAvailable)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def auto_pack_size(args: argparse.Namespace, grid: int, device: torch.device) -> tuple[int, str]:
    """``--pack auto`` before anything loads: (runs per pack, why) for runs of ``args``'s flags (give the
    grid's largest rank) on ``device``, from the model's configs alone (meta device, no weights read): the
    free memory less the frozen weights, against what each run adds."""
    from diffusers import UNet2DConditionModel
    from utils.core.sdxl import DTYPES, resolve_mixed_precision

    dtype = DTYPES[resolve_mixed_precision(args.mixed_precision, device.type == "cuda")]
    model = args.pretrained_model_name_or_path
    unet_config = UNet2DConditionModel.load_config(model, subfolder="unet", revision=args.revision)
    available = free_bytes(device) - frozen_bytes(model, unet_config, dtype, args.revision)
    return choose_pack_size(grid, available, run_bytes(unet_config, args, dtype))


def frozen_bytes(model: str, unet_config, dtype: torch.dtype, revision: str | None = None) -> int:
    """The frozen model's memory: the UNet and both text encoders in ``dtype``, the VAE in fp32."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    size = torch.tensor([], dtype=dtype).element_size()
    with torch.device("meta"):
        count = sum(p.numel() for p in UNet2DConditionModel.from_config(unet_config).parameters()) * size
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(model, subfolder="vae", revision=revision))
        count += sum(p.numel() for p in vae.parameters()) * 4
        for folder, kind in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
            encoder = kind(CLIPTextConfig.from_pretrained(model, subfolder=folder, revision=revision))
            count += sum(p.numel() for p in encoder.parameters()) * size
    return count


def choose_pack_size(grid: int, available: int, per_run: int) -> tuple[int, str]:
    """(runs per pack, why): the most runs whose memory, with gradient checkpointing's margins (x
    ACTIVATION_MARGIN, + FIXED_MARGIN once), fits in ``available`` (free memory beside the frozen
    weights); at least 1, at most ``grid``."""
    fits = int((available - FIXED_MARGIN) // (per_run * ACTIVATION_MARGIN)) if available > FIXED_MARGIN else 0
    size = max(1, min(grid, fits))
    numbers = (f"{per_run / GIB:.2f} GiB per run x {ACTIVATION_MARGIN} + {FIXED_MARGIN / GIB:.0f} GiB, "
               f"{available / GIB:.1f} GiB free")
    if fits >= grid:
        return size, f"auto: all {grid} runs of the grid fit in one pack ({numbers})"
    if fits < 1:
        return 1, f"auto: not even one more run fits beside the model ({numbers}); runs train alone"
    return size, f"auto: {size} runs fit in a pack ({numbers})"

