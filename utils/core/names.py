"""Names the project writes in many places: the SDXL base model, file names and time formats.

Plain constants, no torch import, so argument parsers can use them.
"""

SDXL_BASE_ID = "stabilityai/stable-diffusion-xl-base-1.0"  # the original's base model (Hub id)
SDXL_BASE_MODEL_VERSION = "sdxl_base_v1-0"  # kohya's ss_base_model_version for it
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' save_lora_weights file name
CONFIG_FILE = "experiment_config.json"  # the original's per-run config file
TIMESTAMP_FORMAT = "%Y-%m-%d %H:%M:%S"  # the original's, in the logs, info files and sweep records
RUN_STAMP_FORMAT = "%Y%m%d_%H%M%S"  # the original's, in a run folder's name and experiment_config.json
