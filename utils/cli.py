"""Moved to utils.core.cli (issue 16); this alias goes once every import is updated."""
import sys

from utils.core import cli as _moved

sys.modules[__name__] = _moved
