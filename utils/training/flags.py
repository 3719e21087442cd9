"""The flags of train_sdxl_lora.py, in one place for the script, the benchmarks and the tests."""

from __future__ import annotations

import argparse

from utils.core.cli import Parser
from utils.core.names import SDXL_BASE_ID
from utils.training.config_file import add_config_arguments, apply_config_file
from utils.data.listing import add_dataset_arguments


def parse_training_args(argv: list[str] | None = None, description: str | None = None) -> argparse.Namespace:
    """train_sdxl_lora.py's flags (the original's names and defaults, plus the additions)."""
    p = Parser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python train_sdxl_lora.py --dataset_dir dataset_ghibli \\\n"
               "      --output_dir output_ghibli --lora_rank 4 --lora_alpha 8")
    add_training_arguments(p)
    add_config_arguments(p)
    apply_config_file(p, argv)
    return p.parse_args(argv)


def add_training_arguments(p: argparse.ArgumentParser) -> None:
    for add_group in (_add_model_flags, _add_data_flags, _add_output_flags, _add_lora_flags, _add_optimizer_flags,
                      _add_speed_flags, _add_evaluation_flags, _add_style_flags):
        add_group(p)


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    model = p.add_argument_group("model")
    model.add_argument("--pretrained_model_name_or_path", default=SDXL_BASE_ID,
                       help="diffusers folder, Hub id, or single-file SDXL checkpoint (.safetensors)")
    model.add_argument("--model_config", default=None,
                       help="with a single-file checkpoint: a local diffusers SDXL folder whose configs it uses "
                            "(no Hub access needed)")
    model.add_argument("--pretrained_vae_model_name_or_path", default=None,
                       help="a separate VAE, e.g. madebyollin/sdxl-vae-fp16-fix (then the VAE may run in fp16)")
    model.add_argument("--revision", default=None)
    model.add_argument("--variant", default="fp16",
                       help="weights variant; falls back to the regular weights when the model has none")
    model.add_argument("--allow_pickle", action="store_true",
                       help="allow pickle-based weights (.bin/.ckpt), which can run code when loaded")


def _add_data_flags(p: argparse.ArgumentParser) -> None:
    data = p.add_argument_group("data")
    add_dataset_arguments(data)
    data.add_argument("--resolution", type=int, default=512,
                      help="side of the square training area in pixels, a multiple of 8 (default: %(default)s)")
    data.add_argument("--no_buckets", action="store_true",
                      help="the original's square training: resize the short side to --resolution and crop the "
                           "centre, instead of aspect-ratio buckets")
    crops = data.add_mutually_exclusive_group()
    crops.add_argument("--center_crop", dest="center_crop", action="store_true", default=True,
                       help="crop the centre of each image, as the original did (the default)")
    crops.add_argument("--random_crop", dest="center_crop", action="store_false",
                       help="seeded random crops instead of centre crops")
    data.add_argument("--random_flip", action="store_true", help="mirror images at random")
    data.add_argument("--caption_dropout", type=float, default=0.0,
                      help="probability of training a step on the empty (unconditional) prompt")
    data.add_argument("--validation_split", type=float, default=0.0,
                      help="share of images held out for the validation loss (0: use fixed noise on "
                           "training images)")
    data.add_argument("--cache", action=argparse.BooleanOptionalAction, default=True,
                      help="cache VAE latents and text embeddings once (default on)")
    data.add_argument("--cache_latents_to_disk", action="store_true",
                      help="also keep the latent cache on disk under output_dir/.latent_cache")
    data.add_argument("--dataloader_num_workers", type=int, default=0)


def _add_output_flags(p: argparse.ArgumentParser) -> None:
    output = p.add_argument_group("output")
    output.add_argument("--output_dir", default="output_ghibli")
    output.add_argument("--logging_dir", default="logs")
    output.add_argument("--save_steps", type=int, default=2, help="save checkpoint_epoch_N every N epochs")
    output.add_argument("--checkpointing_steps", type=int, default=None,
                        help="save a resumable state every N optimizer steps")
    output.add_argument("--checkpoints_total_limit", type=int, default=None)
    output.add_argument("--resume_from_checkpoint", default=None,
                        help="a checkpoint folder, a run folder, or 'latest'; a run folder (or, for 'latest', the "
                             "newest unfinished run of this configuration) without a checkpoint starts again in it")
    output.add_argument("--run_dir_file", default=None,
                        help="write the run folder's absolute path into this file as soon as it is chosen "
                             "(for sweeps and schedulers that keep records of runs)")
    output.add_argument("--save_kohya", action="store_true",
                        help="also write kohya_lora.safetensors (ComfyUI/A1111 format) in every model folder")
    output.add_argument("--push_to_hub", action="store_true",
                        help="upload final_model with a model card at the end (token: HF_TOKEN or `hf auth login`)")
    output.add_argument("--hub_model_id", default=None, help="namespace/name of the Hub repo")
    output.add_argument("--hub_private", action="store_true")
    output.add_argument("--report_to", default="tensorboard", choices=["tensorboard", "wandb", "all", "none"])


