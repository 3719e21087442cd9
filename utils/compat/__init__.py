"""Compatibility with the original repository, gathered in one place.

The original's importable helpers, its record and metadata layouts, its status values and the fallbacks
for runs it wrote. Core modules do not narrate the original; what its users rely on lives here, and the
entry scripts re-export from it.
"""
