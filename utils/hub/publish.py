"""Publishing a trained LoRA to the Hugging Face Hub: an allow-list of files and a model card.

Only these files are uploaded, whatever else lies in the folder (``.env``, ``vault/``,
optimizer states, pickles...):

    pytorch_lora_weights.safetensors   the LoRA in the diffusers format
    <name>.safetensors                 other LoRA files at the top of the model folder (e.g. kohya format)
    README.md                          the generated model card
    images/*                           a few sample images (validation images of the run, or those given)
    experiment_config.json             the run's config, every key named like token/secret/key removed

Before anything is sent, every file is checked not to contain the token.
``--model_path`` may be a run directory (its ``final_model/`` is published) or a model
folder (``final_model/``, ``best_model/``, ``checkpoint_epoch_N/`` or a copy of one).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import safe_open
from tqdm.auto import tqdm

from utils.core.layout import CONFIG_FILE, RunLayout
from utils.core.secrets import scrub
from utils.hub.card import CardFacts, render_card
from utils.hub.errors import HubError, hub_errors
from utils.hub.token import resolve_token
from utils.lora.files import LORA_WEIGHT_NAME, TRAINING_METADATA_KEY, read_metadata

logger = logging.getLogger(__name__)

DEFAULT_LICENSE = "openrail++"
DEFAULT_INSTANCE_PROMPT = "ghibli style"
MAX_SAMPLES = 4
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}
VALIDATION_IMAGE = re.compile(r"^epoch_(\d+)_prompt(\d+)_(\d+)\.png$")


@dataclass
class UploadPlan:
    """What will be committed: path in the repo -> local file or content."""

    files: dict[str, Path | bytes]
    facts: CardFacts
    model_dir: Path
    run_dir: Path | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class PublishResult:
    repo_id: str
    url: str
    commit_url: str
    pr_url: str | None = None


# ----------------------------------------------------------------------------- what to upload


def locate_model(model_path: str | os.PathLike) -> tuple[Path, Path | None]:
    """(model folder, run directory or None) for a run directory or a model folder."""
    path = Path(model_path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such folder (give a run directory or a model folder)")
    if RunLayout(path).has_model():
        return RunLayout(path).final_model, path
    if not any(path.glob("*.safetensors")):
        raise FileNotFoundError(f"{path}: no LoRA .safetensors file here and no final_model/ folder")
    run_dir = path.parent if (path.parent / CONFIG_FILE).is_file() else None
    return path, run_dir


def is_lora_file(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return any("lora" in key.lower() for key in handle.keys())
    except Exception:  # not a safetensors file at all (safetensors raises its own error types)
        return False


def lora_files(model_dir: Path) -> tuple[Path, Path | None]:
    """The diffusers-format LoRA file and, if present, one other (kohya-format) LoRA file."""
    candidates = sorted(p for p in model_dir.glob("*.safetensors") if p.is_file() and is_lora_file(p))
    diffusers = next((p for p in candidates if p.name == LORA_WEIGHT_NAME), None)
    others = [p for p in candidates if p.name != LORA_WEIGHT_NAME]
    if diffusers is None:
        if not others:
            raise FileNotFoundError(f"{model_dir}: no LoRA .safetensors file (none holds lora weights)")
        diffusers, others = others[0], others[1:]
    if len(others) > 1:
        logger.warning("%s: several extra LoRA files; publishing only %s", model_dir, others[0].name)
    return diffusers, (others[0] if others else None)


def load_run_config(run_dir: Path | None) -> dict | None:
    if run_dir is None or not (run_dir / CONFIG_FILE).is_file():
        return None
    try:
        return scrub(json.loads((run_dir / CONFIG_FILE).read_text(encoding="utf-8")))
    except json.JSONDecodeError as error:
        raise HubError(f"{run_dir / CONFIG_FILE}: not valid JSON ({error})") from error


def training_facts(lora_file: Path, config: dict | None) -> dict:
    """Training settings from the LoRA file's header, completed from the run config."""
    header = read_metadata(lora_file).get(TRAINING_METADATA_KEY)
    facts = json.loads(header) if header else {}
    for key in ("lora_rank", "lora_alpha", "resolution", "num_train_images", "learning_rate", "train_batch_size",
                "train_text_encoder", "use_rslora"):
        if facts.get(key) is None and config and config.get(key) is not None:
            facts[key] = config[key]
    if facts.get("base_model") is None and config:
        facts["base_model"] = config.get("pretrained_model_name_or_path")
    return scrub(facts)


def instance_prompt_for(training: dict, config: dict | None) -> str:
    """The caption phrase shared by most training images (the style trigger), else the first validation prompt."""
    tags = Counter(training.get("tag_frequency") or {})
    if tags:
        tag, count = tags.most_common(1)[0]
        if count * 2 >= (training.get("num_train_images") or count):
            return tag
    prompts = (config or {}).get("validation_prompt") or []
    return prompts[0] if prompts else DEFAULT_INSTANCE_PROMPT


