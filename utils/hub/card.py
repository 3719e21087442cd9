"""The model card (README.md) of a published LoRA: YAML front matter for the Hub, then a short body.

The front matter follows the Hub's LoRA template (``template:sd-lora``): base model,
library, license, tags, the trigger (instance) prompt and widget entries that show the
sample images with their prompts. The body states how the adapter was trained and how
to load it in diffusers, ComfyUI and AUTOMATIC1111.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field

import yaml

from utils.core.names import SDXL_BASE_ID

CONVERT_HINT = "`python utils/convert_lora.py <folder>` (this project) writes `kohya_lora.safetensors`."
TAGS = ["text-to-image", "stable-diffusion-xl", "lora", "diffusers", "template:sd-lora"]


@dataclass
class CardFacts:
    repo_id: str
    base_model: str | None  # a Hub id, or None when the adapter was trained from a local copy
    license: str
    instance_prompt: str
    training: dict  # rank, alpha, steps, resolution, num_train_images... (missing keys are shown as "?")
    weight_name: str
    kohya_weight_name: str | None = None
    samples: list[tuple[str, str]] = field(default_factory=list)  # (path in repo, prompt)
    extra_tags: list[str] = field(default_factory=list)
    has_config: bool = False  # experiment_config.json is published too


def front_matter(facts: CardFacts) -> dict:
    metadata: dict = {}
    if facts.base_model:
        metadata["base_model"] = facts.base_model
    metadata.update(library_name="diffusers", license=facts.license, pipeline_tag="text-to-image",
                    tags=TAGS + [t for t in facts.extra_tags if t not in TAGS],
                    instance_prompt=facts.instance_prompt)
    if facts.samples:
        metadata["widget"] = [{"text": prompt, "output": {"url": path}} for path, prompt in facts.samples]
    return metadata


def _value(training: dict, key: str) -> str:
    value = training.get(key)
    return "?" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def _training_table(training: dict) -> str:
    rank, alpha = training.get("lora_rank"), training.get("lora_alpha")
    scale = f"{alpha / rank:g}" if rank and alpha is not None and not training.get("use_rslora") else "?"
    rows = [
        ("adapter type", training.get("lora_type") or "lora"),
        ("LoRA rank", _value(training, "lora_rank")),
        ("LoRA alpha", _value(training, "lora_alpha")),
        ("scale (alpha / rank)", scale),
        ("training steps", _value(training, "steps")),
        ("epochs", _value(training, "epoch")),
        ("resolution", _value(training, "resolution")),
        ("training images", _value(training, "num_train_images")),
        ("learning rate", _value(training, "learning_rate")),
        ("batch size", _value(training, "train_batch_size")),
        ("text encoders trained", _value(training, "train_text_encoder")),
    ]
    return "\n".join(["| setting | value |", "| --- | --- |"] + [f"| {name} | {value} |" for name, value in rows])


def _usage(facts: CardFacts) -> str:
    base = facts.base_model or SDXL_BASE_ID
    kohya = (f"`{facts.kohya_weight_name}` (kohya format)" if facts.kohya_weight_name
             else f"`{facts.weight_name}`")
    return f"""## Use it with diffusers

```python
import torch
from diffusers import StableDiffusionXLPipeline

pipe = StableDiffusionXLPipeline.from_pretrained("{base}", torch_dtype=torch.float16).to("cuda")
pipe.load_lora_weights("{facts.repo_id}", weight_name="{facts.weight_name}", adapter_name="style")
pipe.set_adapters(["style"], adapter_weights=[0.8])  # LoRA strength: 0 = base model, 1 = full style
image = pipe({json.dumps(facts.instance_prompt)}, num_inference_steps=30, guidance_scale=5.0).images[0]
image.save("ghibli.png")
```

Or with this project's script:

```bash
python hf/hf_inference.py --base_model_id {base} --lora_model_id {facts.repo_id} \\
    --prompt {shlex.quote(facts.instance_prompt)} --lora_scale 0.8 --seed 42
```

## Use it in ComfyUI or AUTOMATIC1111

Download {kohya} into `ComfyUI/models/loras/` (ComfyUI) or `stable-diffusion-webui/models/Lora/`
(AUTOMATIC1111 / Forge). In ComfyUI, add a *Load LoRA* node between the SDXL checkpoint loader and the
sampler; in AUTOMATIC1111, add `<lora:{kohya_stem(facts)}:0.8>` to the prompt. Use an SDXL base checkpoint.
{"" if facts.kohya_weight_name else "If your UI does not read the diffusers-format file, convert it first: " + CONVERT_HINT}
"""


def kohya_stem(facts: CardFacts) -> str:
    name = facts.kohya_weight_name or facts.weight_name
    return name.rsplit(".", 1)[0]


def render_card(facts: CardFacts) -> str:
    """README.md text: ``---`` YAML ``---`` then Markdown."""
    yaml_text = yaml.safe_dump(front_matter(facts), sort_keys=False, allow_unicode=True)
    base = f"[{facts.base_model}](https://huggingface.co/{facts.base_model})" if facts.base_model \
        else "a local copy of SDXL base 1.0"
    samples = "\n".join(f"![{prompt}]({path})" for path, prompt in facts.samples)
    files = [f"- `{facts.weight_name}`: the LoRA in the diffusers format"]
    if facts.kohya_weight_name:
        files.append(f"- `{facts.kohya_weight_name}`: the same LoRA in the kohya format (ComfyUI, AUTOMATIC1111)")
    if facts.has_config:
        files.append("- `experiment_config.json`: the training settings (secrets removed)")
    return f"""---
{yaml_text}---

# {facts.repo_id.split("/")[-1]}

A LoRA adapter for Stable Diffusion XL that paints in a Studio Ghibli-like style, trained on top of {base}.
Trigger prompt: `{facts.instance_prompt}`.

{samples}

## Training

{_training_table(facts.training)}

{_usage(facts)}
## Files

{chr(10).join(files)}
"""
