"""The Python half of utils/gpu_check.sh: the plan of parts, the check's own parts, the summary.

    python utils/gpu_check.py plan --model sdxl --out OUT --work WORK    # name, cap, command per line
    python utils/gpu_check.py versions|setup|auto_checkpointing --out OUT --work WORK
    python utils/gpu_check.py train_run --mixed_precision bf16 --name train_bf16 --out OUT --work WORK
    python utils/gpu_check.py summary --out OUT                          # the table and gpu_check.json
    python utils/gpu_check.py missing --wheels utils/gpu_wheels.txt      # distributions not installed

The shell script runs each part in its own process under ``timeout``; a part writes
``OUT/parts/NAME.json`` (the step and inference benchmarks write theirs through --output_json).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import re
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils.bench.gpu_plan import PARTS, Places, make_plan
from utils.core.cli import Parser, run_cli
from utils.core.errors import UserError

logger = logging.getLogger("gpu_check")
ACTIONS = ("plan", "versions", "setup", "auto_checkpointing", "train_run", "summary", "missing")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python utils/gpu_check.py summary --out gpu_check_out")
    p.add_argument("action", choices=ACTIONS)
    p.add_argument("--model", choices=["sdxl", "tiny"], default="sdxl")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--out", default="gpu_check_out", help="results folder (default: %(default)s)")
    p.add_argument("--work", default=None, help="model and dataset folder (default: OUT/../gpu_check_work)")
    p.add_argument("--parts", default=None, help=f"plan: comma-separated subset of {', '.join(PARTS)}")
    p.add_argument("--mixed_precision", choices=["bf16", "fp16"], default="bf16", help="train_run")
    p.add_argument("--name", default=None, help="train_run: the part's name")
    p.add_argument("--wheels", default="utils/gpu_wheels.txt", help="missing: the wheel list (default: %(default)s)")
    p.add_argument("--wheel_dir", default=".gpu_wheels", help="missing: the downloaded wheels (default: %(default)s)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    places = Places(out, Path(args.work).resolve() if args.work else out.parent / "gpu_check_work")
    if args.action == "plan":
        parts = args.parts.split(",") if args.parts else None
        unknown = sorted(set(parts or ()) - set(PARTS))
        if unknown:
            raise UserError(f"--parts: unknown {', '.join(unknown)} (choose from {', '.join(PARTS)})")
        for part in make_plan(args.model, args.device, places, parts):
            print(part.line())
        return 0
    if args.action == "missing":
        print("\n".join(str(path) for path in missing_wheels(Path(args.wheels), Path(args.wheel_dir))))
        return 0
    if args.action == "summary":
        from utils.bench.gpu_summary import summarise
        print(summarise(out, args.model, args.device)["table"])
        return 0
    result = _run_part(args, places)
    path = places.part_json(args.name or args.action)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps({key: value for key, value in result.items() if key != "losses"}, indent=2, default=str))
    return 0 if result["status"] == "ok" or result["status"].startswith("skipped") else 1


def _run_part(args: argparse.Namespace, places: Places) -> dict:
    from utils.bench import gpu_parts

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.action == "versions":
        return gpu_parts.versions(args.device)
    if args.action == "setup":
        return gpu_parts.setup(args.model, places, args.device)
    if args.action == "auto_checkpointing":
        return gpu_parts.auto_checkpointing(args.model, places, args.device)
    return gpu_parts.train_run(args.model, places, args.mixed_precision, args.name or f"train_{args.mixed_precision}")


def missing_wheels(wheel_list: Path, wheel_dir: Path) -> list[Path]:
    """The wheel files for the distributions of the list (``name==version`` lines) not installed at any
    version (a missing one without a wheel in ``wheel_dir`` is logged)."""
    if not wheel_list.is_file():
        raise UserError(f"{wheel_list}: no such wheel list")
    wheels = {re.sub(r"[-_.]+", "_", path.name.split("-")[0]).lower(): path for path in wheel_dir.glob("*.whl")}
    found, absent = [], []
    for line in wheel_list.read_text().splitlines():
        name = line.split("#", 1)[0].split("==")[0].strip()
        if not name:
            continue
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            key = re.sub(r"[-_.]+", "_", name).lower()
            (found.append(wheels[key]) if key in wheels else absent.append(name))
    if absent:
        logger.warning("%s: no wheel for %s, which is not installed either (utils/gpu_check.sh --download_wheels "
                       "fetches them where the package index is reachable)", wheel_dir, ", ".join(absent))
    return found

if __name__ == "__main__":
    sys.exit(run_cli(main))
