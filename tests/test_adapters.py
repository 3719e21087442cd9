"""LoHa and LoKr beside LoRA, the EMA of the adapter weights, and LoRA+.

LoHa/LoKr: on the full-size SDXL layout the kohya/LyCORIS file, read with LyCORIS' published formulas, gives
PEFT's weight delta (tests/test_adapter_roundtrip.py trains every adapter type and reloads each file it writes)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT, SCRIPT_ENV, only_run_dir, run_in_process, wait_for
from tests.kohya_checks import lycoris_delta
from utils.lora.files import LORA_WEIGHT_NAME, read_tensors, save_safetensors
from utils.lora.kohya_names import SDXL_UNET_CONFIG, unet_kohya_names, unet_layers
from utils.training.checkpoints import checkpoints_of

TRAIN = ["--resolution", "32", "--train_batch_size", "2", "--max_train_steps", "2", "--learning_rate", "1e-2",
         "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--report_to", "none", "--mixed_precision", "no",
         "--no-gradient_checkpointing", "--save_steps", "100", "--checkpointing_steps", "2"]
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")


def train(tiny_model_dir, dataset_dir, output_dir, *extra) -> Path:
    run_in_process("train_sdxl_lora.py", "--pretrained_model_name_or_path", str(tiny_model_dir), "--dataset_dir",
                   str(dataset_dir), "--output_dir", str(output_dir), *TRAIN, *extra)
    return only_run_dir(output_dir)


# ----------------------------------------------------------------------------- the full-size SDXL layout


def peft_layers(kind: str, targets: dict[str, tuple]):
    """PEFT LoHa/LoKr layers with random factors on bare Linear/Conv2d layers of the given shapes."""
    from peft import LoHaConfig, LoKrConfig
    from peft.tuners.loha.layer import Conv2d as HaConv, Linear as HaLinear
    from peft.tuners.lokr.layer import Conv2d as KrConv, Linear as KrLinear

    config = (LoHaConfig(r=8, alpha=4, init_weights=False) if kind == "loha"
              else LoKrConfig(r=8, alpha=4, init_weights=False))
    for module, (_, down, up) in targets.items():
        if len(down) == 1:
            base = torch.nn.utils.skip_init(torch.nn.Linear, down[0], up[0], bias=False)
            layer = (HaLinear if kind == "loha" else KrLinear)(base, "default", config=config, r=8, alpha=4)
        else:
            base = torch.nn.utils.skip_init(torch.nn.Conv2d, down[0], up[0], down[1:], padding=1, bias=False)
            layer = (HaConv if kind == "loha" else KrConv)(base, "default", config=config, r=8, alpha=4)
        yield module, layer, config


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_kohya_file_on_full_sdxl_gives_the_peft_delta(kind, tmp_path):
    from utils.convert_lora import main as convert
    from utils.lora.lycoris_files import save_kohya_copy

    layers = unet_layers(SDXL_UNET_CONFIG)  # SDXL base 1.0's UNet config (test_kohya holds it to the public file)
    targets = {m: shapes for m, shapes in layers.items() if m.endswith(ATTENTION)}
    targets.update({m: layers[m] for m in ("down_blocks.1.resnets.0.conv1", "up_blocks.0.resnets.2.conv2")})
    assert len(targets) == 562
    tensors, peft, config = {}, {}, None
    for module, layer, config in peft_layers(kind, targets):
        for role in layer.adapter_layer_names:
            if "default" in getattr(layer, role):
                tensors[f"unet.{module}.{role}"] = getattr(layer, role)["default"].detach().clone()
        peft[module] = layer
    config = {**config.to_dict(), "target_modules": list(ATTENTION)}
    metadata = {"lora_adapter_metadata": json.dumps({f"unet.{k}": v for k, v in config.items()}, default=str)}
    folder = tmp_path / "model"
    folder.mkdir()
    save_safetensors(tensors, folder / LORA_WEIGHT_NAME, metadata)
    kohya_path = save_kohya_copy(folder, SDXL_UNET_CONFIG)

    kohya = read_tensors(kohya_path)
    names = {name: module for module, name in unet_kohya_names(SDXL_UNET_CONFIG).items()}
    grouped: dict[str, dict] = {}
    for key, tensor in kohya.items():
        name, _, role = key.partition(".")
        grouped.setdefault(name, {})[role] = tensor
    assert {names[name] for name in grouped} == set(peft)
    worst = 0.0
    with torch.no_grad():  # one module's deltas at a time: the full set would take about 4 GB
        for name, weights in grouped.items():
            expected = peft[names[name]].get_delta_weight("default")
            got = lycoris_delta(weights, expected.shape)
            assert not weights, f"{name}: keys left unread: {sorted(weights)}"
            worst = max(worst, float((got - expected).norm() / expected.norm()))
    assert worst <= 1e-5

    # Back to the project's file, then to kohya again: the same tensors both ways.
    convert([str(kohya_path), "--output", str(tmp_path / "back")])
    back = read_tensors(tmp_path / "back" / LORA_WEIGHT_NAME)
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    convert([str(tmp_path / "back" / LORA_WEIGHT_NAME), "--output", str(tmp_path / "again.safetensors")])
    again = read_tensors(tmp_path / "again.safetensors")
    assert again.keys() == kohya.keys() and all(torch.equal(again[k], kohya[k]) for k in kohya)


# ----------------------------------------------------------------------------- EMA and LoRA+


def unet_lora_names(tiny_model_dir) -> list[str]:
    """The trainable LoRA parameters of the tiny UNet in the trainer's order, as PEFT state-dict keys."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=list(ATTENTION), init_lora_weights="gaussian"))
    return [n.replace(".default", "") for n, p in unet.named_parameters() if p.requires_grad]


