"""Packed runs: several adapters on one frozen tiny SDXL, each sample routed to its own adapter by PEFT's
layers, each run stepped, clipped and guarded on its own; compared with the same runs trained alone on the
same batches, noise and timesteps. The runs are set up and stepped by the trainer itself (``set_up_pack``,
``train_step``), a run alone being a pack of one."""

from __future__ import annotations

import pytest
import torch

from utils.core.sdxl import encode_tokens, load_components, tokenize
from utils.training.adapters import add_adapters, adapter_name
from utils.training.flags import parse_training_args
from utils.training.pack import (Routing, auto_pack_size, check_pack, choose_pack_size, pack_key, routes,
                                 unpackable_reason)

# Measured on a CPU in fp32 (test_a_pack_trains_as_its_runs_alone, relative L2 distances, the tiny model at
# 64², batch 2, lr 1e-2): packed and separate per-step losses agree to 6e-8 .. 3e-7 and the adapters to
# 2e-6 .. 2e-5 after 6 AdamW steps (the frozen layers' sums over a larger batch in another order, amplified by
# Adam's division by the gradient's root mean square); the bounds leave a margin of five to ten.
LOSS_TOLERANCE = 2e-6
ADAPTER_TOLERANCE = 1e-4
STEPS = 6
RUNS = [(4, 2.0), (4, 8.0), (2, 4.0)]  # two of the same rank: shapes alone cannot tell their adapters apart


def run_flags(rank: int, alpha: float, *extra: str):
    return parse_training_args(["--lora_rank", str(rank), "--lora_alpha", str(alpha), "--learning_rate", "1e-2",
                                "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--report_to", "none",
                                *extra])


@pytest.fixture(scope="module")
def pack_data(tmp_path_factory):
    from utils.tiny.sdxl import make_synthetic_dataset
    return make_synthetic_dataset(tmp_path_factory.mktemp("pack_data") / "data", num_images=4)


def set_up_runs(model_dir, data_dir, output_dir, runs, *extra: str) -> list:
    """``runs`` ((rank, alpha, *that run's own flags)) set up by the trainer as one pack; one: a run alone."""
    from utils.training.recipe import set_up_pack, training_examples
    from utils.training.run import open_run

    args = [run_flags(rank, alpha, "--pretrained_model_name_or_path", str(model_dir), "--dataset_dir", str(data_dir),
                      "--output_dir", str(output_dir), "--resolution", "64", "--train_batch_size", "2",
                      "--mixed_precision", "no", "--max_train_steps", str(STEPS), *extra, *own)
            for rank, alpha, *own in runs]
    examples, dataset_type = training_examples(args[0])
    return set_up_pack([open_run(run, dataset_type) for run in args], examples)


def loader_batches(pack):
    while True:
        yield from pack[0].dataloader


def train(pack, on_start=None):
    """STEPS of the trainer's steps for ``pack``; returns (pack, losses per step, skipped per step).
    ``on_start(pack)`` runs before the first step."""
    from utils.training.recipe import train_step

    if on_start:
        on_start(pack)
    for model in pack[0].models:
        model.train()
    batches, losses, skipped = loader_batches(pack), [], []
    for _ in range(STEPS):
        step_losses, step_skipped = train_step(pack, next(batches))
        losses.append(step_losses)
        skipped.append(step_skipped)
    return pack, torch.stack(losses), torch.stack(skipped)


def frozen(model_dir):
    return load_components(str(model_dir))


def flat(params) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in params])


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.slow
def test_a_pack_trains_as_its_runs_alone(tiny_model_dir, pack_data, tmp_path):
    packed, packed_losses, packed_skipped = train(set_up_runs(tiny_model_dir, pack_data, tmp_path, RUNS))
    assert not packed_skipped.any()
    for i, run in enumerate(RUNS):
        (alone,), alone_losses, _ = train(set_up_runs(tiny_model_dir, pack_data, tmp_path, [run]))
        assert relative(packed_losses[:, i], alone_losses[:, 0]) < LOSS_TOLERANCE
        assert relative(flat(packed[i].adapter.params), flat(alone.adapter.params)) < ADAPTER_TOLERANCE
    # each run trained its own adapter: the two of rank 4 ended apart, and every run moved from its start
    assert relative(flat(packed[0].adapter.params), flat(packed[1].adapter.params)) > 0.01
    assert packed_losses[-1].ne(packed_losses[-1][0]).any()
    # gradient checkpointing's recompute in the backward routes as the forward did
    checkpointed, checkpointed_losses, _ = train(set_up_runs(tiny_model_dir, pack_data, tmp_path, RUNS,
                                                             "--gradient_checkpointing"))
    assert relative(checkpointed_losses, packed_losses) < LOSS_TOLERANCE
    for a, b in zip(checkpointed, packed):
        assert relative(flat(a.adapter.params), flat(b.adapter.params)) < ADAPTER_TOLERANCE


