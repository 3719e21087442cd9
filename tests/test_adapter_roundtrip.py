"""Every adapter file the trainer writes loads back, exactly, through inference_sdxl_ghibli.py.

The matrix: {LoRA, LoHa, LoKr} x {UNet only, UNet + both text encoders} x {the project's file, its kohya copy,
the kohya copy converted back by utils/convert_lora.py}, plus LoKr with --lokr_factor 4, --lokr_factor 32 and
--lokr_decompose_both. Each file gives the image of the weights the training held (its resumable checkpoint put
into the pipeline through PEFT directly), and --lora_scale 0 gives the base image. One training per row serves
its three files. Every LoKr module of a kohya copy has the shapes kohya's LyCORIS loader rebuilds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import load_pipe, only_run_dir, pixels, run_in_process
from tests.kohya_checks import lycoris_delta
from utils.core.layout import FINAL_MODEL, RunLayout, model_info_file
from utils.lora.files import LORA_WEIGHT_NAME, TRAINING_METADATA_KEY, read_metadata, read_tensors, save_safetensors
from utils.lora.kohya_names import CONVERSION_METADATA_KEY, KOHYA_WEIGHT_NAME, LoraConversionError

TRAIN = ["--resolution", "32", "--train_batch_size", "2", "--max_train_steps", "2", "--learning_rate", "1e-2",
         "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--report_to", "none", "--mixed_precision", "no",
         "--no-gradient_checkpointing", "--save_steps", "100", "--checkpointing_steps", "2", "--lora_alpha", "4",
         "--save_kohya"]
PROMPT = "a house in ghibli style"
NEGATIVE = "blurry, low quality, distorted, deformed, ugly, bad anatomy"  # inference_sdxl_ghibli.py's default
INFER = ["--prompt", PROMPT, "--num_images", "1", "--height", "64", "--width", "64", "--num_inference_steps", "2"]
UNET_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # the trainer's defaults
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]

ROWS = {
    "lora": ["--lora_type", "lora"],
    "lora+te": ["--lora_type", "lora", "--train_text_encoder"],
    "loha": ["--lora_type", "loha"],
    "loha+te": ["--lora_type", "loha", "--train_text_encoder"],
    "lokr": ["--lora_type", "lokr"],
    "lokr+te": ["--lora_type", "lokr", "--train_text_encoder"],
    "lokr-factor4": ["--lora_type", "lokr", "--lokr_factor", "4"],
    # 32 exceeds the square root of every width of the tiny model (32, 64), as it does SDXL's 640
    "lokr-factor32+te": ["--lora_type", "lokr", "--lokr_factor", "32", "--train_text_encoder"],
    # rank 2 is below half of the 8x8 first factor of the 64-wide layers, so lokr_w1 is decomposed there
    "lokr-decompose-both": ["--lora_type", "lokr", "--lokr_decompose_both", "--lora_rank", "2"],
}


def flag(flags: list[str], name: str, default: str) -> str:
    return flags[flags.index(name) + 1] if name in flags else default


def peft_config(flags: list[str], targets: list[str]):
    """The PEFT config the flags stand for, built here from PEFT's own classes."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    kind, rank = flag(flags, "--lora_type", "lora"), int(flag(flags, "--lora_rank", "8"))
    if kind == "lora":
        return LoraConfig(r=rank, lora_alpha=4, target_modules=targets)
    if kind == "loha":
        return LoHaConfig(r=rank, alpha=4, target_modules=targets)
    return LoKrConfig(r=rank, alpha=4, target_modules=targets, decompose_factor=int(flag(flags, "--lokr_factor", "-1")),
                      decompose_both="--lokr_decompose_both" in flags)


def generate(pipe) -> np.ndarray:
    image = pipe(PROMPT, num_inference_steps=2, height=64, width=64, guidance_scale=5.0, negative_prompt=NEGATIVE,
                 generator=torch.Generator("cpu").manual_seed(42)).images[0]
    return np.asarray(image, dtype=np.float32)


def infer(model_dir: Path, out_dir: Path, lora: Path, *extra: str) -> np.ndarray:
    """inference_sdxl_ghibli.py's main, in this process."""
    from inference_sdxl_ghibli import main

    assert main(["--pretrained_model_name_or_path", str(model_dir), "--output_dir", str(out_dir),
                 "--lora_model_path", str(lora), *INFER, *extra]) == 0
    (image,) = out_dir.glob("lora_prompt1_*.png")
    return pixels(image)[..., :3]