EMA_DECAY = 0.75
EMA_STEPS = 12
EMA_FLAGS = ["--max_train_steps", str(EMA_STEPS), "--checkpointing_steps", "1", "--train_batch_size", "1",
             "--use_ema", "--ema_decay", str(EMA_DECAY), "--lora_rank", "4", "--lora_alpha", "4"]
EMA_FILES = (f"checkpoints/checkpoint-{EMA_STEPS}/ema.safetensors", f"final_model/{LORA_WEIGHT_NAME}",
             "final_model/raw_lora_weights.safetensors")


@pytest.fixture(scope="module")
def ema_run(tiny_model_dir, tiny_dataset_dir, tmp_path_factory) -> Path:
    """A straight run with --use_ema and a resumable state (raw weights and EMA) after every step."""
    return train(tiny_model_dir, tiny_dataset_dir, tmp_path_factory.mktemp("ema_straight"), *EMA_FLAGS)


@pytest.mark.slow
def test_ema_follows_the_raw_weights(ema_run, tiny_model_dir):
    names = unet_lora_names(tiny_model_dir)
    checkpoint = [ema_run / "checkpoints" / f"checkpoint-{step}" for step in range(1, EMA_STEPS + 1)]
    raw = [read_tensors(c / "lora_unet.safetensors") for c in checkpoint]
    ema = [read_tensors(c / "ema.safetensors") for c in checkpoint]
    ema = [{name: e[f"{i:05d}"] for i, name in enumerate(names)} for e in ema]
    for name in names:
        if "lora_B" in name:  # PEFT starts B at zero, so the first average is (1 - decay) x the first step
            assert torch.equal(ema[0][name], raw[0][name] * (1 - EMA_DECAY))
        reference = ema[0][name]
        for step in range(1, EMA_STEPS):
            reference = reference * EMA_DECAY + raw[step][name] * (1 - EMA_DECAY)
            torch.testing.assert_close(ema[step][name], reference, rtol=0, atol=1e-7)
    final = ema_run / "final_model"
    info = json.loads((final / "final_model_info.json").read_text())
    assert (info["adapter_weights"], info["raw_weights_file"]) == ("ema", "raw_lora_weights.safetensors")
    model, kept = read_tensors(final / LORA_WEIGHT_NAME), read_tensors(final / info["raw_weights_file"])
    assert all(not torch.equal(model[f"unet.{n}"], kept[f"unet.{n}"]) for n in names)
    assert all(torch.equal(model[f"unet.{n}"], ema[-1][n]) for n in names)
    assert all(torch.equal(kept[f"unet.{n}"], raw[-1][n]) for n in names)


@pytest.mark.slow
def test_ema_run_stopped_by_sigterm_resumes_bit_equal(ema_run, tiny_model_dir, tiny_dataset_dir, tmp_path):
    output, log = tmp_path / "interrupted", tmp_path / "stderr.log"
    command = [sys.executable, str(ROOT / "train_sdxl_lora.py"), "--pretrained_model_name_or_path",
               str(tiny_model_dir), "--dataset_dir", str(tiny_dataset_dir), "--output_dir", str(output), *TRAIN,
               *EMA_FLAGS]
    with open(log, "w") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, env=SCRIPT_ENV)
    try:  # the progress bar appears once the stop handler is installed, before the first step
        wait_for(lambda: "Training:   0%" in log.read_text(), 300, "the training loop", process)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 128 + signal.SIGTERM, log.read_text()[-3000:]
    run_dir = only_run_dir(output)
    stopped_at = int(checkpoints_of(run_dir)[-1].name.split("-")[1])
    assert 1 <= stopped_at < EMA_STEPS and not (run_dir / "final_model").exists()

    train(tiny_model_dir, tiny_dataset_dir, output, *EMA_FLAGS, "--resume_from_checkpoint", "latest")
    for file in EMA_FILES:
        first, second = read_tensors(ema_run / file), read_tensors(run_dir / file)
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first), file


def test_loraplus_puts_the_up_matrices_at_ratio_times_the_rate():
    from peft import LoraConfig

    from utils.training.flags import parse_training_args
    from utils.training.checks import check_args
    from utils.training.optimizer import loraplus_groups, make_optimizer
    from utils.core.errors import TrainingError
    from utils.tiny.demo_model import DEMO_SDXL_DIR

    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    from peft import inject_adapter_in_model
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["0"]), model)
    params = [p for p in model.parameters() if p.requires_grad]
    args = parse_training_args(["--loraplus_lr_ratio", "16", "--learning_rate", "1e-4"])

    class Settings:  # the fields make_optimizer reads, as RunSettings gives them
        def __getattr__(self, name):
            return getattr(args, name)
    optimizer = make_optimizer(Settings(), loraplus_groups([model], params, Settings()))
    up = {id(p) for n, p in model.named_parameters() if "lora_B" in n}
    rates = sorted((g["lr"], all(id(p) in up for p in g["params"])) for g in optimizer.param_groups)
    assert rates == [(1e-4, False), (16e-4, True)]
    with pytest.raises(TrainingError, match="--loraplus_lr_ratio applies to --lora_type lora only"):
        check_args(parse_training_args(["--lora_type", "lokr", "--loraplus_lr_ratio", "16",
                                        "--pretrained_model_name_or_path", str(DEMO_SDXL_DIR)]))
