"""Style options: caption shuffling with kept tokens and a prefix, and the timestep distributions
(bias strategies, logit-normal), alone and in one tiny training with min-SNR and v-prediction."""

from __future__ import annotations

import itertools
import logging
import math
from argparse import Namespace

import pytest
import torch

from utils.training.flags import parse_training_args
from utils.training.loss import sample_timesteps, timestep_weights
from utils.training.model_inputs import caption_text

NUM_TIMESTEPS = 1000
DRAWS = 10_000
# Chi-square over 10 bins of 100 timesteps (9 degrees of freedom): 27.88 is the 0.1% critical value.
CHI_SQUARE_LIMIT = 27.88


def style(**flags) -> Namespace:
    return parse_training_args([f"--{k}={v}" if v is not True else f"--{k}" for k, v in flags.items()])


def test_keep_tokens_fixes_the_first_token_and_every_order_of_the_rest_appears():
    settings = style(shuffle_caption=True, keep_tokens=1)
    generator = torch.Generator().manual_seed(0)
    draws = [caption_text("ghibli, a, b, c", settings, generator) for _ in range(200)]
    assert all(draw.startswith("ghibli, ") for draw in draws)
    orders = {tuple(draw.split(", ")[1:]) for draw in draws}
    assert orders == set(itertools.permutations(["a", "b", "c"]))


def test_prefix_stays_in_front_and_captions_are_unchanged_without_shuffling():
    assert caption_text("a,b ,c", style()) == "a,b ,c"
    assert caption_text("a, b", style(caption_prefix="sks style")) == "sks style a, b"
    settings = style(shuffle_caption=True, caption_prefix="sks", caption_separator="|")
    generator = torch.Generator().manual_seed(1)
    draws = {caption_text("x | y", settings, generator) for _ in range(50)}
    assert draws == {"sks x, y", "sks y, x"}  # kohya joins the shuffled tokens with ", "


