"""Training speed and memory: the naive loop against our default path, and each speed/memory lever.

Every variant trains the same model on the same synthetic images with the trainer's own code
(``prepare_run`` and ``train_micro_step``: loading, LoRA, caches, accelerate), each in a fresh
process so peak memory is its own; rounds are interleaved (naive, ours, ..., naive, ours, ...) so
background load hits all variants alike, and a last run alternates naive and cached steps in one
process for a speed ratio that background load cannot skew.

  naive   the original's loop: VAE and both text encoders run on every step (--no-cache)
  ours    the default: latents and embeddings cached once, encoders off the accelerator,
          SDPA attention, fp32 LoRA parameters, frozen weights in the compute dtype
  levers  ours with one change each: gradient checkpointing toggled, channels-last UNet,
          encoders kept on the device, 8-bit AdamW, another precision, torch.compile

'naive' against 'ours' is also the caching benchmark (--cache against --no-cache).

Whole runs (--whole_run, on by default): train_sdxl_lora.py itself, start to exit, for
  naive      the original's loop: encoders every step (--no-cache), gradient checkpointing always on,
             no fixed-noise evaluation
  previous   this project before issue 15: cached, checkpointing on, fixed-noise loss after every epoch
             on 32 triples
  default    no flags: cached, checkpointing auto, evaluation within ~5% of the compute
with the time to the first step, the first-to-last-step rate, the steady-state rate (median step
interval) and the wall time, and the ratios default / naive in one run.

    python utils/benchmark_train.py --model small                  # CPU, a few minutes
    python utils/benchmark_train.py --model sdxl --resolution 1024 --mixed_precision bf16   # GPU
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from utils.bench.models import DEFAULT_RESOLUTION, MODELS
from utils.bench.steps import Variant, all_variants, skip_reason, trainer_args

logger = logging.getLogger("benchmark_train")

RESULT_MARK = "BENCHMARK_RESULT "


# ----------------------------------------------------------------------------- FLOPs, on the meta device


def step_flops(model: str, resolution: int, batch_size: int, args: argparse.Namespace) -> dict[str, int]:
    """FLOPs of one training step's parts, counted on the meta device (no memory, no time).

    unet: UNet + LoRA forward and backward (the model FLOPs of MFU); unet_checkpointed: the same with
    gradient checkpointing's recomputation; vae / text: the encoders' forward passes the naive loop adds.
    """
    from diffusers import DDPMScheduler

    from utils.training import trainer
    from utils.bench.models import build_pipeline
    from utils.bench.flops import count_flops
    from utils.core.sdxl import SDXLComponents, encode_prompts, vae_latent_distribution

    pipe = build_pipeline(model, "meta")
    components = SDXLComponents([pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2],
                                pipe.vae, pipe.unet, DDPMScheduler.from_config(pipe.scheduler.config))
    for module in [pipe.vae, pipe.unet, pipe.text_encoder, pipe.text_encoder_2]:
        module.requires_grad_(False)
    vae, unet = components.vae, components.unet
    latent = resolution // 8
    pixels = torch.zeros(batch_size, 3, resolution, resolution, device="meta")
    flops = {"vae": count_flops(lambda: vae_latent_distribution(vae, pixels).sample())}
    flops["text"] = count_flops(lambda: encode_prompts(components.tokenizers, components.text_encoders,
                                                       ["a village in ghibli style"] * batch_size))
    lora_args = argparse.Namespace(**{**vars(args), "gradient_checkpointing": False})
    trainer.inject_lora(components, lora_args)
    unet.train()
    text_dim = unet.config.cross_attention_dim
    pooled_dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    batch = trainer.Batch(torch.zeros(batch_size, 4, latent, latent, device="meta"),
                          torch.zeros(batch_size, 77, text_dim, device="meta"),
                          torch.zeros(batch_size, pooled_dim, device="meta"), torch.zeros(batch_size, 6, device="meta"))
    timesteps = torch.full((batch_size,), 500, device="meta")

    def step():
        trainer.denoising_loss(unet, components.noise_scheduler, batch, torch.zeros_like(batch.latents),
                               timesteps).backward()

    flops["unet"] = count_flops(step)
    unet.enable_gradient_checkpointing()
    flops["unet_checkpointed"] = count_flops(step)
    return flops


def executed_flops(flops: dict[str, int], result: dict, cache: bool) -> int:
    unet = flops["unet_checkpointed"] if result["gradient_checkpointing"] else flops["unet"]
    return unet + (0 if cache else flops["vae"] + flops["text"])


# ----------------------------------------------------------------------------- the driver


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=MODELS, default="small",
                   help="tiny: the test model; small: SDXL topology at 1/4 width (CPU); sdxl: full size (GPU)")
    p.add_argument("--resolution", type=int, default=None, help="default: tiny 128, small 256, sdxl 1024")
    p.add_argument("--train_batch_size", type=int, default=1)
    p.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                   help="default: bf16 on a GPU that has it, else fp16; no (fp32) on CPU")
    p.add_argument("--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="setting of the naive/ours step comparison (default: the trainer's auto choice, off "
                        "on a CPU; on a GPU, on when the step would not fit); the 'gc' variant measures the other")
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant (default by model)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default by model)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default: 2 on CPU, 1 on GPU)")
    p.add_argument("--variants", default=None,
                   help="comma-separated subset of: naive, ours, gc, channels_last, encoders_on_device, "
                        "adamw8bit, compile, bf16, fp16, fp32 (default: all that apply here)")
    p.add_argument("--torch_compile", action="store_true", help="also measure torch.compile of the UNet")
    p.add_argument("--num_images", type=int, default=8, help="synthetic training images")
    p.add_argument("--num_threads", type=int, default=None,
                   help="CPU threads per process (default: 1 on CPU, where a busy shared machine makes "
                        "multi-threaded timings erratic; torch's default with a GPU)")
    p.add_argument("--buckets", action="store_true", help="aspect buckets (default: square crops, one shape)")
    p.add_argument("--paired", action=argparse.BooleanOptionalAction, default=True,
                   help="also time naive and ours alternating step by step in one process (default on): "
                        "the speed ratio that background load cannot skew")
    p.add_argument("--flops_only", action="store_true",
                   help="only count the FLOPs of a step (on the meta device: instant, any model, no GPU)")
    p.add_argument("--whole_run", choices=["on", "off", "only"], default="on",
                   help="also time whole training runs (naive, previous, default) through the CLI; 'only' skips "
                        "the per-step variants")
    p.add_argument("--whole_run_steps", type=int, default=24, help="optimizer steps of each whole run")
    p.add_argument("--output_json", default=None, help="also write the results here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.resolution is not None and args.resolution % 64:
        p.error(f"--resolution {args.resolution} must be a multiple of 64")
    return args


DEFAULT_STEPS = {"tiny": (None, 2), "small": (None, 1), "sdxl": (20, 5)}  # (timed, warm-up); None: one epoch


def resolve_settings(args: argparse.Namespace, cuda: bool) -> dict:
    steps, warmup = DEFAULT_STEPS[args.model]
    if args.mixed_precision is None:
        args.mixed_precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "no"
    return {
        "model": args.model, "resolution": args.resolution or DEFAULT_RESOLUTION[args.model],
        "train_batch_size": args.train_batch_size, "mixed_precision": args.mixed_precision,
        "gradient_checkpointing": (args.gradient_checkpointing if args.gradient_checkpointing is not None
                                   else "auto" if cuda else False),
        "steps": args.steps or steps or -(-args.num_images // args.train_batch_size),
        "warmup": args.warmup if args.warmup is not None else warmup + (3 if args.torch_compile else 0),
        "buckets": args.buckets, "repeats": args.repeats or (1 if cuda else 2),
        "num_threads": args.num_threads or (torch.get_num_threads() if cuda else 1),
    }


def run_in_subprocess(config: dict, variant: Variant | None) -> dict:
    """One variant (or, with None, the paired naive/ours run) in a fresh Python process."""
    payload = json.dumps({"config": config, "variant": asdict(variant) if variant else None})
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", payload]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": str(config["num_threads"])}
    completed = subprocess.run(command, capture_output=True, text=True, env=env)
    for line in completed.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    name = variant.key if variant else "paired"
    logger.error("benchmark run '%s' failed (exit %d):\n%s", name, completed.returncode, completed.stderr[-3000:])
    lines = [line for line in completed.stderr.splitlines() if line.strip()]
    return {"failed": lines[-1] if lines else f"exit status {completed.returncode}"}


def worker(payload: dict) -> dict:
    from utils.bench.steps import run_paired, run_variant

    config = payload["config"]
    torch.set_num_threads(config["num_threads"])
    logging.basicConfig(level=logging.WARNING)
    if payload["variant"] is None:
        return run_paired(config)
    return run_variant(config, Variant(**payload["variant"]))


def summarise(results: list[dict]) -> dict:
    """Across rounds: the fastest round (background load only ever slows a round down) and the spread."""
    rates = [1.0 / statistics.median(r["step_seconds"]) for r in results]
    best = results[rates.index(max(rates))]
    return {
        "steps_per_second": max(rates), "all_rates": rates, "setup_seconds": min(r["setup_seconds"] for r in results),
        "wall_seconds": min(r["setup_seconds"] + r["warmup_seconds"] + sum(r["step_seconds"]) for r in results),
        "train_peak_bytes": max(r["train_peak_bytes"] for r in results),
        "process_peak_bytes": max(r["process_peak_bytes"] for r in results),
        "gradient_checkpointing": best["gradient_checkpointing"], "mixed_precision": best["mixed_precision"],
        "final_loss": best["losses"][-1],
    }


def save_model(model: str, folder: Path, device: torch.device) -> Path:
    """The random-weight pipeline as a diffusers folder, so every variant loads it the trainer's way.

    The full-size model is built on the GPU (seconds instead of minutes on a CPU) and saved as the
    fp16 variant, the way SDXL ships.
    """
    from utils.bench.models import build_pipeline

    if model == "sdxl":
        build_pipeline(model, device, weight_dtype=torch.float16).save_pretrained(folder, variant="fp16")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    else:
        build_pipeline(model).save_pretrained(folder)
    return folder


WHOLE_RUNS = {
    "naive": ("the original's loop (--no-cache, checkpointing on, no eval)",
              ["--no-cache", "--gradient_checkpointing", "--eval_loss_epochs", "0"]),
    "previous": ("before issue 15 (cache, checkpointing on, eval every epoch x 32)",
                 ["--gradient_checkpointing", "--eval_loss_epochs", "1", "--eval_loss_samples", "32"]),
    "default": ("default (no flags)", []),
}


def whole_run(config: dict, key: str, steps: int) -> dict:
    """One training through train_sdxl_lora.py in a fresh process: wall time from launch to exit, and the
    trainer's own logs/timings.json (first and last optimizer step)."""
    from utils.training.speed import read_timings

    output_dir = Path(config["output_dir"]) / f"whole_{key}"
    command = [sys.executable, str(Path(__file__).resolve().parent.parent / "train_sdxl_lora.py"),
               "--pretrained_model_name_or_path", config["model_dir"], "--dataset_dir", config["dataset_dir"],
               "--output_dir", str(output_dir), "--resolution", str(config["resolution"]),
               "--train_batch_size", str(config["train_batch_size"]), "--max_train_steps", str(steps),
               "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--report_to", "none",
               "--mixed_precision", config["mixed_precision"], *([] if config["buckets"] else ["--no_buckets"]),
               *WHOLE_RUNS[key][1]]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": str(config["num_threads"])}
    launched = time.time()
    completed = subprocess.run(command, capture_output=True, text=True, env=env)
    ended = time.time()
    if completed.returncode != 0:
        lines = [line for line in completed.stderr.splitlines() if line.strip()]
        return {"failed": lines[-1] if lines else f"exit status {completed.returncode}"}
    (timings_path,) = output_dir.glob("*/logs/timings.json")
    timings = read_timings(timings_path)
    return {"wall_s": ended - launched, "time_to_first_step_s": timings["first_step"] - launched,
            "first_to_last_steps_per_s": timings["first_to_last_steps_per_s"],
            "steady_steps_per_s": timings["steady_steps_per_s"], "steps": timings["steps"],
            "setup_phases_s": timings["setup_phases_s"]}


