"""Moved to tests/fakes/gemini_server.py (issue 16); this alias keeps the old import path until phase 3."""

from tests.fakes.gemini_server import *  # noqa: F401,F403  # moved (issue 16)
