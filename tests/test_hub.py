"""Publishing to and generating from the Hub, with the real huggingface_hub and diffusers clients
talking HTTP to a Hub-compatible server of our own on 127.0.0.1 (tests/fakes/hub_server.py).

HF_ENDPOINT is read when huggingface_hub is imported, so the clients run in subprocesses.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from tests.conftest import TRAINED_ALPHA, TRAINED_RANK
from tests.fakes.hub_server import HubServer
from tests.helpers import ROOT, run_script
from utils.lora.files import LORA_WEIGHT_NAME, TRAINING_METADATA_KEY, read_metadata
from utils.core.secrets import NOT_SECRET

TOKEN = "hf_TestTokenThatMustNeverBePublished42"
GENERATION = ["--prompt", "a village in ghibli style", "--steps", "3", "--height", "64", "--width", "64",
              "--seed", "1234", "--guidance", "5.0", "--negative_prompt", "blurry"]
SECRET_NAME = re.compile(r"token|secret|key|passw|credential", re.IGNORECASE)


@pytest.fixture(scope="module")
def hub():
    with HubServer(token=TOKEN) as server:
        yield server


def hub_env(hub: HubServer, tmp_path, token: str | None = TOKEN) -> dict[str, str]:
    home = tmp_path / "hf_home"
    home.mkdir(exist_ok=True)
    return {"HF_ENDPOINT": hub.base_url, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HOME": str(home), "HF_TOKEN_PATH": str(home / "token"),
            "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
            "HF_TOKEN": token or "", "HUGGING_FACE_HUB_TOKEN": ""}


def card_metadata(readme: bytes) -> tuple[dict, str]:
    match = re.match(r"\A---\n(.*?)\n---\n(.*)\Z", readme.decode("utf-8"), re.DOTALL)
    assert match, "README.md must start with YAML front matter"
    return yaml.safe_load(match.group(1)), match.group(2)


def error_line(result) -> str:
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    return lines[0]


def upload_base_model(hub: HubServer, model_dir, repo_id: str, env: dict[str, str]) -> None:
    code = ("import sys; from huggingface_hub import HfApi; api = HfApi(); "
            "api.create_repo(sys.argv[1], exist_ok=True); api.upload_folder(repo_id=sys.argv[1], folder_path=sys.argv[2])")
    run_script("-c", code, repo_id, str(model_dir), env=env, timeout=120)


def local_inference(*args: str) -> int:
    """hf/hf_inference.py's main, in this process (offline: local paths only)."""
    spec = importlib.util.spec_from_file_location("hf_inference", ROOT / "hf" / "hf_inference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(list(args))


def latest_validation_images(run_dir) -> set[str]:
    found = {p.name: int(p.name.split("_")[1]) for p in (run_dir / "validation").glob("epoch_*.png")}
    last = max(found.values())
    return {f"images/{name}" for name, epoch in found.items() if epoch == last}


def test_upload_then_generate_from_hub_ids_matches_local(trained_run, tiny_model_dir, hub, tmp_path):
    env = hub_env(hub, tmp_path)
    result = run_script("hf/upload_to_hf.py", "--model_path", str(trained_run), "--repo_name", "tester/ghibli-lora",
                        "--base_model", "tester/tiny-sdxl", env=env, timeout=120)
    assert f"{hub.base_url}/tester/ghibli-lora" in result.stdout

    files = hub.files("tester/ghibli-lora")
    images = latest_validation_images(trained_run)
    assert set(files) == {".gitattributes", "README.md", LORA_WEIGHT_NAME, "experiment_config.json", *images}
    assert files[LORA_WEIGHT_NAME] == (trained_run / "final_model" / LORA_WEIGHT_NAME).read_bytes()
    assert all(TOKEN.encode() not in data for data in files.values())

    metadata, body = card_metadata(files["README.md"])
    assert metadata["base_model"] == "tester/tiny-sdxl" and metadata["library_name"] == "diffusers"
    assert metadata["license"] == "openrail++"
    assert {"text-to-image", "stable-diffusion-xl", "lora", "diffusers", "template:sd-lora"} <= set(metadata["tags"])
    assert metadata["instance_prompt"]
    assert {w["output"]["url"] for w in metadata["widget"]} == images
    assert {w["text"] for w in metadata["widget"]} == {"a village in ghibli style"}
    training = json.loads(read_metadata(trained_run / "final_model" / LORA_WEIGHT_NAME)[TRAINING_METADATA_KEY])
    for setting, value in [("LoRA rank", TRAINED_RANK), ("LoRA alpha", f"{TRAINED_ALPHA:g}"),
                           ("training steps", training["steps"]), ("resolution", 128), ("training images", 12)]:
        assert f"| {setting} | {value} |" in body
    assert "load_lora_weights(\"tester/ghibli-lora\"" in body and "set_adapters" in body and "ComfyUI" in body
    config = json.loads(files["experiment_config.json"])
    assert config == json.loads((trained_run / "experiment_config.json").read_text())  # nothing secret to drop

    upload_base_model(hub, tiny_model_dir, "tester/tiny-sdxl", env)
    hub_png = tmp_path / "from_hub.png"
    run_script("hf/hf_inference.py", "--base_model_id", "tester/tiny-sdxl", "--lora_model_id", "tester/ghibli-lora",
               "--output", str(hub_png), *GENERATION, env=env, timeout=180)
    downloaded = {r.path.split("?")[0] for r in hub.requests if r.method == "GET" and "/resolve/" in r.path}
    assert any(p.startswith("/tester/ghibli-lora/resolve/") and p.endswith(LORA_WEIGHT_NAME) for p in downloaded)
    assert any(p.startswith("/tester/tiny-sdxl/resolve/") and "unet" in p for p in downloaded)

    local_png = tmp_path / "local.png"
    assert local_inference("--base_model_id", str(tiny_model_dir), "--lora_model_id",
                           str(trained_run / "final_model"), "--output", str(local_png), *GENERATION) == 0
    from_hub = np.asarray(Image.open(hub_png), dtype=np.int16)
    local = np.asarray(Image.open(local_png), dtype=np.int16)
    assert from_hub.shape == local.shape == (64, 64, 3)
    assert np.abs(from_hub - local).max() <= 1 and local.std() > 1.0


def test_only_allow_listed_files_leave_the_folder(trained_run, hub, tmp_path):
    # A model folder copied out of its run, next to secrets, pickles and a kohya-format copy.
    folder = tmp_path / "my_lora"
    shutil.copytree(trained_run / "final_model", folder)
    (folder / ".env").write_text(f"HF_TOKEN={TOKEN}\n")
    (folder / "vault").mkdir()
    (folder / "vault" / "key.yaml").write_text(f"hub_token: {TOKEN}\n")
    (folder / "optimizer.pt").write_bytes(b"\x80\x04pickle")
    save_file({"lora_unet_down_blocks_0.lora_down.weight": torch.zeros(2, 2)}, str(folder / "ghibli_kohya.safetensors"))
    save_file({"exp_avg": torch.zeros(2)}, str(folder / "optimizer_state.safetensors"))
    env = hub_env(hub, tmp_path, token=None)
    result = run_script("hf/upload_to_hf.py", "--model_path", str(folder), "--repo_name", "folder-lora",
                        "--token", TOKEN, "--private", "--license", "other", env=env, timeout=120)
    assert "process list" in result.stderr and TOKEN not in result.stdout + result.stderr
    files = hub.files("tester/folder-lora")  # a bare name goes to the token owner's namespace
    assert set(files) == {".gitattributes", "README.md", LORA_WEIGHT_NAME, "ghibli_kohya.safetensors"}
    assert hub.repos["tester/folder-lora"].private
    assert all(TOKEN.encode() not in data for data in files.values())
    metadata, body = card_metadata(files["README.md"])
    assert metadata["license"] == "other" and "base_model" not in metadata  # trained from a local path
    assert "ghibli_kohya.safetensors" in body

    # A run directory whose config holds secret-looking keys: they are dropped, the rest is kept.
    run_copy = tmp_path / "run"
    shutil.copytree(trained_run, run_copy)
    config = json.loads((run_copy / "experiment_config.json").read_text())
    config.update(hub_token=TOKEN, wandb={"api_key": "k" * 12, "project": "ghibli"},
                  command=f"train_sdxl_lora.py --hub_token {TOKEN}")
    (run_copy / "experiment_config.json").write_text(json.dumps(config))
    (run_copy / ".env").write_text(f"HF_TOKEN={TOKEN}\n")
    result = run_script("hf/upload_to_hf.py", "--model_path", str(run_copy), "--repo_name", "tester/run-lora",
                        env=hub_env(hub, tmp_path), check=False, timeout=120)
    # Secret keys are dropped by name, but the token also sat in a plain value: nothing is sent.
    assert "experiment_config.json: refusing to upload, it contains the Hub token" in error_line(result)
    assert "tester/run-lora" not in hub.repos
    config["command"] = "train_sdxl_lora.py --hub_token ***"
    (run_copy / "experiment_config.json").write_text(json.dumps(config))
    run_script("hf/upload_to_hf.py", "--model_path", str(run_copy), "--repo_name", "tester/run-lora",
               env=hub_env(hub, tmp_path), timeout=120)
    files = hub.files("tester/run-lora")
    assert not any(name.startswith(("checkpoints/", "logs/", "best_model", "checkpoint_epoch", "vault"))
                   or name.endswith((".env", ".bin", ".pt", ".pkl")) for name in files)
    uploaded = json.loads(files["experiment_config.json"])
    assert uploaded["wandb"] == {"project": "ghibli"} and uploaded["lora_rank"] == TRAINED_RANK
    # keep_tokens is kohya's count of caption tokens that stay in place (an int), not an access token
    assert not any(SECRET_NAME.search(key) for key in uploaded if key not in NOT_SECRET)
    assert isinstance(uploaded["keep_tokens"], int)


def test_pull_request_and_login_store_token(trained_run, hub, tmp_path):
    env = hub_env(hub, tmp_path, token=None)
    (tmp_path / "hf_home" / "token").write_text(TOKEN)  # as `hf auth login` stores it
    run_script("hf/upload_to_hf.py", "--model_path", str(trained_run / "best_model"), "--repo_name",
               "tester/pr-lora", env=env, timeout=120)
    main_before = hub.files("tester/pr-lora")
    result = run_script("hf/upload_to_hf.py", "--model_path", str(trained_run / "best_model"), "--repo_name",
                        "tester/pr-lora", "--create_pr", "--commit_message", "Try new card", "--license", "mit",
                        env=env, timeout=120)
    assert "/tester/pr-lora/discussions/1" in result.stdout
    assert hub.files("tester/pr-lora") == main_before
    metadata, _ = card_metadata(hub.files("tester/pr-lora", "refs/pr/1")["README.md"])
    assert metadata["license"] == "mit"
    summaries = [json.loads(r.body.splitlines()[0])["value"]["summary"] for r in hub.requests
                 if r.method == "POST" and "/tester/pr-lora/commit/" in r.path]
    assert summaries[-1] == "Try new card" and summaries[0].startswith(f"Upload LoRA (rank {TRAINED_RANK}")


ORIGINAL_API_SCRIPT = """
import sys
sys.path.insert(0, sys.argv[1])
from hf.hf_inference import generate_image_with_hf_api
from hf.upload_to_hf import upload_model_to_hf

model_path, token, output = sys.argv[2:5]
print(upload_model_to_hf(model_path, "tester/original-api-lora", token, True))
image = generate_image_with_hf_api("a village in ghibli style", "tester/tiny-sdxl", "tester/original-api-lora", token,
                                   3, 5.0, "blurry", seed=1234, height=64, width=64)
image.save(output)
"""


def test_original_functions_upload_and_generate_from_hub_ids(trained_run, tiny_model_dir, hub, tmp_path):
    """upload_model_to_hf and generate_image_with_hf_api called as the original's users call them,
    the token given as an argument (no HF_TOKEN, no saved login): used, and saved nowhere."""
    if "tester/tiny-sdxl" not in hub.repos:
        upload_base_model(hub, tiny_model_dir, "tester/tiny-sdxl", hub_env(hub, tmp_path))
    env = hub_env(hub, tmp_path, token=None)
    hub_png = tmp_path / "original_api.png"

    result = run_script("-c", ORIGINAL_API_SCRIPT, str(ROOT), str(trained_run), TOKEN, str(hub_png), env=env,
                        timeout=240)

    assert f"{hub.base_url}/tester/original-api-lora" in result.stdout
    assert hub.repos["tester/original-api-lora"].private  # the original ignored private=True
    files = hub.files("tester/original-api-lora")
    assert files[LORA_WEIGHT_NAME] == (trained_run / "final_model" / LORA_WEIGHT_NAME).read_bytes()
    assert not (tmp_path / "hf_home" / "token").exists()  # the original's login() saved the token
    assert TOKEN not in result.stdout + result.stderr

    from hf.hf_inference import generate_image_with_hf_api  # the same call on local paths, in this process
    local = generate_image_with_hf_api("a village in ghibli style", str(tiny_model_dir),
                                       str(trained_run / "final_model"), None, 3, 5.0, "blurry", seed=1234,
                                       height=64, width=64)
    base = generate_image_with_hf_api("a village in ghibli style", str(tiny_model_dir), None, None, 3, 5.0,
                                      "blurry", seed=1234, height=64, width=64)
    from_hub = np.asarray(Image.open(hub_png), dtype=np.int16)
    local, base = (np.asarray(image, dtype=np.int16) for image in (local, base))
    assert from_hub.shape == local.shape == (64, 64, 3)
    assert np.abs(from_hub - local).max() <= 1  # same image from Hub ids as from local paths
    assert np.abs(local - base).mean() > 1.0  # and the LoRA was applied


def test_remote_generation_goes_through_inference_client(hub, tmp_path):
    output = tmp_path / "remote.png"
    run_script("hf/hf_inference.py", "--remote", "--endpoint_url", f"{hub.base_url}/inference/sdxl-ghibli",
               "--prompt", "a cat on a roof", "--seed", "5", "--steps", "20", "--height", "96", "--width", "80",
               "--negative_prompt", "blurry", "--output", str(output), env=hub_env(hub, tmp_path), timeout=60)
    request = hub.inference_requests[-1]
    assert request["inputs"] == "a cat on a roof"
    assert request["parameters"] == {"negative_prompt": "blurry", "height": 96, "width": 80,
                                     "num_inference_steps": 20, "guidance_scale": 7.5, "seed": 5}
    assert Image.open(output).size == (80, 96)


def test_clear_one_line_errors(trained_run, hub, tmp_path):
    env = hub_env(hub, tmp_path)
    missing = run_script("hf/hf_inference.py", "--base_model_id", "tester/no-such-model", "--output",
                         str(tmp_path / "x.png"), *GENERATION, env=env, check=False, timeout=120)
    line = error_line(missing)
    assert "tester/no-such-model" in line and "not found" in line and not (tmp_path / "x.png").exists()

    bad_id = run_script("hf/upload_to_hf.py", "--model_path", str(trained_run), "--repo_name", "tester/bad..name",
                        env=env, check=False, timeout=60)
    assert "--repo_name 'tester/bad..name': not a valid Hub repo id" in error_line(bad_id)

    no_token = run_script("hf/upload_to_hf.py", "--model_path", str(trained_run), "--repo_name", "tester/x",
                          env=hub_env(hub, tmp_path, token=None), check=False, timeout=60)
    assert "no Hugging Face token" in error_line(no_token)


@pytest.mark.slow
def test_train_push_to_hub_publishes_and_writes_the_token_nowhere(tiny_model_dir, tiny_dataset_dir, hub, tmp_path):
    """train_sdxl_lora.py --push_to_hub: the token (from HF_TOKEN) is in no local or uploaded file."""
    env = hub_env(hub, tmp_path)
    output = tmp_path / "runs"
    run_script("train_sdxl_lora.py", "--pretrained_model_name_or_path", str(tiny_model_dir),
               "--dataset_dir", str(tiny_dataset_dir), "--output_dir", str(output), "--resolution", "128",
               "--max_train_steps", "2", "--lr_warmup_steps", "0", "--checkpointing_steps", "1",
               "--push_to_hub", "--hub_model_id", "tester/pushed-lora", "--report_to", "tensorboard",
               env=env, timeout=300)
    files = hub.files("tester/pushed-lora")
    assert LORA_WEIGHT_NAME in files and "README.md" in files
    for name, data in files.items():
        assert TOKEN.encode() not in data, name
    written = [p for p in output.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in written) and any("tfevents" in p.name for p in written)
    for path in written:
        assert TOKEN.encode() not in path.read_bytes(), path


def test_push_to_hub_checks_the_target_before_training(tiny_model_dir, tiny_dataset_dir, hub, tmp_path):
    result = run_script("train_sdxl_lora.py", "--pretrained_model_name_or_path", str(tiny_model_dir),
                        "--dataset_dir", str(tiny_dataset_dir), "--output_dir", str(tmp_path / "runs"),
                        "--push_to_hub", "--hub_model_id", "not a repo id", env=hub_env(hub, tmp_path), check=False)
    assert "hub_model_id" in error_line(result)
    assert not (tmp_path / "runs").exists()


def test_one_secret_rule_for_configs_command_lines_and_messages():
    import train_sdxl_lora
    from utils.core.secrets import mask_argv, redact, scrub

    flags = vars(train_sdxl_lora.parse_args([]))
    assert scrub(flags) == flags  # experiment_config.json keeps every flag of the trainer
    assert scrub({"hub_token": TOKEN, "wandb": [{"api_key": "k", "project": "p"}], "lr": 1}) == \
        {"wandb": [{"project": "p"}], "lr": 1}
    assert mask_argv(["--token", TOKEN, "--hub_token=" + TOKEN, "--API_KEY", "k", "--rank", "4", "--token"]) == \
        ["--token", "***", "--hub_token=***", "--API_KEY", "***", "--rank", "4", "--token"]
    assert redact(f"HTTP 400: key {TOKEN} is invalid", [TOKEN, None]) == "HTTP 400: key *** is invalid"
