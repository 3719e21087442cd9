"""Names of the SDXL base model. The file names and time formats a run writes live in ``layout``; they are
importable from here too for the modules that always took them from here.

Plain constants, no torch import, so argument parsers can use them.
"""

from utils.core.layout import CONFIG_FILE, LORA_WEIGHT_NAME, RUN_STAMP_FORMAT, TIMESTAMP_FORMAT  # noqa: F401

SDXL_BASE_ID = "stabilityai/stable-diffusion-xl-base-1.0"  # the original's base model (Hub id)
SDXL_BASE_MODEL_VERSION = "sdxl_base_v1-0"  # kohya's ss_base_model_version for it