def record_norms(norms: list):
    """An on_start that appends each run's gradient norm as its optimizer steps (after the clipping)."""
    def on_start(pack):
        for run, own in zip(pack, norms):
            run.adapter.optimizer.optimizer.register_step_pre_hook(
                lambda *_, run=run, own=own: own.append(flat(p.grad for p in run.adapter.params).norm()))
    return on_start


@pytest.mark.slow
def test_each_run_clips_its_own_gradient_norm(tiny_model_dir, pack_data, tmp_path):
    clipped, unclipped, alone = [], [], []
    runs = [(4, 8.0, "--max_grad_norm", "1e-4"), (2, 4.0, "--max_grad_norm", "1e9")]
    train(set_up_runs(tiny_model_dir, pack_data, tmp_path, runs), on_start=record_norms([clipped, unclipped]))
    train(set_up_runs(tiny_model_dir, pack_data, tmp_path, runs[1:]), on_start=record_norms([alone]))
    clipped, unclipped = torch.stack(clipped), torch.stack(unclipped)
    assert torch.allclose(clipped, torch.full_like(clipped, 1e-4), rtol=1e-3)  # clipped to its own bound ...
    assert (unclipped > 1e-3).all()  # ... while the other's kept the norm it has alone, not the pack's
    assert relative(unclipped, torch.stack(alone)) < ADAPTER_TOLERANCE


@pytest.mark.slow
def test_a_nonfinite_run_skips_only_its_own_step(tiny_model_dir, pack_data, tmp_path):
    start = {}

    def poison(pack):
        with torch.no_grad():
            pack[0].adapter.params[0].view(-1)[0] = float("nan")  # a lora_A entry: run 0's output is NaN
        start.update(enumerate(flat(run.adapter.params).clone() for run in pack))

    packed, losses, skipped = train(set_up_runs(tiny_model_dir, pack_data, tmp_path, [(4, 8.0), (2, 4.0)]),
                                    on_start=poison)
    assert skipped[:, 0].all() and not skipped[:, 1].any()
    assert losses[:, 0].isnan().all() and losses[:, 1].isfinite().all()
    assert torch.equal(flat(packed[0].adapter.params).nan_to_num(7.0), start[0].nan_to_num(7.0))  # never updated
    (alone,), alone_losses, _ = train(set_up_runs(tiny_model_dir, pack_data, tmp_path, [(2, 4.0)]))
    assert relative(losses[:, 1], alone_losses[:, 0]) < LOSS_TOLERANCE
    assert relative(flat(packed[1].adapter.params), flat(alone.adapter.params)) < ADAPTER_TOLERANCE


def test_text_encoder_lora_routes_in_the_layers(tiny_model_dir):
    runs = [run_flags(4, 8.0, "--train_text_encoder"), run_flags(2, 4.0, "--train_text_encoder")]
    assert "--train_text_encoder" in unpackable_reason(runs[0])  # the trainer encodes captions before routing
    prompts = ["a village in ghibli style", "a cat on a roof"]

    def text_loss(components, ids, copies):
        embeds, pooled = encode_tokens(components.text_encoders, [torch.cat([i] * copies) for i in ids])
        return embeds.pow(2).mean(dim=(1, 2)) + pooled.pow(2).mean(dim=1)

    components = frozen(tiny_model_dir)
    params = add_adapters(components, runs)
    for p in params[0] + params[1]:  # lora_B starts at zero; move it so that every gradient counts
        torch.nn.init.normal_(p, std=0.1)
    routing = Routing([components.unet, *components.text_encoders])
    ids = tokenize(components.tokenizers, prompts)
    with routing.route(routes(len(prompts), [adapter_name(0), adapter_name(1)])):
        text_loss(components, ids, 2).sum().backward()
    for i, args in enumerate(runs):
        alone = frozen(tiny_model_dir)
        (own,) = add_adapters(alone, [args])
        with torch.no_grad():
            for p, q in zip(own, params[i]):
                p.copy_(q)
        text_loss(alone, ids, 1).sum().backward()
        assert relative(grads(params[i]), grads(own)) < LOSS_TOLERANCE * 10