def bin_counts(timesteps: torch.Tensor) -> torch.Tensor:
    return torch.bincount(timesteps // 100, minlength=10).double()


@pytest.mark.parametrize("flags, favoured", [
    (dict(timestep_bias_strategy="earlier", timestep_bias_multiplier=3.0, timestep_bias_portion=0.3), range(0, 300)),
    (dict(timestep_bias_strategy="later", timestep_bias_multiplier=2.0, timestep_bias_portion=0.25),
     range(750, 1000)),
    (dict(timestep_bias_strategy="range", timestep_bias_multiplier=4.0, timestep_bias_begin=200,
          timestep_bias_end=500), range(200, 500)),
    (dict(timestep_bias_strategy="none"), range(0)),
])
def test_biased_timesteps_match_the_intended_weights(flags, favoured):
    settings = style(**flags)
    multiplier = settings.timestep_bias_multiplier if favoured else 1.0
    # The intended weights, written out: favoured timesteps weigh `multiplier`, the others 1.
    intended = torch.tensor([multiplier if t in favoured else 1.0 for t in range(NUM_TIMESTEPS)], dtype=torch.float64)
    intended /= intended.sum()
    weights = timestep_weights(settings.timestep_bias_strategy, settings.timestep_bias_multiplier,
                               settings.timestep_bias_begin, settings.timestep_bias_end,
                               settings.timestep_bias_portion, NUM_TIMESTEPS)
    torch.testing.assert_close(weights, intended)
    torch.manual_seed(0)
    drawn = sample_timesteps(settings, NUM_TIMESTEPS, DRAWS, torch.device("cpu"))
    assert drawn.dtype == torch.long and 0 <= drawn.min() and drawn.max() < NUM_TIMESTEPS
    expected = intended.reshape(10, 100).sum(1) * DRAWS
    chi_square = float(((bin_counts(drawn) - expected) ** 2 / expected).sum())
    assert chi_square < CHI_SQUARE_LIMIT


def test_uniform_sampling_draws_what_the_trainer_always_drew():
    torch.manual_seed(3)
    expected = torch.randint(0, NUM_TIMESTEPS, (8,)).long()
    torch.manual_seed(3)
    assert torch.equal(sample_timesteps(style(), NUM_TIMESTEPS, 8, torch.device("cpu")), expected)


@pytest.mark.parametrize("mean, std", [(0.0, 1.0), (-0.5, 0.8), (0.7, 1.2)])
def test_logit_normal_has_the_given_mean_and_std_on_the_logit_scale(mean, std):
    settings = style(timestep_sampling="logit_normal", logit_mean=mean, logit_std=std)
    torch.manual_seed(0)
    drawn = sample_timesteps(settings, NUM_TIMESTEPS, DRAWS, torch.device("cpu")).double()
    fraction = (drawn + 0.5) / NUM_TIMESTEPS  # the middle of each timestep's share of [0, 1]
    logits = torch.log(fraction / (1 - fraction))
    # Standard error of the mean is std / 100; the timestep rounding adds a little more.
    assert float(logits.mean()) == pytest.approx(mean, abs=0.05)
    assert float(logits.std()) == pytest.approx(std, rel=0.05)


def test_bad_timestep_options_are_one_line_errors():
    from utils.training.checks import StyleOptionError, check_style_args

    for flags, words in [
        (dict(timestep_bias_strategy="later", timestep_sampling="logit_normal"), "does not go with"),
        (dict(timestep_bias_strategy="range", timestep_bias_begin=600, timestep_bias_end=500), "begin < end"),
        (dict(timestep_bias_multiplier=0), "positive"),
        (dict(keep_tokens=-1), "--keep_tokens"),
    ]:
        with pytest.raises(StyleOptionError, match=words):
            check_style_args(style(**flags))


@pytest.fixture(scope="module")
def shuffled_run(tiny_model_dir, tiny_dataset_dir, tmp_path_factory):
    """2 steps at 32 px with shuffled captions, caption dropout, a prefix, later-biased timesteps, min-SNR
    and v-prediction, trained in this process (the run object is what the assertions read)."""
    from utils.training.recipe import training_examples
    from utils.training.checks import check_args
    from utils.training.epochs import finish
    from utils.training.stop import StopRequest
    from utils.training.recipe import set_up, train_loop
    from utils.training.run import open_run

    output = tmp_path_factory.mktemp("style_run")
    args = parse_training_args([
        "--pretrained_model_name_or_path", str(tiny_model_dir), "--dataset_dir", str(tiny_dataset_dir),
        "--output_dir", str(output), "--resolution", "32", "--max_train_steps", "2", "--train_batch_size", "2",
        "--report_to", "none", "--mixed_precision", "no", "--lr_warmup_steps", "0", "--eval_loss_epochs", "0",
        "--shuffle_caption", "--keep_tokens", "1", "--caption_prefix", "sks", "--caption_dropout", "0.3",
        "--timestep_bias_strategy", "later", "--timestep_bias_multiplier", "3", "--snr_gamma", "5",
        "--prediction_type", "v_prediction"])
    check_args(args)
    examples, dataset_type = training_examples(args)
    settings = open_run(args, dataset_type)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    caching_logger = logging.getLogger("utils.training.caching")
    caching_logger.addHandler(handler)
    level = caching_logger.level
    caching_logger.setLevel(logging.INFO)
    try:
        run = set_up(settings, examples)
        with StopRequest() as stop:
            train_loop(run, stop)
        finish(run)
    finally:
        caching_logger.removeHandler(handler)
        caching_logger.setLevel(level)
    return run, [r.getMessage() for r in records]


@pytest.mark.slow
def test_shuffled_captions_train_with_text_cache_off_and_latents_cached(shuffled_run):
    import json

    run, messages = shuffled_run
    assert run.batch_maker.latent_cache is not None and run.batch_maker.text_cache is None
    assert sum("Text embeddings are not cached" in m for m in messages) == 1
    config = json.loads((run.settings.run_dir / "experiment_config.json").read_text())
    assert config["text_embedding_cache"] is False and config["shuffle_caption"] is True
    assert config["timestep_bias_strategy"] == "later" and config["keep_tokens"] == 1
    losses = [float(line.split(",")[2]) for line in
              (run.settings.run_dir / "logs" / "training_steps.csv").read_text().splitlines()[1:]]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
