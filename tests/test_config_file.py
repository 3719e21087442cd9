"""--config_file (TOML, every training flag by name, the command line wins), --output_config and the
run folder's run_config.toml; bad keys and values are one-line errors naming the file and the key."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, csv_rows, only_run_dir, run_bash
from utils.training.config_file import RUN_CONFIG_FILE, ConfigFileError
from utils.training.flags import parse_training_args

# The flags of the tiny run, and the same run as a config file (tables only group the keys).
TINY = ["--resolution", "32", "--max_train_steps", "2", "--train_batch_size", "2", "--report_to", "none",
        "--mixed_precision", "no", "--lr_warmup_steps", "0", "--eval_loss_epochs", "0", "--lora_rank", "4",
        "--lora_alpha", "8", "--random_flip", "--learning_rate", "1e-3", "--save_steps", "100",
        "--validation_prompt", "a village", "a cat", "--num_validation_images", "1", "--validation_steps", "2"]
TINY_TOML = """
resolution = 32
max_train_steps = 2
train_batch_size = 2
report_to = "none"
mixed_precision = "no"
lr_warmup_steps = 0
eval_loss_epochs = 0
save_steps = 100
[lora]
lora_rank = 4
lora_alpha = 8
[data]
random_flip = true
[optimisation]
learning_rate = 1e-3
[validation]
validation_prompt = ["a village", "a cat"]
num_validation_images = 1
validation_steps = 2
"""
DIFFERENT_PER_RUN = {"experiment_name", "timestamp", "command", "config_file", "output_dir"}


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def train_in_process(argv: list[str]) -> Path:
    from utils.training.recipe import train
    return train(parse_training_args(argv))


@pytest.fixture(scope="module")
def two_runs(tiny_model_dir, tiny_dataset_dir, tmp_path_factory):
    """The tiny run from flags, and from a config file holding the same flags."""
    work = tmp_path_factory.mktemp("config_runs")
    model = ["--pretrained_model_name_or_path", str(tiny_model_dir), "--dataset_dir", str(tiny_dataset_dir)]
    from_flags = train_in_process([*model, "--output_dir", str(work / "flags"), *TINY])
    config = write(work / "run.toml", TINY_TOML)
    from_file = train_in_process([*model, "--output_dir", str(work / "file"), "--config_file", str(config)])
    return from_flags, from_file


@pytest.mark.slow
def test_a_config_file_trains_the_same_run_as_the_same_flags(two_runs):
    configs = [json.loads((run / "experiment_config.json").read_text()) for run in two_runs]
    assert configs[0]["lora_rank"] == 4 and configs[1]["validation_prompt"] == ["a village", "a cat"]
    assert {k: v for k, v in configs[0].items() if k not in DIFFERENT_PER_RUN} == \
        {k: v for k, v in configs[1].items() if k not in DIFFERENT_PER_RUN}
    losses = [[row["loss"] for row in csv_rows(run / "logs" / "training_steps.csv")] for run in two_runs]
    assert len(losses[0]) == 2 and losses[0] == losses[1]  # same seed, same flags: the same losses


@pytest.mark.slow
def test_run_config_toml_reads_back_to_the_run_flags(two_runs):
    run = two_runs[0]
    recorded = parse_training_args(["--config_file", str(run / RUN_CONFIG_FILE)])
    config = json.loads((run / "experiment_config.json").read_text())
    for key, value in vars(recorded).items():
        if key not in {"config_file", "output_config"}:
            assert config[key] == value, key


def test_the_command_line_wins_over_the_file(tmp_path):
    config = write(tmp_path / "run.toml", TINY_TOML)
    args = parse_training_args(["--config_file", str(config), "--lora_rank", "16", "--validation_prompt", "x"])
    assert (args.lora_rank, args.lora_alpha, args.validation_prompt) == (16, 8.0, ["x"])
    assert args.random_flip is True and args.resolution == 32 and args.learning_rate == 1e-3
    assert parse_training_args([]).lora_rank == 8  # no file: the defaults


@pytest.mark.parametrize("text, words", [
    ("lora_rnk = 4", "key 'lora_rnk': not a training flag"),
    ("lora_rank = 'four'", "key 'lora_rank': expected a whole number"),
    ("random_flip = 1", "key 'random_flip': expected true or false"),
    ("optimizer = 'sgd'", "key 'optimizer': 'sgd' is not one of"),
    ("lora_target_modules = 'to_q'", "key 'lora_target_modules': expected a list"),
    ("lora_rank = ", "not valid TOML"),
])
def test_bad_keys_and_values_name_the_file_and_key(tmp_path, text, words):
    config = write(tmp_path / "bad.toml", text + "\n")
    with pytest.raises(ConfigFileError, match=words) as error:
        parse_training_args(["--config_file", str(config)])
    assert str(error.value).startswith(f"{config}: ")


def test_a_bad_key_is_one_line_from_the_script(tmp_path):
    config = write(tmp_path / "bad.toml", "lora_rnk = 4\n")
    result = subprocess.run([sys.executable, "train_sdxl_lora.py", "--config_file", str(config)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {config}: key 'lora_rnk': not a training flag "
                                                  "(see --help for the names)"]


def test_output_config_writes_the_effective_flags_and_trains_nothing(tmp_path):
    config = write(tmp_path / "run.toml", TINY_TOML)
    out = tmp_path / "effective.toml"
    result = subprocess.run([sys.executable, "train_sdxl_lora.py", "--config_file", str(config), "--lora_rank", "2",
                             "--output_dir", str(tmp_path / "runs"), "--output_config", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "runs").exists()
    effective = parse_training_args(["--config_file", str(out)])
    expected = parse_training_args(["--config_file", str(config), "--lora_rank", "2",
                                    "--output_dir", str(tmp_path / "runs")])
    assert {k: v for k, v in vars(effective).items() if k != "config_file"} == \
        {k: v for k, v in vars(expected).items() if k not in {"config_file", "output_config"}} | {"output_config": None}


@pytest.mark.slow
def test_the_sweep_passes_a_config_file_to_each_run(tiny_model_dir, tiny_dataset_dir, tmp_path):
    config = write(tmp_path / "run.toml", TINY_TOML + f'\n[model]\npretrained_model_name_or_path = "{tiny_model_dir}"\n'
                   f'dataset_dir = "{tiny_dataset_dir}"\n')
    result = run_bash("run_experiments.sh", "--ranks", "2", "--alphas", "4", "--", "--config_file", str(config),
                      cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    run = only_run_dir(tmp_path / "output_ghibli")
    config_json = json.loads((run / "experiment_config.json").read_text())
    # The sweep's own flags win over the file; the rest comes from it.
    assert (config_json["lora_rank"], config_json["lora_alpha"], config_json["resolution"]) == (2, 4.0, 32)


@pytest.mark.parametrize("recipe", sorted((ROOT / "docs" / "recipes").glob("*.toml")), ids=lambda p: p.name)
def test_the_documented_recipes_parse_and_are_the_ones_in_the_guides(recipe):
    result = subprocess.run([sys.executable, "train_sdxl_lora.py", "--config_file", str(recipe), "--output_config"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    effective = {line.split(" = ", 1)[0] for line in result.stdout.splitlines() if " = " in line}
    assert {"shuffle_caption", "timestep_bias_strategy", "lora_rank", "resolution"} <= effective
    for guide in ("docs/style-options.md", "docs/ko/style-options.md"):
        assert recipe.read_text() in (ROOT / guide).read_text()