def grads(params) -> torch.Tensor:
    """The gradients, zero where none came (text encoder 1's last layer: SDXL reads the one before it)."""
    return flat(torch.zeros_like(p) if p.grad is None else p.grad for p in params)


@pytest.mark.parametrize("flags, error", [(["--use_dora"], ValueError), (["--lora_type", "loha"], TypeError),
                                          (["--lora_type", "lokr"], TypeError)], ids=["dora", "loha", "lokr"])
def test_adapters_peft_cannot_route_do_not_pack(tiny_model_dir, pack_data, tmp_path, flags, error):
    from utils.core.errors import TrainingError

    assert unpackable_reason(run_flags(4, 8.0, *flags))
    with pytest.raises(TrainingError, match="cannot train r4 a8 in a pack"):
        check_pack([run_flags(4, 8.0, *flags), run_flags(2, 4.0, *flags)])
    pack = set_up_runs(tiny_model_dir, pack_data, tmp_path, [(4, 8.0), (2, 4.0)], *flags)
    with pytest.raises(error, match="adapter_names"):  # PEFT itself refuses: the reason above stays true
        train(pack)


def test_runs_pack_when_only_rank_and_alpha_differ():
    assert pack_key(run_flags(4, 8.0)) == pack_key(run_flags(16, 32.0))
    assert pack_key(run_flags(4, 8.0)) != pack_key(run_flags(4, 8.0, "--resolution", "256"))


