"""The sweep benchmark's parts: the same k runs of a rank x alpha grid trained separately (one process per
run, one after another, as the sweep runs them) and as one pack (one process), each process timed from its
start to its exit, with its step times and peak memory.

Each process builds the benchmark model (random weights, ``models.build_pipeline``), adds its runs' adapters
(``training.pack.add_adapters``), makes each run's optimizer and schedule (``make_member``) and times
``training.pack.packed_step`` on synthetic batches: with one run that is a plain run's step, with several
the packed step. The batches, noise and timesteps come from one seeded generator, the same in every process.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from utils.bench.flops import synchronize
from utils.bench.report import format_table, mib, rate_text
from utils.bench.steps import MemoryMeter

logger = logging.getLogger("benchmark_sweep")

RESULT_MARK = "BENCHMARK_RESULT "
ROOT = Path(__file__).resolve().parents[2]
COMMAND = ROOT / "utils" / "benchmark_sweep.py"


def run_process(config: dict, runs: list[tuple[int, float]]) -> dict:
    """One training process of ``runs`` (one run: separate; several: a pack), timed from start to exit."""
    payload = json.dumps({**config, "runs": runs})
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": str(config["num_threads"])}
    started = time.perf_counter()
    completed = subprocess.run([sys.executable, str(COMMAND), "--worker", payload], capture_output=True, text=True,
                               env=env)
    wall = time.perf_counter() - started
    for line in completed.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            return {**json.loads(line[len(RESULT_MARK):]), "wall_seconds": wall}
    logger.error("benchmark process of %d run(s) failed (exit %d):\n%s", len(runs), completed.returncode,
                 completed.stderr[-3000:])
    lines = [line for line in completed.stderr.splitlines() if line.strip()]
    return {"failed": lines[-1] if lines else f"exit status {completed.returncode}", "wall_seconds": wall}


def run_here(config: dict, runs: list[tuple[int, float]]) -> dict:
    """``run_process`` in this process (the imports paid once): wall time without them, peak memory shared."""
    started = time.perf_counter()
    result = worker({**config, "runs": runs})
    return {**result, "wall_seconds": time.perf_counter() - started}


def worker(config: dict) -> dict:
    """In the fresh process: build the model, add the runs' adapters, time ``steps`` packed steps."""
    from utils.bench.models import build_pipeline
    from utils.core.sdxl import DTYPES, SDXLComponents
    from utils.training.flags import parse_training_args
    from utils.training.model_inputs import Batch
    from utils.training.adapters import add_adapters, adapter_name
    from utils.training.pack import Routing, make_member, packed_step

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.set_num_threads(config["num_threads"])
    weight_dtype = DTYPES[config["mixed_precision"]]
    started = time.perf_counter()
    pipe = build_pipeline(config["model"], device, seed=0, weight_dtype=weight_dtype)
    components = SDXLComponents([pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2],
                                pipe.vae, pipe.unet, pipe.scheduler)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        module.requires_grad_(False)
    runs = [parse_training_args(["--lora_rank", str(rank), "--lora_alpha", str(alpha),
                                 "--resolution", str(config["resolution"]),
                                 "--train_batch_size", str(config["train_batch_size"]),
                                 "--lr_scheduler", "constant", "--lr_warmup_steps", "0"])
            for rank, alpha in config["runs"]]
    members = [make_member(args, params, args.learning_rate, config["steps"], name=adapter_name(i))
               for i, (args, params) in enumerate(zip(runs, add_adapters(components, runs)))]
    routing = Routing([components.unet]) if len(members) > 1 else None
    if config["gradient_checkpointing"]:
        components.unet.enable_gradient_checkpointing()
    components.unet.train()
    synchronize(device)
    setup_seconds = time.perf_counter() - started

    memory = MemoryMeter(device)
    memory.start_training()
    generator = torch.Generator().manual_seed(0)
    latent, size = config["resolution"] // 8, config["train_batch_size"]
    unet_config = components.unet.config
    pooled = unet_config.projection_class_embeddings_input_dim - 6 * unet_config.addition_time_embed_dim
    step_seconds = []
    autocast = torch.autocast(device.type, dtype=weight_dtype, enabled=cuda and weight_dtype != torch.float32)

    def draw(*shape):
        return torch.randn(*shape, generator=generator).to(device, weight_dtype)

    for _ in range(config["warmup"] + config["steps"]):
        batch = Batch(draw(size, 4, latent, latent), draw(size, 77, unet_config.cross_attention_dim),
                      draw(size, pooled), torch.tensor([[config["resolution"]] * 2 + [0, 0] + [config["resolution"]] * 2]
                                                       * size, device=device, dtype=weight_dtype))
        noise, timesteps = draw(size, 4, latent, latent), torch.randint(0, 1000, (size,), generator=generator).to(device)
        synchronize(device)
        start = time.perf_counter()
        with autocast:
            losses, _ = packed_step(components.unet, components.noise_scheduler, members, routing, batch, noise,
                                    timesteps)
        losses.tolist()  # as the loop reads them
        step_seconds.append(time.perf_counter() - start)
    train_peak, process_peak = memory.peaks()
    return {"runs": len(members), "setup_seconds": setup_seconds, "step_seconds": step_seconds[config["warmup"]:],
            "train_peak_bytes": train_peak, "process_peak_bytes": process_peak,
            "train_start_bytes": memory.start_bytes}


