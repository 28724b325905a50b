"""Where mergekit's command-line programs are (stdlib only)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def mergekit_command(name: str = "mergekit-yaml") -> str:
    """The path of a mergekit command (``mergekit-yaml``, ``mergekit-multi``): the one beside
    this interpreter (the one pip installed with it), else the first on PATH."""
    sibling = Path(sys.executable).with_name(name)
    return str(sibling) if sibling.exists() else (shutil.which(name) or name)
