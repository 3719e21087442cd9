"""Training speed and memory: the naive loop against our default path, and each speed/memory lever.

Every variant trains the same model on the same synthetic images with the trainer's own code
(``BatchMaker``, ``denoising_loss``, ``inject_lora``, ``make_optimizer``, ``cache_latents``,
accelerate), each in a fresh process so peak memory is its own; rounds are interleaved
(naive, ours, ..., naive, ours, ...) so background load hits all variants alike.

  naive   the original's loop: VAE and both text encoders run on every step (--no-cache)
  ours    the default: latents and embeddings cached once, encoders off the accelerator,
          SDPA attention, fp32 LoRA parameters, frozen weights in the compute dtype
  levers  ours with one change each: gradient checkpointing toggled, channels-last UNet,
          encoders kept on the device, 8-bit AdamW, another precision, torch.compile

'naive' against 'ours' is also the caching benchmark (--cache against --no-cache).

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
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from utils.benchmark_models import DEFAULT_RESOLUTION, MODELS

logger = logging.getLogger("benchmark_train")

RESULT_MARK = "BENCHMARK_RESULT "
GIB = 1024 ** 3


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    cache: bool = True
    release_encoders: bool = True
    gradient_checkpointing: bool | None = None  # None: the run's setting
    mixed_precision: str | None = None  # None: the run's setting
    optimizer: str = "adamw"
    channels_last: bool = False
    compile: bool = False


def all_variants(gradient_checkpointing: bool, mixed_precision: str) -> dict[str, Variant]:
    other_gc = "on" if not gradient_checkpointing else "off"
    variants = [
        Variant("naive", "naive: encoders every step (--no-cache)", cache=False),
        Variant("ours", "ours: cached, encoders released (default)"),
        Variant("gc", f"ours, gradient checkpointing {other_gc}", gradient_checkpointing=not gradient_checkpointing),
        Variant("channels_last", "ours, channels-last UNet", channels_last=True),
        Variant("encoders_on_device", "ours, encoders kept on the device", release_encoders=False),
        Variant("adamw8bit", "ours, 8-bit AdamW", optimizer="adamw8bit"),
        Variant("compile", "ours, torch.compile(UNet)", compile=True),
    ]
    for precision in ("bf16", "fp16", "no"):
        if precision != mixed_precision:
            name = "fp32" if precision == "no" else precision
            variants.append(Variant(name, f"ours, {name} weights (LoRA fp32)", mixed_precision=precision))
    return {v.key: v for v in variants}


def skip_reason(variant: Variant, cuda: bool, torch_compile: bool) -> str | None:
    """Why a variant cannot be measured here, or None."""
    import importlib.util
    if variant.key in ("bf16", "fp16") and not cuda:
        return "mixed precision needs a CUDA device (the trainer falls back to fp32 on CPU)"
    if variant.key == "fp32" and not cuda:
        return "already the setting on CPU"
    if variant.key == "encoders_on_device" and not cuda:
        return "on CPU there is no device to release the encoders from"
    if variant.key == "adamw8bit":
        if importlib.util.find_spec("bitsandbytes") is None:
            return "bitsandbytes is not installed (pip install bitsandbytes)"
        if not cuda:
            return "bitsandbytes 8-bit optimizers need a CUDA device"
    if variant.key == "compile" and not torch_compile:
        return "pass --torch_compile to measure it"
    return None


# ----------------------------------------------------------------------------- one variant, in its own process


class MemoryMeter:
    """Peak memory of this process: CUDA allocations on a GPU, resident set size (RSS) on a CPU.

    The training peak is reset when training starts, so it excludes model construction and caching;
    the process peak includes everything.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.setup_peak = 0

    def start_training(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.setup_peak = torch.cuda.max_memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.setup_peak = _peak_rss()
            _reset_peak_rss()

    def peaks(self) -> tuple[int, int]:
        """(training peak, process peak) in bytes."""
        if self.device.type == "cuda":
            train = torch.cuda.max_memory_allocated(self.device)
        else:
            train = _peak_rss()
        return train, max(train, self.setup_peak)


def _peak_rss() -> int:
    """VmHWM (Linux), else the lifetime maximum from getrusage."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _reset_peak_rss() -> None:
    """Linux resets VmHWM to the current RSS on '5' written to clear_refs; elsewhere the peak stays lifetime."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        logger.warning("cannot reset the peak RSS here: the training peak includes set-up")


def trainer_args(config: dict, variant: Variant) -> argparse.Namespace:
    """The trainer's own flags and defaults, with the benchmark's settings."""
    from train_sdxl_lora import parse_args

    gradient_checkpointing = variant.gradient_checkpointing
    if gradient_checkpointing is None:
        gradient_checkpointing = config["gradient_checkpointing"]
    argv = ["--pretrained_model_name_or_path", config["model_dir"], "--dataset_dir", config["dataset_dir"],
            "--output_dir", config["output_dir"], "--resolution", str(config["resolution"]),
            "--train_batch_size", str(config["train_batch_size"]), "--max_train_steps", "1000000",
            "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--report_to", "none",
            "--optimizer", variant.optimizer, "--mixed_precision", variant.mixed_precision or config["mixed_precision"],
            "--gradient_checkpointing" if gradient_checkpointing else "--no-gradient_checkpointing"]
    argv += [] if variant.cache else ["--no-cache"]
    argv += [] if config["buckets"] else ["--no_buckets"]
    return parse_args(argv)


def run_variant(config: dict, variant: Variant) -> dict:
    """Set up with the trainer's ``prepare_run``, then time warm-up + N of its optimizer steps."""
    from utils import trainer
    from utils.ghibli_datasets import load_examples

    args = trainer_args(config, variant)
    trainer.check_args(args)
    started = time.perf_counter()
    run = trainer.prepare_run(args, load_examples(args.dataset_type, args.dataset_dir))
    device = run.accelerator.device
    if variant.channels_last:
        run.unet.to(memory_format=torch.channels_last)
    if not variant.release_encoders:
        for module in [run.components.vae, *run.components.text_encoders]:
            module.to(device)
    if variant.compile:
        run.models[0] = torch.compile(run.models[0])
    _synchronize(device)
    setup_seconds = time.perf_counter() - started

    memory = MemoryMeter(device)
    memory.start_training()
    for model in run.models:
        model.train()
    batches = _forever(run.dataloader)
    step_seconds, losses = [], []
    for _ in range(config["warmup"] + config["steps"]):
        _synchronize(device)
        start = time.perf_counter()
        loss = trainer.train_micro_step(run, next(batches))
        losses.append(run.accelerator.gather(loss[None]).mean().item())  # as the training loop logs it
        step_seconds.append(time.perf_counter() - start)
    train_peak, process_peak = memory.peaks()
    return {
        "variant": variant.key, "step_seconds": step_seconds[config["warmup"]:],
        "warmup_seconds": sum(step_seconds[:config["warmup"]]), "setup_seconds": setup_seconds,
        "train_peak_bytes": train_peak, "process_peak_bytes": process_peak, "losses": losses,
        "mixed_precision": run.accelerator.mixed_precision, "gradient_checkpointing": args.gradient_checkpointing,
        "weight_dtype": str(run.unet.dtype),
    }


def _forever(dataloader):
    while True:
        yield from dataloader


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- FLOPs, on the meta device


def step_flops(model: str, resolution: int, batch_size: int, args: argparse.Namespace) -> dict[str, int]:
    """FLOPs of one training step's parts, counted on the meta device (no memory, no time).

    unet: UNet + LoRA forward and backward (the model FLOPs of MFU); unet_checkpointed: the same with
    gradient checkpointing's recomputation; vae / text: the encoders' forward passes the naive loop adds.
    """
    from utils import trainer
    from utils.flops import count_flops
    from utils.sdxl import encode_prompts, vae_latent_distribution

    from diffusers import DDPMScheduler

    from utils.benchmark_models import build_pipeline
    from utils.sdxl import SDXLComponents

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
    p.add_argument("--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="setting of the naive/ours comparison (the trainer's default: on); the 'gc' "
                        "variant measures the other")
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
        "gradient_checkpointing": args.gradient_checkpointing,
        "steps": args.steps or steps or -(-args.num_images // args.train_batch_size),
        "warmup": args.warmup if args.warmup is not None else warmup + (3 if args.torch_compile else 0),
        "buckets": args.buckets, "repeats": args.repeats or (1 if cuda else 2),
        "num_threads": args.num_threads or (torch.get_num_threads() if cuda else 1),
    }


def run_in_subprocess(config: dict, variant: Variant) -> dict:
    payload = json.dumps({"config": config, "variant": asdict(variant)})
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", payload]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": str(config["num_threads"])}
    completed = subprocess.run(command, capture_output=True, text=True, env=env)
    for line in completed.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    raise RuntimeError(f"variant '{variant.key}' failed (exit {completed.returncode}):\n{completed.stderr[-4000:]}")


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
    from utils.benchmark_models import build_pipeline

    if model == "sdxl":
        build_pipeline(model, device, weight_dtype=torch.float16).save_pretrained(folder, variant="fp16")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    else:
        build_pipeline(model).save_pretrained(folder)
    return folder


def describe_model(model: str) -> str:
    from utils.benchmark_models import build_pipeline, count_parameters

    pipe = build_pipeline(model, "meta")
    sizes = [count_parameters(m) / 1e6 for m in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2)]
    kind = {"tiny": "the tests' tiny SDXL", "small": "SDXL topology at 1/4 width, same depth",
            "sdxl": "SDXL base 1.0 architecture, full size"}[model]
    return (f"{kind}; random weights; parameters: UNet {sizes[0]:.1f} M, VAE {sizes[1]:.1f} M, "
            f"text encoders {sizes[2]:.1f} M + {sizes[3]:.1f} M")