def trained_image(model_dir: Path, run_dir: Path, flags: list[str]) -> np.ndarray:
    """The image of the weights the training held: its last resumable checkpoint, put into each model through
    PEFT, with no file reader of the project's in between."""
    from peft import inject_adapter_in_model
    from peft.utils import set_peft_model_state_dict

    pipe = load_pipe(model_dir)
    checkpoint = RunLayout(run_dir).checkpoint(2)  # the last step (--max_train_steps 2)
    for component, targets in (("unet", UNET_TARGETS), ("text_encoder", TEXT_ENCODER_TARGETS),
                               ("text_encoder_2", TEXT_ENCODER_TARGETS)):
        path = checkpoint / f"lora_{component}.safetensors"
        assert path.is_file() == (component == "unet" or "--train_text_encoder" in flags), path
        if path.is_file():
            model = getattr(pipe, component)
            inject_adapter_in_model(peft_config(flags, targets), model)
            assert not set_peft_model_state_dict(model, read_tensors(path)).unexpected_keys
    return generate(pipe)


@pytest.fixture(scope="module")
def base_image(tiny_model_dir) -> np.ndarray:
    return generate(load_pipe(tiny_model_dir))


@pytest.fixture(scope="module")
def layer_shapes(tiny_model_dir) -> dict[str, tuple[int, ...]]:
    """kohya module name -> the layer's (out, in[, kh, kw]), for every Linear/Conv2d of the tiny pipeline."""
    from utils.lora.kohya_names import text_encoder_kohya_name, unet_kohya_names

    pipe = load_pipe(tiny_model_dir)
    shapes = {}
    for component in ("unet", "text_encoder", "text_encoder_2"):
        names = unet_kohya_names(pipe.unet.config) if component == "unet" else {}
        for module, layer in getattr(pipe, component).named_modules():
            name = names.get(module) if component == "unet" else text_encoder_kohya_name(component, module)
            if name and isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
                shapes[name] = tuple(layer.weight.shape)
    return shapes