def report_whole_runs(results: dict[str, dict], steps: int) -> dict:
    from utils.bench.report import format_table

    print()
    print(f"Whole runs through train_sdxl_lora.py, {steps} optimizer steps each, launch to exit:")
    rows = []
    for key, result in results.items():
        if "failed" in result:
            print(f"  {key}: failed: {result['failed']}")
            continue
        rows.append([WHOLE_RUNS[key][0], f"{result['time_to_first_step_s']:.1f}",
                     f"{result['first_to_last_steps_per_s']:.3f}", f"{result['steady_steps_per_s']:.3f}",
                     f"{result['wall_s']:.1f}"])
    print(format_table(["run", "to first step s", "first-to-last steps/s", "steady steps/s", "wall s"], rows))
    naive, default = results.get("naive", {}), results.get("default", {})
    if "failed" in naive or "failed" in default or not naive or not default:
        return {}
    ratios = {"whole_steady_speed": default["steady_steps_per_s"] / naive["steady_steps_per_s"],
              "whole_first_to_last_speed": default["first_to_last_steps_per_s"] / naive["first_to_last_steps_per_s"],
              "whole_wall_time": default["wall_s"] / naive["wall_s"],
              "whole_time_to_first_step": default["time_to_first_step_s"] / naive["time_to_first_step_s"]}
    print(f"default / naive: steady-state {ratios['whole_steady_speed']:.2f}x steps/s, first-to-last step "
          f"{ratios['whole_first_to_last_speed']:.2f}x steps/s, wall time {ratios['whole_wall_time']:.2f}x "
          f"({default['wall_s']:.1f} s vs {naive['wall_s']:.1f} s), time to first step "
          f"{ratios['whole_time_to_first_step']:.2f}x")
    return ratios