def hub_base_model(name: str | None) -> str | None:
    """``name`` if it is a Hub repo id (not a local path), else None."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not name or os.path.exists(name) or name.count("/") != 1:
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def validation_samples(run_dir: Path | None, config: dict | None, epoch: int | None,
                       default_prompt: str) -> list[tuple[Path, str]]:
    """The run's validation images of the last epoch up to ``epoch``, one per prompt first."""
    folder = RunLayout(run_dir).validation if run_dir else None
    if folder is None or not folder.is_dir():
        return []
    found = [(int(m[1]), int(m[2]), int(m[3]), p) for p in folder.iterdir() if (m := VALIDATION_IMAGE.match(p.name))]
    epochs = sorted({e for e, *_ in found if epoch is None or e <= epoch}) or sorted({e for e, *_ in found})
    if not epochs:
        return []
    chosen = sorted((index, prompt, path) for e, prompt, index, path in found if e == epochs[-1])
    prompts = (config or {}).get("validation_prompt") or []
    return [(path, prompts[k] if k < len(prompts) else default_prompt) for _, k, path in chosen][:MAX_SAMPLES]


def explicit_samples(paths: list[str], default_prompt: str) -> list[tuple[Path, str]]:
    """Images given by the user: files, or folders of inference output (comparison grids with their prompts)."""
    samples: list[tuple[Path, str]] = []
    for name in paths:
        path = Path(name)
        if path.is_file():
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                raise HubError(f"{path}: not an image ({', '.join(sorted(IMAGE_SUFFIXES))})")
            samples.append((path, default_prompt))
        elif path.is_dir():
            samples.extend(_folder_samples(path, default_prompt))
        else:
            raise FileNotFoundError(f"{path}: sample image or folder not found")
    if len(samples) > MAX_SAMPLES:
        logger.warning("Publishing the first %d of %d sample images", MAX_SAMPLES, len(samples))
    return samples[:MAX_SAMPLES]