def lokr_modules(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """module name -> its LoKr factors, for a kohya file or (kohya-named) the project's file."""
    from utils.lora.kohya_names import load_unet_config, text_encoder_kohya_name, unet_kohya_names

    own = path.name == LORA_WEIGHT_NAME
    base_model = json.loads(read_metadata(path)[TRAINING_METADATA_KEY])["base_model"]
    unet_names = unet_kohya_names(load_unet_config(base_model))
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in read_tensors(path).items():
        module, _, role = key.rpartition(".")
        if own:
            component, _, module = module.partition(".")
            module = unet_names[module] if component == "unet" else text_encoder_kohya_name(component, module)
        if role.startswith("lokr_"):
            grouped.setdefault(module, {})[role] = tensor
    return grouped


def check_lokr_copy(folder: Path, flags: list[str], shapes: dict[str, tuple[int, ...]]) -> None:
    """Every LoKr module of the kohya copy has the shapes kohya's LyCORIS loader builds. With factor 32, PEFT's
    factors have shapes it cannot build (the larger factor first), so the copy holds those modules whole."""
    from utils.lora.lokr_forms import lycoris_builds

    copy, own = lokr_modules(folder / KOHYA_WEIGHT_NAME), lokr_modules(folder / LORA_WEIGHT_NAME)
    assert copy.keys() == own.keys()
    assert all(lycoris_builds(weights, shapes[name]) for name, weights in copy.items())
    peft_order_builds = [lycoris_builds(weights, shapes[name]) for name, weights in own.items()]
    note = json.loads(read_metadata(folder / KOHYA_WEIGHT_NAME)[CONVERSION_METADATA_KEY])
    assert note["whole_lokr_modules"] == peft_order_builds.count(False)
    if flag(flags, "--lokr_factor", "-1") == "32":
        assert not any(peft_order_builds)
        assert all(tuple(weights["lokr_w1"].shape) == (1, 1) for weights in copy.values())
    else:
        assert all(peft_order_builds)
        assert all(torch.equal(copy[name][role], own[name][role]) for name in own for role in own[name]
                   if role != "lokr_w1" or "lokr_w2" not in own[name])  # two full factors: scale inside lokr_w1
    if "--lokr_decompose_both" in flags:
        assert any("lokr_w1_a" in weights for weights in own.values())


@pytest.mark.slow
@pytest.mark.parametrize("row", list(ROWS))
def test_every_file_of_a_training_loads_back_with_the_trained_image(row, tiny_model_dir, tiny_dataset_dir, base_image,
                                                                    layer_shapes, tmp_path):
    from utils.convert_lora import main as convert

    flags = ROWS[row]
    run_in_process("train_sdxl_lora.py", "--pretrained_model_name_or_path", str(tiny_model_dir), "--dataset_dir",
                   str(tiny_dataset_dir), "--output_dir", str(tmp_path / "run"), *TRAIN, *flags)
    run_dir = only_run_dir(tmp_path / "run")
    folder = RunLayout(run_dir).final_model
    kind = flag(flags, "--lora_type", "lora")
    training = json.loads(read_metadata(folder / LORA_WEIGHT_NAME)[TRAINING_METADATA_KEY])
    info = json.loads((folder / model_info_file(FINAL_MODEL)).read_text())
    assert training["lora_type"] == info["lora_type"] == kind and info["adapter_weights"] == "raw"
    assert json.loads(RunLayout(run_dir).config.read_text())["lora_type"] == kind
    header = read_metadata(folder / KOHYA_WEIGHT_NAME)
    assert header["ss_network_module"] == ("networks.lora" if kind == "lora" else "lycoris.kohya")
    prefixes = {key.split(".")[0] for key in read_tensors(folder / LORA_WEIGHT_NAME)}
    assert prefixes == ({"unet", "text_encoder", "text_encoder_2"} if "--train_text_encoder" in flags else {"unet"})
    if kind == "lokr":
        check_lokr_copy(folder, flags, layer_shapes)

    direct = trained_image(tiny_model_dir, run_dir, flags)
    assert np.abs(direct - base_image).mean() > 0.05, "training did not change the image"
    assert convert([str(folder / KOHYA_WEIGHT_NAME), "--output", str(tmp_path / "back")]) == 0
    for name, lora in (("own", folder), ("kohya", folder / KOHYA_WEIGHT_NAME), ("back", tmp_path / "back")):
        image = infer(tiny_model_dir, tmp_path / name, lora)
        assert np.abs(image - direct).max() <= 1.0, f"{row}: the {name} file gives another image"
    off = infer(tiny_model_dir, tmp_path / "off", folder / KOHYA_WEIGHT_NAME, "--lora_scale", "0")
    assert np.abs(off - base_image).max() <= 1.0


# ----------------------------------------------------------------------------- LoKr factors on the full SDXL layout


def peft_lokr_layer(shape: tuple[int, ...], factor: int):
    """A PEFT LoKr layer (r 8, alpha 4, random factors) on a bare Linear/Conv2d of the given (out, in[, kh, kw])."""
    from peft import LoKrConfig
    from peft.tuners.lokr.layer import Conv2d, Linear

    config = LoKrConfig(r=8, alpha=4, init_weights=False, decompose_factor=factor)
    if len(shape) == 2:
        return Linear(torch.nn.utils.skip_init(torch.nn.Linear, shape[1], shape[0], bias=False), "default",
                      config=config, r=8, alpha=4, decompose_factor=factor)
    base = torch.nn.utils.skip_init(torch.nn.Conv2d, shape[1], shape[0], shape[2:], padding=1, bias=False)
    return Conv2d(base, "default", config=config, r=8, alpha=4, decompose_factor=factor)


def test_lokr_factor_32_on_full_sdxl_layers_is_exact_in_the_kohya_copy_and_back(tmp_path):
    """640-wide SDXL layers with factor 32 (PEFT: 32x32 ⊗ 20x20) go into the kohya copy whole, in the shapes
    LyCORIS builds and with PEFT's delta; a 1280-wide layer stays factored, tensor for tensor; converted back
    and again, the deltas are the same."""
    from utils.convert_lora import main as convert
    from utils.lora.kohya_names import SDXL_UNET_CONFIG, unet_layers
    from utils.lora.lokr_forms import lycoris_builds
    from utils.lora.lycoris_files import save_kohya_copy

    layers = unet_layers(SDXL_UNET_CONFIG)
    chosen = ["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",  # 640 x 640
              "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",  # 640 x 2048
              "down_blocks.1.resnets.0.conv1",  # 640 x 320 x 3 x 3
              "down_blocks.2.attentions.0.transformer_blocks.0.attn1.to_q"]  # 1280 x 1280: factored in both tools
    torch.manual_seed(0)
    peft, tensors = {}, {}
    for module in chosen:
        name, down, up = layers[module]
        peft[name] = layer = peft_lokr_layer((up[0], *down), 32)
        for role in layer.adapter_layer_names:
            if "default" in getattr(layer, role):
                tensors[f"unet.{module}.{role}"] = getattr(layer, role)["default"].detach().clone()
    config = {"peft_type": "LOKR", "r": 8, "alpha": 4, "decompose_factor": 32, "target_modules": chosen}
    folder = tmp_path / "model"
    folder.mkdir()
    save_safetensors(tensors, folder / LORA_WEIGHT_NAME,
                     {"lora_adapter_metadata": json.dumps({f"unet.{k}": v for k, v in config.items()})})
    kohya = read_tensors(save_kohya_copy(folder, SDXL_UNET_CONFIG))

    whole = []
    for name, layer in peft.items():
        weights = {role: kohya[f"{name}.{role}"] for role in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2",
                                                              "lokr_w2_a", "lokr_w2_b") if f"{name}.{role}" in kohya}
        assert lycoris_builds(weights, tuple(layer.get_base_layer().weight.shape)), name
        if tuple(weights["lokr_w1"].shape) == (1, 1):
            whole.append(name)
        expected = layer.get_delta_weight("default").detach()
        got = lycoris_delta({**weights, "alpha": kohya[f"{name}.alpha"]}, expected.shape)
        assert float((got - expected).norm() / expected.norm()) <= 1e-6, name
    assert whole == list(peft)[:3]

    assert convert([str(folder / KOHYA_WEIGHT_NAME), "--output", str(tmp_path / "back")]) == 0
    back = read_tensors(tmp_path / "back" / LORA_WEIGHT_NAME)
    assert back.keys() == tensors.keys() - {k for k in tensors if "lokr_w2_" in k and any(m in k for m in chosen[:3])} \
        | {f"unet.{m}.lokr_w2" for m in chosen[:3]}  # the whole modules come back as two full factors
    convert([str(tmp_path / "back" / LORA_WEIGHT_NAME), "--output", str(tmp_path / "again.safetensors")])
    again = read_tensors(tmp_path / "again.safetensors")
    assert again.keys() == kohya.keys()
    for key in kohya:
        torch.testing.assert_close(again[key], kohya[key], rtol=1e-5, atol=1e-6 * float(kohya[key].abs().max()))

    # LyCORIS' own order for factor 32 (20x20 ⊗ 32x32) is no Kronecker product of PEFT's shapes: refused, not
    # approximated.
    name = layers[chosen[0]][0]
    lycoris_order = {f"{name}.lokr_w1": torch.randn(20, 20), f"{name}.lokr_w2_a": torch.randn(32, 8),
                     f"{name}.lokr_w2_b": torch.randn(8, 32), f"{name}.alpha": torch.tensor(4.0)}
    save_safetensors(lycoris_order, tmp_path / "lycoris.safetensors",
                     {"ss_network_args": json.dumps({"algo": "lokr", "factor": "32"})})
    with pytest.raises(LoraConversionError, match="do not follow factor=32"):
        convert([str(tmp_path / "lycoris.safetensors"), "--output", str(tmp_path / "refused")])