def test_pack_auto_fits_the_memory_and_the_grid(tiny_model_dir):
    args = run_flags(4, 8.0, "--resolution", "128", "--pretrained_model_name_or_path", str(tiny_model_dir))
    size, why = auto_pack_size(args, 12, torch.device("cpu"))
    assert 2 <= size <= 12, why
    assert auto_pack_size(args, 3, torch.device("cpu"))[0] == 3  # the whole grid, and never more
    gib = 1024 ** 3
    assert choose_pack_size(4, 100 * gib, gib)[0] == 4  # never more than the grid
    assert choose_pack_size(12, gib + int(3.5 * 1.3 * gib), gib)[0] == 3  # 1 GiB fixed, then x1.3 per run
    assert choose_pack_size(12, gib // 2, gib) == (1, choose_pack_size(12, gib // 2, gib)[1])
    assert "train alone" in choose_pack_size(12, gib // 2, gib)[1]


def test_the_sweep_benchmark_times_separate_and_packed_runs(tiny_model_dir, pack_data, tmp_path):
    from utils.bench.pack_runs import report, summarise, worker

    settings = {"model": "tiny", "resolution": 64, "train_batch_size": 1, "mixed_precision": "no",
                "gradient_checkpointing": False, "steps": 2, "warmup": 0, "num_threads": 1,
                "model_dir": str(tiny_model_dir), "dataset_dir": str(pack_data), "output_dir": str(tmp_path)}
    runs = [(2, 4.0), (4, 2.0)]
    separate = [{**worker({**settings, "runs": [run]}), "wall_seconds": 1.0} for run in runs]
    packed = {**worker({**settings, "runs": runs}), "wall_seconds": 1.5}
    summary = summarise(separate, packed)
    assert packed["runs"] == 2 and len(packed["step_seconds"]) == 2
    assert summary["wall_ratio"] == 0.75 and summary["packed_run_steps_per_second"] > 0
    assert summary["packed_peak_bytes"] > 0
    assert "packed / separate: sweep wall time 0.75x" in report({**settings, "runs": runs}, summary)


def trained_pack(model_dir, data_dir, output_dir, runs):
    return train(set_up_runs(model_dir, data_dir, output_dir, runs))[0]


@pytest.mark.slow
def test_a_packed_run_saves_the_lora_file_a_run_alone_saves(tiny_model_dir, pack_data, tmp_path):
    """The same tensors and adapter config as the run alone with the same weights; the file loads into a fresh
    pipeline through diffusers and predicts what the pack predicts for that run (one name routing the batch)."""
    from tests.helpers import assert_same_lora, load_pipe
    from utils.lora.files import save_lora
    from utils.training.loss import predict

    runs = [(4, 8.0), (2, 4.0)]
    pack = trained_pack(tiny_model_dir, pack_data, tmp_path, runs)
    unet = pack[0].accelerator.unwrap_model(pack[0].models[0])
    batch = pack[0].batch_maker(next(loader_batches(pack)))
    noise, timesteps = torch.randn_like(batch.latents), torch.tensor([300, 700])
    for run, rank_alpha in zip(pack, runs):
        saved = save_lora(tmp_path / f"packed_{run.adapter.name}", unet, adapter_name=run.adapter.name)
        (alone,) = set_up_runs(tiny_model_dir, pack_data, tmp_path, [rank_alpha])
        with torch.no_grad():
            for p, q in zip(alone.adapter.params, run.adapter.params):
                p.copy_(q)
        alone_unet = alone.accelerator.unwrap_model(alone.models[0])
        assert_same_lora(saved, save_lora(tmp_path / f"alone_{run.adapter.name}", alone_unet), rtol=0, atol=0)
        pipe = load_pipe(tiny_model_dir)
        pipe.load_lora_weights(str(saved.parent))
        with torch.no_grad(), run.routing.route(run.adapter.name):
            packed_prediction = predict(unet, run.components.noise_scheduler, batch, noise, timesteps)[0]
        with torch.no_grad():
            loaded_prediction = predict(pipe.unet, run.components.noise_scheduler, batch, noise, timesteps)[0]
        assert relative(packed_prediction, loaded_prediction) < LOSS_TOLERANCE


@pytest.mark.slow
def test_a_packed_runs_resumable_state_is_a_lone_runs(tiny_model_dir, pack_data, tmp_path):
    """Its checkpoint files are those a run alone writes, and load into a run alone through accelerate's
    load_state with the trainer's hooks, and back into a fresh pack, bit for bit."""
    from utils.training.pack import load_run_state, save_run_state

    runs = [(4, 8.0), (2, 4.0)]
    pack = trained_pack(tiny_model_dir, pack_data, tmp_path, runs)
    run = pack[1]
    folder = tmp_path / "state"
    folder.mkdir()
    save_run_state(run.accelerator, folder, run.models, run.adapter, [run.dataloader])
    (lone,) = set_up_runs(tiny_model_dir, pack_data, tmp_path, runs[1:])
    lone.accelerator.load_state(str(folder))
    assert torch.equal(flat(lone.adapter.params), flat(run.adapter.params))
    state, own = (r.adapter.optimizer.state_dict()["state"][0]["exp_avg"] for r in (lone, run))
    assert torch.equal(state, own)
    assert lone.adapter.lr_scheduler.state_dict()["last_epoch"] == run.adapter.lr_scheduler.state_dict()["last_epoch"]
    lone.accelerator.save_state(str(tmp_path / "lone"))
    assert sorted(p.name for p in (tmp_path / "lone").iterdir()) == sorted(p.name for p in folder.iterdir())

    again = set_up_runs(tiny_model_dir, pack_data, tmp_path, runs)
    load_run_state(again[1].accelerator, folder, again[1].models, again[1].adapter, [again[1].dataloader])
    assert torch.equal(flat(again[1].adapter.params), flat(run.adapter.params))
    assert not torch.equal(flat(again[0].adapter.params), flat(pack[0].adapter.params))  # only its own run loaded


# ----------------------------------------------------------------------------- the trainer: a pack of real runs

PACK_FLAGS = ["--resolution", "64", "--train_batch_size", "2", "--num_train_epochs", "8", "--save_steps", "4",
              "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--report_to", "none", "--mixed_precision",
              "no", "--no-gradient_checkpointing", "--checkpointing_steps", "2", "--learning_rate", "1e-3"]
GRID = [("2", "4"), ("4", "8")]


def folder_listing(run_dir) -> set[str]:
    return {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def packed_and_alone(tiny_model_dir, tmp_path_factory):
    """The grid trained as one pack through utils/train_pack.py, and each run alone through train_sdxl_lora.py."""
    from tests.helpers import run_in_process
    from utils.tiny.sdxl import make_synthetic_dataset

    base = tmp_path_factory.mktemp("pack")
    data = make_synthetic_dataset(base / "data", num_images=4)
    common = ["--pretrained_model_name_or_path", str(tiny_model_dir), "--dataset_dir", str(data), *PACK_FLAGS]
    run_in_process("utils/train_pack.py", *[x for rank, alpha in GRID for x in ("--pack_run", rank, alpha)], "--",
                   *common, "--output_dir", str(base / "packed"))
    for rank, alpha in GRID:
        run_in_process("train_sdxl_lora.py", *common, "--output_dir", str(base / "alone"), "--lora_rank", rank,
                       "--lora_alpha", alpha)
    folders = {"data": data}
    for way in ("packed", "alone"):
        for run_dir in (base / way).iterdir():
            if run_dir.is_dir() and not run_dir.name.startswith("."):
                folders[way, run_dir.name.split("_r", 1)[1]] = run_dir
    return folders


@pytest.mark.slow
def test_a_packed_run_writes_what_it_writes_alone(packed_and_alone):
    import json

    from tests.helpers import csv_rows
    from utils.core.layout import CONFIG_FILE, LORA_WEIGHT_NAME, RunLayout
    from utils.lora.files import read_tensors

    for rank, alpha in GRID:
        name = f"{rank}_a{float(alpha)}_lr0.001"
        packed, alone = packed_and_alone["packed", name], packed_and_alone["alone", name]
        assert folder_listing(packed) == folder_listing(alone)
        packed_config, alone_config = (json.loads((folder / CONFIG_FILE).read_text()) for folder in (packed, alone))
        assert packed_config.keys() == alone_config.keys()
        for log in (RunLayout(packed).epoch_log, RunLayout(packed).step_log):
            packed_rows, alone_rows = csv_rows(log), csv_rows(RunLayout(alone).root / log.relative_to(packed))
            assert packed_rows[0].keys() == alone_rows[0].keys() and len(packed_rows) == len(alone_rows)
            losses = torch.tensor([[float(a["loss"]), float(b["loss"])] for a, b in zip(packed_rows, alone_rows)])
            assert relative(losses[:, 0], losses[:, 1]) < LOSS_TOLERANCE * 10
        packed_lora, alone_lora = (read_tensors(RunLayout(folder).final_model / LORA_WEIGHT_NAME)
                                   for folder in (packed, alone))
        assert packed_lora.keys() == alone_lora.keys()
        assert relative(flat(packed_lora.values()), flat(alone_lora[key] for key in packed_lora)) < ADAPTER_TOLERANCE


@pytest.mark.slow
def test_a_stopped_pack_resumes_each_run_from_its_own_checkpoint(tiny_model_dir, packed_and_alone, tmp_path):
    """SIGTERM after the first checkpoint: every run saves its own; the same command resumes them together and
    ends where an uninterrupted pack ends; one run's folder also goes on alone with train_sdxl_lora.py."""
    import os
    import signal
    import subprocess
    import sys

    from tests.helpers import ROOT, run_in_process, wait_for
    from utils.core.layout import LORA_WEIGHT_NAME, RunLayout
    from utils.lora.files import read_tensors

    flags = ["--pretrained_model_name_or_path", str(tiny_model_dir), "--dataset_dir", str(packed_and_alone["data"]),
             *PACK_FLAGS, "--resume_from_checkpoint", "latest"]
    grid = [x for rank, alpha in GRID for x in ("--pack_run", rank, alpha)]

    def pack_command(output: str) -> list[str]:
        return ["utils/train_pack.py", *grid, "--", *flags, "--output_dir", str(tmp_path / output)]

    def runs(output: str) -> list:
        return sorted(p for p in (tmp_path / output).iterdir() if p.is_dir() and not p.name.startswith("."))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, *pack_command("stopped")], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (tmp_path / "stopped").is_dir() and len(runs("stopped")) == 2
             and all(RunLayout(run).checkpoint(2).is_dir() for run in runs("stopped")), 300, "the first checkpoints",
             process)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=300) == 128 + signal.SIGTERM, process.stderr.read()[-2000:]
    stopped_at = [max(RunLayout.checkpoint_step(p) for p in RunLayout(run).checkpoints.iterdir())
                  for run in runs("stopped")]
    assert len(set(stopped_at)) == 1 and stopped_at[0] < 16  # both saved at the same step, before the end
    assert all(RunLayout(run).interrupted_model.is_dir() for run in runs("stopped"))

    run_in_process(*pack_command("stopped"))  # the same command: both resume, as a pack
    straight_runs = [packed_and_alone["packed", f"{rank}_a{float(alpha)}_lr0.001"] for rank, alpha in GRID]
    for stopped, straight in zip(runs("stopped"), straight_runs):
        resumed_lora = read_tensors(RunLayout(stopped).final_model / LORA_WEIGHT_NAME)
        straight_lora = read_tensors(RunLayout(straight).final_model / LORA_WEIGHT_NAME)
        assert relative(flat(resumed_lora.values()), flat(straight_lora[k] for k in resumed_lora)) < ADAPTER_TOLERANCE
    rank, alpha = GRID[1]
    checkpoint = RunLayout(runs("stopped")[1]).checkpoint(stopped_at[0])
    assert checkpoint.is_dir()
    # the stop's checkpoint of the second run (still there: no --checkpoints_total_limit) goes on alone
    run_in_process("train_sdxl_lora.py", *flags[:-2], "--output_dir", str(tmp_path / "stopped"), "--lora_rank", rank,
                   "--lora_alpha", alpha, "--resume_from_checkpoint", str(checkpoint))
    alone_lora = read_tensors(RunLayout(runs("stopped")[1]).final_model / LORA_WEIGHT_NAME)
    straight_lora = read_tensors(RunLayout(straight_runs[1]).final_model / LORA_WEIGHT_NAME)
    assert relative(flat(alone_lora.values()), flat(straight_lora[k] for k in alone_lora)) < ADAPTER_TOLERANCE


