"""Moved to utils.core.sdxl (issue 16); this alias goes once every import is updated."""
import sys

from utils.core import sdxl as _moved

sys.modules[__name__] = _moved