def test_only_factors_above_a_widths_square_root_need_the_whole_form_on_sdxl():
    """On SDXL's 560 attention layers, of the factors 1 to 64, only 32 (80 layers, the 640-wide), 40 and 64 (all
    560) give PEFT factors that kohya's LyCORIS loader cannot build; docs/adapters.md gives these numbers."""
    from peft.tuners.lokr.layer import factorization

    from utils.lora.kohya_names import SDXL_UNET_CONFIG, unet_layers
    from utils.lora.lokr_forms import lycoris_builds

    shapes = [(up[0], down[0]) for module, (_, down, up) in unet_layers(SDXL_UNET_CONFIG).items()
              if module.endswith(tuple(UNET_TARGETS))]
    assert len(shapes) == 560

    def peft_factors(out_dim: int, in_dim: int, factor: int) -> dict[str, torch.Tensor]:
        (a, b), (c, d) = factorization(out_dim, factor), factorization(in_dim, factor)
        w2 = {"lokr_w2_a": (b, 8), "lokr_w2_b": (8, d)} if 8 < max(b, d) / 2 else {"lokr_w2": (b, d)}
        return {role: torch.empty(shape, device="meta") for role, shape in {"lokr_w1": (a, c), **w2}.items()}

    refused = {factor: sum(not lycoris_builds(peft_factors(*shape, factor), shape) for shape in shapes)
               for factor in [-1, *range(1, 65)]}
    assert {factor: count for factor, count in refused.items() if count} == {32: 80, 40: 560, 64: 560}
