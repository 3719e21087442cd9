"""Moved to utils.sweep.clip_metrics (issue 16); this alias goes once every import is updated."""
import sys

from utils.sweep import clip_metrics as _moved

sys.modules[__name__] = _moved