def print_flops(settings: dict) -> None:
    from train_sdxl_lora import parse_args as trainer_parse_args
    from utils.bench.report import flops_text

    flops = step_flops(settings["model"], settings["resolution"], settings["train_batch_size"],
                       trainer_parse_args([]))
    print(f"model '{settings['model']}': {describe_model(settings['model'])}")
    print(f"one training step at {settings['resolution']}x{settings['resolution']}, batch "
          f"{settings['train_batch_size']} (torch.utils.flop_counter on the meta device):")
    print(f"  UNet+LoRA forward+backward {flops_text(flops['unet'])}; with gradient checkpointing "
          f"{flops_text(flops['unet_checkpointed'])}")
    print(f"  the naive loop adds: VAE encode {flops_text(flops['vae'])}, text encoders {flops_text(flops['text'])}")


def describe_model(model: str) -> str:
    from utils.bench.models import build_pipeline, count_parameters

    pipe = build_pipeline(model, "meta")
    sizes = [count_parameters(m) / 1e6 for m in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2)]
    kind = {"tiny": "the tests' tiny SDXL", "small": "SDXL topology at 1/4 width, same depth",
            "sdxl": "SDXL base 1.0 architecture, full size"}[model]
    return (f"{kind}; random weights; parameters: UNet {sizes[0]:.1f} M, VAE {sizes[1]:.1f} M, "
            f"text encoders {sizes[2]:.1f} M + {sizes[3]:.1f} M")