@pytest.mark.slow
def test_a_run_that_stops_leaves_the_others_training(tiny_model_dir, tmp_path):
    """A run whose loss is non-finite at every step (an alpha so large the adapter overflows) stops after
    --max_nonfinite_steps, as it stops alone; the other run of its pack trains to its final model."""
    from tests.helpers import run_in_process
    from utils.core.layout import RunLayout
    from utils.tiny.sdxl import make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path / "data", num_images=4)
    result = run_in_process("utils/train_pack.py", "--pack_run", "2", "4", "--pack_run", "2", "1e38", "--",
                            "--pretrained_model_name_or_path", str(tiny_model_dir), "--dataset_dir", str(data),
                            *PACK_FLAGS, "--max_nonfinite_steps", "2", "--output_dir", str(tmp_path / "out"),
                            check=False)
    assert result.returncode == 2 and "1 of the pack's 2 runs stopped, the others finished" in result.stderr
    folders = {p.name.split("_r", 1)[1].split("_lr")[0]: RunLayout(p) for p in (tmp_path / "out").iterdir()
               if p.is_dir() and not p.name.startswith(".")}
    assert folders["2_a4.0"].final_model.is_dir() and not folders["2_a1e+38"].final_model.is_dir()


def test_a_sweep_plans_its_packs_and_says_why_a_run_trains_alone(tiny_model_dir):
    from utils.core.errors import UserError
    from utils.training.pack import plan_packs

    model = ["--pretrained_model_name_or_path", str(tiny_model_dir), "--resolution", "64"]
    grid = [run_flags(rank, alpha, *model) for rank in (4, 8) for alpha in (4.0, 8.0)]
    assert plan_packs(grid, "1") == ([[0], [1], [2], [3]], [])
    assert plan_packs(grid, "4") == ([[0, 1, 2, 3]], [])
    assert plan_packs(grid, "3") == ([[0, 1, 2], [3]], [])
    packs, lines = plan_packs(grid, "auto")
    assert packs == [[0, 1, 2, 3]] and lines[0].startswith("--pack auto: auto: all 4 runs")  # tiny: the grid fits
    assert plan_packs(grid, "4", steps=[0, 0, 6, 6])[0] == [[0, 1], [2, 3]]  # resumes at other steps
    dora = grid[:2] + [run_flags(8, alpha, *model, "--use_dora") for alpha in (4.0, 8.0)]
    packs, lines = plan_packs(dora, "4")
    assert packs == [[0, 1], [2], [3]]
    assert lines[0] == "r8 a4 trains alone: --use_dora: PEFT refuses to route a batch between DoRA adapters"
    with pytest.raises(UserError, match="--pack 0: a number of runs"):
        plan_packs(grid, "0")


