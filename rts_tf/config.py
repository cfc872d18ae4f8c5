"""Configuration files: YAML keys that stand for command-line options (defaults < file < flags)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from rts_tf.errors import InputError


def load_config(path: str | Path, allowed: set[str]) -> dict[str, Any]:
    """Read a YAML mapping of option names (dashes or underscores) to values; reject unknown keys."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise InputError(f"{path}: unreadable YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: a config file must be a mapping of option names to values")
    config = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in allowed:
            raise InputError(f"{path}: unknown key '{key}' (known keys: "
                             f"{', '.join(sorted(k.replace('_', '-') for k in allowed))})")
        config[name] = value
    return config
