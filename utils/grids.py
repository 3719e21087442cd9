"""Moved to utils.inference.grids (issue 16); this alias goes once every import is updated."""
import sys

from utils.inference import grids as _moved

sys.modules[__name__] = _moved