def _folder_samples(folder: Path, default_prompt: str) -> list[tuple[Path, str]]:
    samples = []
    for meta_path in sorted(folder.glob("metadata_prompt*_*.json")):
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        names = [meta["comparison_grid"]] if meta.get("comparison_grid") else meta.get("lora_images", [])
        samples += [(folder / n, meta.get("prompt") or default_prompt) for n in names if (folder / n).is_file()]
    if not samples:
        samples = [(p, default_prompt) for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    return samples


def _repo_image_names(samples: list[tuple[Path, str]]) -> list[str]:
    names: list[str] = []
    for index, (path, _) in enumerate(samples):
        name = f"images/{path.name}"
        names.append(name if name not in names else f"images/{index}_{path.name}")
    return names


def plan_upload(model_path: str | os.PathLike, repo_id: str, *, license_name: str = DEFAULT_LICENSE,
                base_model: str | None = None, instance_prompt: str | None = None,
                sample_images: list[str] | None = None) -> UploadPlan:
    """Decide exactly which files go to the Hub and write the model card (no network)."""
    model_dir, run_dir = locate_model(model_path)
    lora, kohya = lora_files(model_dir)
    config = load_run_config(run_dir)
    training = training_facts(lora, config)
    prompt = instance_prompt or instance_prompt_for(training, config)
    samples = (explicit_samples(sample_images, prompt) if sample_images
               else validation_samples(run_dir, config, training.get("epoch"), prompt))
    image_names = _repo_image_names(samples)
    notes = []
    hub_base = hub_base_model(base_model or training.get("base_model"))
    if base_model and hub_base is None:
        raise HubError(f"--base_model {base_model!r}: not a Hub repo id (namespace/name)")
    if hub_base is None:
        notes.append("the base model was a local path; pass --base_model <hub id> to name it in the card")
    facts = CardFacts(repo_id=repo_id, base_model=hub_base, license=license_name, instance_prompt=prompt,
                      training=training, weight_name=lora.name, kohya_weight_name=kohya.name if kohya else None,
                      samples=[(name, text) for name, (_, text) in zip(image_names, samples)],
                      has_config=config is not None)
    files: dict[str, Path | bytes] = {lora.name: lora}
    if kohya:
        files[kohya.name] = kohya
    files["README.md"] = render_card(facts).encode("utf-8")
    files.update({name: path for name, (path, _) in zip(image_names, samples)})
    if config is not None:
        files[CONFIG_FILE] = (json.dumps(config, indent=2, ensure_ascii=False, default=str) + "\n").encode("utf-8")
    return UploadPlan(files=files, facts=facts, model_dir=model_dir, run_dir=run_dir, notes=notes)


def ensure_no_secret(plan: UploadPlan, secrets: list[str]) -> None:
    """Refuse to publish when any file holds one of ``secrets`` (the token, typically)."""
    needles = [s.encode("utf-8") for s in secrets if s and len(s) >= 8]
    for name, source in plan.files.items():
        data = source if isinstance(source, bytes) else source.read_bytes()
        if any(needle in data for needle in needles):
            raise HubError(f"{name}: refusing to upload, it contains the Hub token")


# ----------------------------------------------------------------------------- repo id


def check_repo_id(repo_id: str, flag: str = "--repo_name") -> None:
    """Raise a HubError naming the flag when ``repo_id`` ("name" or "namespace/name") is not valid."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        if repo_id.count("/") > 1:
            raise HFValidationError("use 'name' or 'namespace/name'")
        validate_repo_id(repo_id)
    except HFValidationError as error:
        reason = str(error).strip().splitlines()[0]
        raise HubError(f"{flag} {repo_id!r}: not a valid Hub repo id ({reason})") from error


def check_hub_target(repo_id: str, token: str | None = None) -> None:
    """Checks that need no network, for the trainer to run before training starts."""
    check_repo_id(repo_id, "--hub_model_id")
    resolve_token(token)


def full_repo_id(api, repo_id: str) -> str:
    """``namespace/name``; a bare name goes to the token owner's namespace."""
    if "/" in repo_id:
        return repo_id
    return f"{api.whoami()['name']}/{repo_id}"


# ----------------------------------------------------------------------------- publishing


def publish(model_path: str | os.PathLike, repo_id: str, *, token: str | None = None, private: bool = False,
            license_name: str = DEFAULT_LICENSE, base_model: str | None = None, instance_prompt: str | None = None,
            sample_images: list[str] | None = None, commit_message: str | None = None,
            revision: str | None = None, create_pr: bool = False) -> PublishResult:
    """Create the repo if needed and commit the allow-listed files and the model card in one commit."""
    from huggingface_hub import HfApi

    check_repo_id(repo_id)
    lora_files(locate_model(model_path)[0])  # bad input fails here, before any network call
    token = resolve_token(token)
    api = HfApi(token=token)
    with hub_errors(f"repo {repo_id!r}"):
        repo_id = full_repo_id(api, repo_id)
        plan = plan_upload(model_path, repo_id, license_name=license_name, base_model=base_model,
                           instance_prompt=instance_prompt, sample_images=sample_images)
        for note in plan.notes:
            logger.warning("%s", note)
        ensure_no_secret(plan, [token])
        return _commit(api, plan, repo_id, private, commit_message, revision, create_pr)


def _commit(api, plan: UploadPlan, repo_id: str, private: bool, commit_message: str | None,
            revision: str | None, create_pr: bool) -> PublishResult:
    from huggingface_hub import CommitOperationAdd

    repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
    if revision and revision != "main" and not create_pr:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    operations: list = _stale_images(api, repo_id, revision, plan)
    with tqdm(total=len(plan.files), desc="Preparing files", unit="file") as bar:
        for path_in_repo, source in plan.files.items():
            operations.append(CommitOperationAdd(path_in_repo=path_in_repo,
                                                 path_or_fileobj=source if isinstance(source, bytes) else str(source)))
            bar.update(1)
    training = plan.facts.training
    message = commit_message or (f"Upload LoRA (rank {training.get('lora_rank', '?')}, "
                                 f"alpha {training.get('lora_alpha', '?')}, {training.get('steps', '?')} steps)")
    logger.info("Committing %d files to %s", len(plan.files), repo_id)
    info = api.create_commit(repo_id, operations, commit_message=message, revision=revision, create_pr=create_pr)
    url = str(repo_url) if not revision or revision == "main" or create_pr else f"{repo_url}/tree/{revision}"
    return PublishResult(repo_id=repo_id, url=url, commit_url=info.commit_url, pr_url=info.pr_url)


def _stale_images(api, repo_id: str, revision: str | None, plan: UploadPlan) -> list:
    """Deletions for sample images of an earlier upload that the new card no longer shows."""
    from huggingface_hub import CommitOperationDelete

    existing = api.list_repo_files(repo_id, revision=revision)
    return [CommitOperationDelete(path_in_repo=name) for name in existing
            if name.startswith("images/") and name not in plan.files]


def push_run_to_hub(run_dir: str | os.PathLike, repo_id: str, private: bool = False,
                    token: str | None = None) -> str:
    """What ``train_sdxl_lora.py --push_to_hub`` calls at the end of training (main process only).

    Publishes ``run_dir/final_model`` with the run's config, validation images and a model card;
    returns the repo URL. Raises HubError with a one-line message on failure.
    """
    result = publish(run_dir, repo_id, token=token, private=private)
    logger.info("Pushed %s to %s", Path(run_dir).name, result.url)
    return result.url