def report(settings: dict, chosen: list[Variant], skipped: dict[str, str | None], summary: dict[str, dict],
           flops: dict[str, int], peak, num_images: int) -> dict:
    """Print the results; return the ratios of ours to naive."""
    from utils.benchmark_report import flops_text, format_table, mib, rate_text

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} thread(s) per process)"
    batch = settings["train_batch_size"]
    print(f"SDXL LoRA training benchmark -- model '{settings['model']}': {describe_model(settings['model'])}")
    print(f"device {device}; {settings['resolution']}x{settings['resolution']}, batch {batch}, mixed precision "
          f"{settings['mixed_precision']}, gradient checkpointing {'on' if settings['gradient_checkpointing'] else 'off'}"
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
        print(f"ours / naive: {ratios['speed']:.2f}x steps/s and images/s; wall time incl. caching "
              f"{ratios['wall']:.2f}x faster; peak memory {ratios['train_peak']:.2f}x (training), "
              f"{ratios['process_peak']:.2f}x (whole process)")
        saved = 1 / naive["steps_per_second"] - 1 / ours["steps_per_second"]
        caching = ours["setup_seconds"] - naive["setup_seconds"]
        if saved > 0 and caching > 0:
            print(f"caching {num_images} images cost about {caching:.1f} s of set-up and saves {saved:.2f} s per "
                  f"step: it pays for itself after about {caching / saved:.0f} steps")
    return {"ratios": ratios}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        payload = json.loads(args.worker)
        torch.set_num_threads(payload["config"]["num_threads"])
        result = run_variant(payload["config"], Variant(**payload["variant"]))
        print(RESULT_MARK + json.dumps(result), flush=True)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from utils.flops import device_peak
    from utils.make_tiny_sdxl import make_synthetic_dataset
    from utils.sdxl import DTYPES

    cuda = torch.cuda.is_available()
    settings = resolve_settings(args, cuda)
    variants = all_variants(args.gradient_checkpointing, args.mixed_precision)
    wanted = args.variants.split(",") if args.variants else list(variants)
    unknown = [key for key in wanted if key not in variants]
    if unknown:
        print(f"error: --variants: unknown {', '.join(unknown)} (choose from {', '.join(variants)})", file=sys.stderr)
        return 2
    skipped = {key: skip_reason(variants[key], cuda, args.torch_compile) for key in wanted}
    chosen = [variants[key] for key in wanted if not skipped[key]]

    device = torch.device("cuda" if cuda else "cpu")
    torch.set_num_threads(settings["num_threads"])
    peak = device_peak(device, DTYPES[args.mixed_precision] if cuda else torch.float32)
    with tempfile.TemporaryDirectory(prefix="benchmark_train_") as scratch:
        config = {**settings, "dataset_dir": str(make_synthetic_dataset(Path(scratch) / "data", args.num_images)),
                  "model_dir": str(save_model(settings["model"], Path(scratch) / "model", device)),
                  "output_dir": str(Path(scratch) / "runs")}
        flops = step_flops(settings["model"], settings["resolution"], settings["train_batch_size"],
                           trainer_args(config, variants["ours"]))
        rounds: dict[str, list[dict]] = {v.key: [] for v in chosen}
        for round_index in range(settings["repeats"]):
            for variant in chosen:
                logger.info("round %d/%d: %s", round_index + 1, settings["repeats"], variant.label)
                rounds[variant.key].append(run_in_subprocess(config, variant))
    summary = {key: summarise(results) for key, results in rounds.items()}
    ratios = report(settings, chosen, skipped, summary, flops, peak, args.num_images)
    if args.output_json:
        Path(args.output_json).write_text(json.dumps({"settings": settings, "peak": asdict(peak), "flops": flops,
                                                      "results": summary, "rounds": rounds, **ratios}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