def report(settings: dict, chosen: list[Variant], skipped: dict[str, str | None], summary: dict[str, dict],
           flops: dict[str, int], peak, num_images: int, paired: dict | None) -> dict:
    """Print the results; return the ratios of ours to naive."""
    from utils.bench.report import flops_text, format_table, mib, rate_text

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} thread(s) per process)"
    batch = settings["train_batch_size"]
    print(f"SDXL LoRA training benchmark -- model '{settings['model']}': {describe_model(settings['model'])}")
    print(f"device {device}; {settings['resolution']}x{settings['resolution']}, batch {batch}, mixed precision "
          f"{settings['mixed_precision']}, gradient checkpointing "
          f"{ {True: 'on', False: 'off'}.get(settings['gradient_checkpointing'], 'auto') }"
          f", {num_images} synthetic images, {'aspect buckets' if settings['buckets'] else 'square crops'}")
    print(f"timing: {settings['steps']} optimizer steps after {settings['warmup']} warm-up, median step; each "
          f"variant in a fresh process; {settings['repeats']} interleaved round(s), fastest round shown")
    print(f"FLOPs per step (torch.utils.flop_counter): UNet+LoRA forward+backward {flops_text(flops['unet'])} "
          f"(model FLOPs); with checkpointing {flops_text(flops['unet_checkpointed'])}; naive loop adds VAE "
          f"encode {flops_text(flops['vae'])} + text encoders {flops_text(flops['text'])}")
    print(f"peak: {peak.tflops:.4g} TFLOP/s ({peak.source}); MFU = model FLOPs x steps/s / peak")
    print()
    rows = []
    for variant in chosen:
        result = summary[variant.key]
        rate = result["steps_per_second"]
        executed = executed_flops(flops, result, variant.cache)
        rows.append([variant.label, rate_text(rate), rate_text(rate * batch), f"{1000 / rate:.0f}",
                     f"{result['setup_seconds']:.1f}", f"{result['wall_seconds']:.1f}",
                     mib(result["train_peak_bytes"]), mib(result["process_peak_bytes"]),
                     f"{executed * rate / 1e12:.3g}", f"{100 * flops['unet'] * rate / 1e12 / peak.tflops:.1f}%",
                     " ".join(rate_text(r) for r in result["all_rates"])])
    memory = "GPU MiB" if cuda else "RSS MiB"
    print(format_table(["variant", "steps/s", "images/s", "ms/step", "setup s", "wall s", f"train peak {memory}",
                        f"process peak {memory}", "TFLOP/s", "MFU", "steps/s per round"], rows))
    for key, reason in skipped.items():
        if reason:
            print(f"skipped {key}: {reason}")
    ratios = {}
    if "naive" in summary and "ours" in summary:
        naive, ours = summary["naive"], summary["ours"]
        ratios = {"speed": ours["steps_per_second"] / naive["steps_per_second"],
                  "wall": naive["wall_seconds"] / ours["wall_seconds"],
                  "train_peak": ours["train_peak_bytes"] / naive["train_peak_bytes"],
                  "process_peak": ours["process_peak_bytes"] / naive["process_peak_bytes"]}
        print()
        print("Caching benchmark (--cache vs --no-cache) = 'ours' vs 'naive' above: same model, data and settings.")
        print(f"ours / naive, separate processes: {ratios['speed']:.2f}x steps/s and images/s; peak memory "
              f"{ratios['train_peak']:.2f}x (training), {ratios['process_peak']:.2f}x (whole process); wall time "
              f"of the whole run (set-up with model loading and caching, then all steps): naive "
              f"{naive['wall_seconds']:.1f} s, ours {ours['wall_seconds']:.1f} s")
        if paired:
            ratios["paired_speed"] = paired["median_ratio"]
            spread = sorted(paired["pair_ratios"])
            print(f"ours / naive, alternating steps in one process: {paired['median_ratio']:.2f}x steps/s "
                  f"(median of {len(spread)} step pairs, range {spread[0]:.2f}-{spread[-1]:.2f}; naive "
                  f"{1000 * statistics.median(paired['step_seconds']['naive']):.0f} ms, ours "
                  f"{1000 * statistics.median(paired['step_seconds']['ours']):.0f} ms per step)")
        saved = 1 / naive["steps_per_second"] - 1 / ours["steps_per_second"]
        caching = ours["setup_seconds"] - naive["setup_seconds"]
        if saved > 0 and caching > 0:
            print(f"caching {num_images} images cost about {caching:.1f} s of set-up and saves {saved:.2f} s per "
                  f"step: it pays for itself after about {caching / saved:.0f} steps")
    return {"ratios": ratios}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(RESULT_MARK + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from utils.bench.flops import device_peak
    from utils.make_tiny_sdxl import make_synthetic_dataset
    from utils.core.sdxl import DTYPES

    cuda = torch.cuda.is_available()
    settings = resolve_settings(args, cuda)
    variants = all_variants(settings["gradient_checkpointing"], args.mixed_precision)
    wanted = args.variants.split(",") if args.variants else list(variants)
    unknown = [key for key in wanted if key not in variants]
    if unknown:
        print(f"error: --variants: unknown {', '.join(unknown)} (choose from {', '.join(variants)})", file=sys.stderr)
        return 2
    skipped = {key: skip_reason(variants[key], cuda, args.torch_compile) for key in wanted}
    chosen = [variants[key] for key in wanted if not skipped[key]]

    if args.flops_only:
        print_flops(settings)
        return 0
    if args.model == "sdxl" and not cuda:
        logger.warning("full-size SDXL on a CPU needs about 16 GB of memory per process and minutes per step; "
                       "--model small or --flops_only suit a CPU")
    device = torch.device("cuda" if cuda else "cpu")
    torch.set_num_threads(settings["num_threads"])
    peak = device_peak(device, DTYPES[args.mixed_precision] if cuda else torch.float32)
    with tempfile.TemporaryDirectory(prefix="benchmark_train_") as scratch:
        config = {**settings, "dataset_dir": str(make_synthetic_dataset(Path(scratch) / "data", args.num_images)),
                  "model_dir": str(save_model(settings["model"], Path(scratch) / "model", device)),
                  "output_dir": str(Path(scratch) / "runs")}
        whole = {}
        if args.whole_run != "off":
            for key in WHOLE_RUNS:
                logger.info("whole run: %s", WHOLE_RUNS[key][0])
                whole[key] = whole_run(config, key, args.whole_run_steps)
        if args.whole_run == "only":
            whole_ratios = report_whole_runs(whole, args.whole_run_steps)
            if args.output_json:
                Path(args.output_json).write_text(json.dumps({"settings": settings, "whole_runs": whole,
                                                              "ratios": whole_ratios}, indent=2))
            return 0
        flops = step_flops(settings["model"], settings["resolution"], settings["train_batch_size"],
                           trainer_args(config, variants["ours"]))
        rounds: dict[str, list[dict]] = {v.key: [] for v in chosen}
        for round_index in range(settings["repeats"]):
            for variant in chosen:
                if any("failed" in r for r in rounds[variant.key]):
                    continue  # e.g. out of memory: it will not fit in the next round either
                logger.info("round %d/%d: %s", round_index + 1, settings["repeats"], variant.label)
                rounds[variant.key].append(run_in_subprocess(config, variant))
        paired = None
        if args.paired and "naive" in rounds and "ours" in rounds:
            logger.info("paired run: naive and ours steps alternating in one process")
            paired = run_in_subprocess(config, None)
            paired = None if "failed" in paired else paired
    failed = {key: results[-1]["failed"] for key, results in rounds.items() if "failed" in results[-1]}
    summary = {key: summarise(results) for key, results in rounds.items() if key not in failed}
    chosen = [variant for variant in chosen if variant.key not in failed]
    skipped.update({key: f"failed: {reason}" for key, reason in failed.items()})
    ratios = report(settings, chosen, skipped, summary, flops, peak, args.num_images, paired)
    if whole:
        ratios["ratios"].update(report_whole_runs(whole, args.whole_run_steps))
        ratios["whole_runs"] = whole
    if args.output_json:
        Path(args.output_json).write_text(json.dumps({"settings": settings, "peak": asdict(peak), "flops": flops,
                                                      "results": summary, "rounds": rounds, "paired": paired,
                                                      **ratios}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
