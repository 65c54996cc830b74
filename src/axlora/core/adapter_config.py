"""Reading a peft ``adapter_config.json``: one definition for every layer that looks at an adapter.

Continuing a LoRA (model) and merging one (merge) read the same file; each adds its own checks and
context to the errors raised here, which always name the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from axlora.core.errors import UserError
from axlora.core.names import ADAPTER_CONFIG, ADAPTER_WEIGHTS


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    """The JSON object in ``adapter_dir/adapter_config.json``; ``UserError`` naming the file when there is none."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} is missing; expected a PEFT adapter directory ({ADAPTER_CONFIG} + "
                        f"{ADAPTER_WEIGHTS})") from None
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or bad UTF-8
        raise UserError(f"cannot read {path}: {exc}; expected a PEFT {ADAPTER_CONFIG}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a PEFT adapter config (expected a JSON object)")
    return data
