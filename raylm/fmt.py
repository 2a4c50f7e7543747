"""Formatting shared by every layer: secrets masked out of anything printed or logged.
Part of the spine: imports nothing else of raylm."""

from __future__ import annotations

import re

# user:password@ in a URI (an MLflow server behind basic auth, a proxy): never logged.
CREDENTIALS = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^/@\s:]+):[^/@\s]+@", re.IGNORECASE)


def redact(value: str) -> str:
    """The value with any URI password replaced by ***."""
    return CREDENTIALS.sub(r"\1:***@", value)