def summarise(separate: list[dict], packed: dict) -> dict:
    """The two ways of training the same k runs side by side: whole-sweep wall time (separately: k times the
    mean process of the runs timed alone), steps/s per run, memory."""
    k = packed["runs"]
    separate_step = statistics.median(s for result in separate for s in result["step_seconds"])
    packed_step = statistics.median(packed["step_seconds"])
    separate_peak = max(result["process_peak_bytes"] for result in separate)
    separate_wall = k * statistics.mean(result["wall_seconds"] for result in separate)
    return {
        "runs": k,
        "separate_wall_seconds": separate_wall,
        "packed_wall_seconds": packed["wall_seconds"],
        "separate_steps_per_second_per_run": 1 / separate_step,
        "packed_steps_per_second_per_run": 1 / packed_step,
        "separate_run_steps_per_second": 1 / separate_step,
        "packed_run_steps_per_second": k / packed_step,
        "separate_peak_bytes": separate_peak,
        "packed_peak_bytes": packed["process_peak_bytes"],
        "wall_ratio": packed["wall_seconds"] / separate_wall,
        "throughput_ratio": (k / packed_step) / (1 / separate_step),
        "peak_vs_separate_side_by_side": packed["process_peak_bytes"] / (k * separate_peak),
        "peak_vs_one_separate": packed["process_peak_bytes"] / separate_peak,
    }


def report(settings: dict, summary: dict, timed_alone: int | None = None) -> str:
    """The table of one pack size against the same runs trained separately (``timed_alone`` of them timed)."""
    k = summary["runs"]
    alone = "" if timed_alone in (None, k) else f", {k} x the mean of {timed_alone} timed"
    rows = [
        [f"separate ({k} processes, one after another{alone})", f"{summary['separate_wall_seconds']:.1f}",
         rate_text(summary["separate_steps_per_second_per_run"]), rate_text(summary["separate_run_steps_per_second"]),
         mib(summary["separate_peak_bytes"]), mib(k * summary["separate_peak_bytes"])],
        [f"packed ({k} runs, one process)", f"{summary['packed_wall_seconds']:.1f}",
         rate_text(summary["packed_steps_per_second_per_run"]), rate_text(summary["packed_run_steps_per_second"]),
         mib(summary["packed_peak_bytes"]), mib(summary["packed_peak_bytes"])],
    ]
    table = format_table(["way", "sweep wall s", "steps/s per run", "run-steps/s", "peak MiB per process",
                          f"peak MiB, {k} side by side"], rows)
    return (f"{settings['model']} model, {settings['resolution']}², batch {settings['train_batch_size']}, "
            f"{settings['steps']} timed steps (+{settings['warmup']} warm-up) per run, runs (rank, alpha) "
            f"{settings['runs'][:k]}, {settings['mixed_precision']}, gradient checkpointing "
            f"{'on' if settings['gradient_checkpointing'] else 'off'}\n{table}\n"
            f"packed / separate: sweep wall time {summary['wall_ratio']:.2f}x, throughput (run-steps/s) "
            f"{summary['throughput_ratio']:.2f}x, peak memory {summary['peak_vs_separate_side_by_side']:.2f}x of "
            f"{k} separate runs side by side, {summary['peak_vs_one_separate']:.2f}x of one separate run")
