"""The GPU check's summary: every part's status and figures from ``parts/``, one table, ``gpu_check.json``.

For each part the shell script leaves ``NAME.status`` (exit code, seconds, cap; or why it was skipped),
``NAME.txt`` (its output) and, when the part got that far, ``NAME.json``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from utils.bench.gpu_plan import BENCHES, PARTS
from utils.bench.report import format_table

GIB = 1024 ** 3
LABELS = {"naive": "naive (--no-cache)", "ours": "default, checkpointing off", "gc": "default, checkpointing on",
          "adamw8bit": "default, 8-bit AdamW", "compile": "default, torch.compile"}
# Published figures to hold the results against, and the project's goals (SDXL, 1024x1024, batch 1, bf16).
ANCHORS = ["SimpleTuner, H100, 1024 b1 bf16: 0.606 s/step without checkpointing (13.0 GiB), 1.080 s/step with "
           "(6.5 GiB)", "kohya sd-scripts: RTX 4090 about 1.13-1.21 s/it, RTX 3090 about 1.23 s/it"]


def read_part(parts_dir: Path, name: str) -> dict:
    """One part's status, run time and figures."""
    status_path, json_path = parts_dir / f"{name}.status", parts_dir / f"{name}.json"
    if not status_path.is_file():
        return {"status": "not run"}
    run = json.loads(status_path.read_text())
    entry = {"seconds": run.get("seconds"), "cap_s": run.get("cap_s")}
    if "skipped" in run:
        return {**entry, "status": f"skipped: {run['skipped']}"}
    if run["rc"] in (124, 137):
        return {**entry, "status": f"timeout after {run['cap_s']} s"}
    if run["rc"] != 0:
        return {**entry, "status": f"failed (exit {run['rc']}): {_last_line(parts_dir / f'{name}.txt')}"}
    if not json_path.is_file():
        return {**entry, "status": "failed: no result written"}
    data = json.loads(json_path.read_text())
    status, figures = _figures(name, data)
    return {**entry, "status": status, "figures": figures}


def _last_line(path: Path) -> str:
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()] \
        if path.is_file() else []
    return lines[-1][:300] if lines else "no output"


def _figures(name: str, data: dict) -> tuple[str, dict]:
    if name in BENCHES or name in ("adamw8bit", "compile"):
        return _bench_status(data), {"steps": step_rows(data)}
    if name == "inference":
        seconds = {mode: min(values) for mode, values in data["seconds_per_image"].items()}
        status = "ok" if seconds and all(math.isfinite(v) for v in seconds.values()) else "failed: no timings"
        return status, {"seconds_per_image": seconds, "resolution": data["args"]["resolution"],
                        "steps": data["args"]["num_inference_steps"],
                        "fused_vs_unfused_max_pixel_diff": data["fused_vs_unfused_max_pixel_diff"]}
    return data.get("status", "ok"), {key: value for key, value in data.items() if key not in ("status", "losses")}


def _bench_status(data: dict) -> str:
    skipped = {key: reason for key, reason in data.get("skipped", {}).items() if reason}
    if data.get("results") and not any(r.startswith("failed") for r in skipped.values()):
        return "ok"
    if skipped:
        kind = "failed" if any(r.startswith("failed") for r in skipped.values()) else "skipped"
        return f"{kind}: " + "; ".join(f"{key}: {reason.removeprefix('failed: ')}" for key, reason in skipped.items())
    return "failed: no variant measured"


def step_rows(data: dict) -> list[dict]:
    """Per measured variant: s/step, peak memory, TFLOP/s executed and MFU (model FLOPs / peak)."""
    from utils.bench.flops import executed_flops

    if not data.get("results"):
        return []
    settings, peak, flops = data["settings"], data["peak"]["tflops"], data["flops"]
    rows = []
    for key, result in data["results"].items():
        rate = result["steps_per_second"]
        executed = executed_flops(flops, result, key != "naive")
        rows.append({"resolution": settings["resolution"], "batch": settings["train_batch_size"], "variant": key,
                     "checkpointing": result["gradient_checkpointing"], "s_per_step": 1 / rate,
                     "peak_gib": result["train_peak_bytes"] / GIB, "tflops": executed * rate / 1e12,
                     "mfu": flops["unet"] * rate / 1e12 / peak, "warmup_s": result["warmup_seconds"],
                     "warmup_steps": settings["warmup"], "mixed_precision": result["mixed_precision"]})
    return rows


def summarise(out: Path, model: str, device: str) -> dict:
    """Read every part, write ``gpu_check.json`` and ``gpu_check.txt``, return the summary."""
    parts = {name: read_part(out / "parts", name) for name in PARTS}
    _add_compile_time(parts)
    summary = {"model": model, "device": device, "parts": parts, "anchors": ANCHORS}
    summary["table"] = render(summary)
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=2))
    (out / "gpu_check.txt").write_text(summary["table"] + "\n")
    return summary


def _add_compile_time(parts: dict) -> None:
    """Compile time: the compiled run's warm-up minus as many of its own steady steps."""
    for row in parts["compile"].get("figures", {}).get("steps", []):
        row["compile_s"] = row["warmup_s"] - row["warmup_steps"] * row["s_per_step"]