def _add_lora_flags(p: argparse.ArgumentParser) -> None:
    lora = p.add_argument_group("LoRA")
    lora.add_argument("--lora_rank", type=int, default=8)
    lora.add_argument("--lora_alpha", type=float, default=8.0)
    lora.add_argument("--lora_dropout", type=float, default=0.0)
    lora.add_argument("--lora_target_modules", nargs="+", default=["to_k", "to_q", "to_v", "to_out.0"])
    lora.add_argument("--use_dora", action="store_true")
    lora.add_argument("--use_rslora", action="store_true", help="scale by alpha/sqrt(rank) instead of alpha/rank")
    lora.add_argument("--init_lora_weights", default="gaussian", choices=["gaussian", "kaiming"])
    lora.add_argument("--train_text_encoder", action="store_true", help="LoRA on both text encoders too")
    lora.add_argument("--lora_type", default="lora", choices=["lora", "loha", "lokr"],
                      help="adapter family: LoRA, or LyCORIS' LoHa (Hadamard product) or LoKr (Kronecker product), "
                           "through PEFT; rank and alpha give the scale alpha/rank for all three")
    lora.add_argument("--lokr_factor", type=int, default=-1,
                      help="LoKr: LyCORIS' factor, the size of the small Kronecker factor (-1: automatic, "
                           "near the square root of each layer's size)")
    lora.add_argument("--lokr_decompose_both", action="store_true",
                      help="LoKr: decompose the small factor to rank too (LyCORIS' decompose_both)")
    lora.add_argument("--loraplus_lr_ratio", type=float, default=None,
                      help="LoRA+: the up (B) matrices learn at this multiple of the learning rate "
                           "(kohya's loraplus_lr_ratio; 16 is the paper's choice); lora and DoRA only")
    ema = p.add_argument_group("EMA of the adapter weights")
    ema.add_argument("--use_ema", action="store_true",
                     help="keep an fp32 exponential moving average of the trainable adapter weights; validation "
                          "uses it and model folders hold it as the model to use (raw weights kept beside)")
    ema.add_argument("--ema_decay", type=float, default=0.999)
    ema.add_argument("--ema_update_every", type=int, default=1, help="update the EMA every N optimizer steps")


def _add_optimizer_flags(p: argparse.ArgumentParser) -> None:
    optim = p.add_argument_group("optimisation")
    optim.add_argument("--train_batch_size", type=int, default=1)
    optim.add_argument("--num_train_epochs", type=int, default=10)
    optim.add_argument("--max_train_steps", type=int, default=None, help="overrides --num_train_epochs")
    optim.add_argument("--gradient_accumulation_steps", type=int, default=1)
    optim.add_argument("--learning_rate", type=float, default=1e-4)
    optim.add_argument("--scale_lr", action="store_true", help="multiply the LR by the effective batch size")
    optim.add_argument("--lr_scheduler", default="cosine",
                       choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                                "constant_with_warmup"])
    optim.add_argument("--lr_warmup_steps", type=int, default=500)
    optim.add_argument("--optimizer", default="adamw", choices=["adamw", "adamw8bit", "prodigy"])
    optim.add_argument("--adam_beta1", type=float, default=0.9)
    optim.add_argument("--adam_beta2", type=float, default=0.999)
    optim.add_argument("--adam_weight_decay", type=float, default=1e-2)
    optim.add_argument("--adam_epsilon", type=float, default=1e-8)
    optim.add_argument("--max_grad_norm", type=float, default=1.0, help="0 turns clipping off")
    optim.add_argument("--snr_gamma", type=float, default=None, help="min-SNR loss weighting (5.0 is typical)")
    optim.add_argument("--noise_offset", type=float, default=0.0)
    optim.add_argument("--prediction_type", default=None, choices=["epsilon", "v_prediction"],
                       help="override the scheduler's prediction type")
    optim.add_argument("--max_nonfinite_steps", type=int, default=5,
                       help="stop after this many optimizer steps in a row with a NaN/Inf loss or gradient")
    optim.add_argument("--seed", type=int, default=42)


def _add_speed_flags(p: argparse.ArgumentParser) -> None:
    speed = p.add_argument_group("speed and memory")
    speed.add_argument("--mixed_precision", default="fp16", choices=["no", "fp16", "bf16"],
                       help="falls back to fp32 without CUDA")
    speed.add_argument("--allow_tf32", action="store_true",
                       help="let Ampere+ GPUs use TF32 for fp32 matmuls and convolutions (faster, slightly less exact)")
    checkpointing = speed.add_mutually_exclusive_group()
    checkpointing.add_argument("--gradient_checkpointing", nargs="?", const=True, default="auto",
                               type=checkpointing_setting, metavar="{auto,on,off}",
                               help="recompute activations in the backward pass (less memory, ~1.4x UNet compute). "
                                    "Default auto: off on a CPU; on a GPU only when the step would not fit in "
                                    "free memory. The flag alone forces it on")
    checkpointing.add_argument("--no-gradient_checkpointing", dest="gradient_checkpointing", action="store_const",
                               const=False, help="force gradient checkpointing off")
    speed.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                       help="use xformers (default: PyTorch SDPA)")


