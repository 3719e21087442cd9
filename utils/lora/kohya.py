"""Moved (issue 16): the kohya LoRA format lives in utils/lora/kohya_names.py (names, records),
to_kohya.py (diffusers/PEFT -> kohya) and from_kohya.py (kohya -> diffusers). Phase 3 removes this file."""

from utils.lora.to_kohya import save_kohya_copy  # noqa: F401  # moved (issue 16)
