"""Moved to utils.core.atomic (issue 16); this alias goes once every import is updated."""
import sys

from utils.core import atomic as _moved

sys.modules[__name__] = _moved