def _add_evaluation_flags(p: argparse.ArgumentParser) -> None:
    evaluation = p.add_argument_group("fixed-noise validation loss")
    evaluation.add_argument("--eval_loss_epochs", type=auto_or_int, default="auto",
                            help="measure the fixed-noise loss every N epochs (and after the last); 0 turns it off "
                                 "(best_model is then the epoch with the lowest mean training loss, as in the "
                                 "original). Default auto: as often as about 5%% of the training compute allows")
    evaluation.add_argument("--eval_loss_samples", type=auto_or_int, default="auto",
                            help="(image, noise, timestep) triples per measurement (default auto: from the same "
                                 "5%% budget, at most 32)")

    val = p.add_argument_group("validation images")
    val.add_argument("--validation_prompt", nargs="+", default=None)
    val.add_argument("--num_validation_images", type=int, default=2)
    val.add_argument("--validation_epochs", type=int, default=1)
    val.add_argument("--validation_steps", type=int, default=25, help="inference steps per validation image")
    val.add_argument("--validation_prompts_file", default=None,
                     help="validation prompts, one per line, with kohya's inline options (--n negative, --w/--h "
                          "size, --s steps, --l guidance, --d seed); replaces --validation_prompt")


def _add_style_flags(p: argparse.ArgumentParser) -> None:
    style = p.add_argument_group("style options (kohya sd-scripts' names and meaning)")
    style.add_argument("--shuffle_caption", action="store_true",
                       help="shuffle the caption's tokens (split at --caption_separator) at every step; the text "
                            "embeddings are then computed each step instead of cached")
    style.add_argument("--keep_tokens", type=int, default=0,
                       help="with --shuffle_caption: the first N tokens stay in place (default: %(default)s)")
    style.add_argument("--caption_separator", default=",", help="what separates caption tokens (default: ',')")
    style.add_argument("--caption_prefix", default=None,
                       help="text put before every caption, e.g. a trigger word (never shuffled)")
    style.add_argument("--masked_loss", action="store_true",
                       help="average the loss over each image's mask: a same-stem file in masks/ beside the "
                            "image's folder (grey level), else the image's alpha channel; white trains")
    style.add_argument("--reg_data_dir", default=None,
                       help="regularisation images (any dataset layout), mixed into the batches and balanced to "
                            "the training images' count per epoch as kohya does")
    style.add_argument("--prior_loss_weight", type=float, default=1.0,
                       help="loss weight of the regularisation images (default: %(default)s)")
    timesteps = p.add_argument_group("timestep distribution (the diffusers SDXL example's names and meaning)")
    timesteps.add_argument("--timestep_bias_strategy", default="none", choices=["none", "earlier", "later", "range"],
                           help="favour low (earlier), high (later) or a range of timesteps (default: %(default)s)")
    timesteps.add_argument("--timestep_bias_multiplier", type=float, default=1.0,
                           help="weight of the favoured timesteps relative to the others (default: %(default)s)")
    timesteps.add_argument("--timestep_bias_begin", type=int, default=0,
                           help="--timestep_bias_strategy range: first favoured timestep (default: %(default)s)")
    timesteps.add_argument("--timestep_bias_end", type=int, default=1000,
                           help="--timestep_bias_strategy range: end of the favoured timesteps, exclusive "
                                "(default: %(default)s)")
    timesteps.add_argument("--timestep_bias_portion", type=float, default=0.25,
                           help="earlier/later: share of the timesteps favoured (default: %(default)s)")
    timesteps.add_argument("--timestep_sampling", default="uniform", choices=["uniform", "logit_normal"],
                           help="uniform, or logit-normal: sigmoid(N(--logit_mean, --logit_std)) of the schedule "
                                "(default: %(default)s)")
    timesteps.add_argument("--logit_mean", type=float, default=0.0, help="logit_normal: mean (default: %(default)s)")
    timesteps.add_argument("--logit_std", type=float, default=1.0, help="logit_normal: std (default: %(default)s)")


def checkpointing_setting(value: str) -> bool | str:
    """--gradient_checkpointing [auto|on|off]: True, False or 'auto'."""
    choices = {"auto": "auto", "on": True, "true": True, "off": False, "false": False}
    if value.lower() not in choices:
        raise argparse.ArgumentTypeError(f"{value!r}: choose auto, on or off")
    return choices[value.lower()]


def auto_or_int(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: 'auto' or a whole number") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"{value!r}: must not be negative")
    return number