# ----------------------------------------------------------------------------- the sweep: run_experiments.sh --pack


@pytest.mark.slow
def test_a_packed_sweep_ends_as_the_same_sweep_run_by_run(tiny_model_dir, pack_data, tmp_path):
    """A 2 x 2 sweep with --pack 4: one training process; every run folder holds the files, config keys and log
    columns of the --pack 1 sweep's, the records and summary the same keys, and every final LoRA and per-step
    loss matches within the measured tolerance. A DoRA sweep with --pack trains each run alone and says why."""
    import json

    from tests.helpers import csv_rows, run_bash
    from utils.core.layout import CONFIG_FILE, LORA_WEIGHT_NAME, RunLayout
    from utils.lora.files import read_tensors

    trainer = ["--", "--pretrained_model_name_or_path", str(tiny_model_dir), "--dataset_dir", str(pack_data),
               "--resolution", "64", "--train_batch_size", "2", "--num_train_epochs", "2", "--save_steps", "1",
               "--lr_scheduler", "constant", "--report_to", "none", "--mixed_precision", "no"]
    sweeps = {}
    for pack in ("1", "4"):
        work = tmp_path / f"pack{pack}"
        work.mkdir()
        result = run_bash("run_experiments.sh", "--ranks", "2 4", "--alphas", "4 8", "--pack", pack, *trainer,
                          cwd=work)
        assert result.returncode == 0, result.stderr[-3000:]
        sweeps[pack] = (work, result.stderr)
    assert "pack of 4: r=2 a=4, r=2 a=8, r=4 a=4, r=4 a=8" in sweeps["4"][1]
    assert sweeps["1"][1].count("start r=") == sweeps["4"][1].count("start r=") == 4
    folders = {pack: {p.name.split("_r", 1)[1]: p for p in (work / "output_ghibli").iterdir()
                      if p.is_dir() and not p.name.startswith(".")} for pack, (work, _) in sweeps.items()}
    assert folders["1"].keys() == folders["4"].keys() and len(folders["4"]) == 4
    for name, alone in folders["1"].items():
        packed = folders["4"][name]
        assert folder_listing(packed) == folder_listing(alone)
        assert (json.loads((packed / CONFIG_FILE).read_text()).keys()
                == json.loads((alone / CONFIG_FILE).read_text()).keys())
        rows = [csv_rows(RunLayout(folder).step_log) for folder in (packed, alone)]
        assert rows[0][0].keys() == rows[1][0].keys()
        losses = torch.tensor([[float(a["loss"]), float(b["loss"])] for a, b in zip(*rows)])
        assert relative(losses[:, 0], losses[:, 1]) < LOSS_TOLERANCE * 10
        loras = [read_tensors(RunLayout(folder).final_model / LORA_WEIGHT_NAME) for folder in (packed, alone)]
        assert relative(flat(loras[0].values()), flat(loras[1][key] for key in loras[0])) < ADAPTER_TOLERANCE
    results = {pack: work / "experiment_results" for pack, (work, _) in sweeps.items()}
    assert folder_listing(results["4"]) == folder_listing(results["1"])
    for record in ("summary.json", "experiment_2_4.json"):
        assert json.loads((results["4"] / record).read_text()).keys() == json.loads((results["1"] / record)
                                                                                    .read_text()).keys()

    work = tmp_path / "dora"
    work.mkdir()
    result = run_bash("run_experiments.sh", "--ranks", "2", "--alphas", "4 8", "--pack", "2", *trainer,
                      "--use_dora", "--max_train_steps", "1", cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "r2 a4 trains alone: --use_dora: PEFT refuses to route a batch between DoRA adapters" in result.stderr
    assert "pack of" not in result.stderr