def render(summary: dict) -> str:
    """The printed summary: one line per part, then the step, inference and checkpointing figures."""
    parts = summary["parts"]
    versions = parts["versions"].get("figures", {})
    lines = [f"GPU check -- model {summary['model']}, device {versions.get('gpu', summary['device'])}, "
             f"torch {versions.get('packages', {}).get('torch')}, diffusers {versions.get('packages', {}).get('diffusers')}"]
    rows = [[name, _seconds(entry.get("seconds")), entry["status"][:60], _headline(name, entry)]
            for name, entry in parts.items()]
    lines += ["", format_table(["part", "s", "status", "result"], rows, left=(0, 2, 3))]
    steps = [row for name in (*BENCHES, "adamw8bit", "compile")
             for row in parts[name].get("figures", {}).get("steps", [])]
    if steps:
        lines += ["", format_table(["training step", "res", "batch", "s/step", "peak GiB", "TFLOP/s", "MFU"],
                                   [[LABELS.get(r["variant"], r["variant"]), str(r["resolution"]), str(r["batch"]),
                                     f"{r['s_per_step']:.3f}", f"{r['peak_gib']:.2f}", f"{r['tflops']:.3g}",
                                     f"{100 * r['mfu']:.1f}%"] for r in steps])]
    auto = parts["auto_checkpointing"].get("figures", {}).get("configs", {})
    if auto:
        lines += ["", format_table(["auto checkpointing", "estimate GiB", "free GiB", "chose", "peak off GiB",
                                    "peak on GiB", "verdict"], [_auto_row(c) for c in auto.values()], left=(0, 3, 6))]
    if summary["model"] != "sdxl":
        lines += ["", f"(model {summary['model']}: the figures prove the paths run; they are not comparable "
                      "with the anchors and goals below)"]
    lines += ["", "published anchors: " + "; ".join(summary["anchors"])]
    lines += [f"goal: {goal}: {measured}" for goal, measured in goals(steps)]
    packs = parts["pack_full"].get("figures", {}).get("summaries", {})
    largest = packs[max(packs, key=int)] if packs else None
    lines.append("goal: a 12-run pack at full resolution with checkpointing >= 3x the run-steps/s of separate runs: "
                 + (f"{largest['throughput_ratio']:.2f}x with {largest['runs']} runs" if largest else "not measured"))
    return "\n".join(lines)


def goals(steps: list[dict]) -> list[tuple[str, str]]:
    """The goals (at the full resolution) and what this run measured for each."""
    def find(batch: int, variant: str) -> dict | None:
        full = max((r["resolution"] for r in steps), default=None)
        return next((r for r in steps if r["resolution"] == full and r["batch"] == batch and r["variant"] == variant),
                    None)

    off, on = find(1, "ours"), find(1, "gc")
    big = [r for r in steps if r["batch"] > 1 and r["variant"] in ("ours", "gc")]
    return [("<= 0.5 s/step, 1024 b1 bf16, checkpointing off (H100-class)",
             f"{off['s_per_step']:.3f} s/step" if off else "not measured"),
            (">= 45% MFU at batch 4", f"{100 * max(r['mfu'] for r in big):.1f}%" if big else "not measured"),
            ("peak <= 12 GB at b1 with AdamW and checkpointing",
             f"{on['peak_gib'] * GIB / 1e9:.2f} GB" if on else "not measured")]


def _seconds(value) -> str:
    return "" if value is None else f"{value:.0f}"


def _gib(value) -> str:
    return "-" if value is None else f"{value / GIB:.2f}"


def _auto_row(config: dict) -> list[str]:
    return [f"{config['resolution']} b{config['batch']}", _gib(config["estimated_activation_bytes"]),
            _gib(config["free_at_start_bytes"]), config["chose"], _gib(config["peak_off_bytes"]),
            _gib(config["peak_on_bytes"]), config["verdict"]]


def _headline(name: str, entry: dict) -> str:
    """A few words of the part's main figures."""
    figures = entry.get("figures", {})
    if not figures:
        return ""
    if "steps" in figures and isinstance(figures["steps"], list):
        text = ", ".join(f"{r['variant']} {r['s_per_step']:.3f} s/step" for r in figures["steps"])
        return text + "".join(f", compile time {r['compile_s']:.0f} s" for r in figures["steps"] if "compile_s" in r)
    if name == "inference":
        return ", ".join(f"{mode} {s:.2f} s/image" for mode, s in figures["seconds_per_image"].items())
    if name.startswith("train_"):
        return (f"loss {figures.get('first_loss', math.nan):.4f} -> {figures.get('last_loss', math.nan):.4f}, "
                f"{figures.get('steady_steps_per_s') or math.nan:.2f} steps/s, checkpointing "
                f"{figures.get('resolved_gradient_checkpointing')}, kohya tensors {figures.get('kohya_tensors')}")
    if name.startswith("pack_"):
        fresh = figures["settings"]["fresh_processes"]  # else the wall times leave out the imports
        return ", ".join(f"{size} runs {pack['throughput_ratio']:.2f}x run-steps/s"
                         + (f", {pack['wall_ratio']:.2f}x wall" if fresh else "")
                         for size, pack in figures["summaries"].items())
    if name == "setup":
        return f"model built and saved in {figures['model_build_and_save_s']:.0f} s ({figures['model_bytes'] / GIB:.1f} GiB)"
    if name == "versions":
        return f"python {figures['python']}, CUDA {figures['torch_cuda']}, bitsandbytes " \
               f"{figures['packages']['bitsandbytes'] or 'absent'}"
    if name == "auto_checkpointing":
        return ", ".join(f"{key}: {c['chose']}" for key, c in figures["configs"].items())
    return ""
