"""Edit prompts files: JSONL, one {"input", "edit", "output", ...} object per line: the
output of `ip2p datagen instructions`, the input of `ip2p datagen pairs`, and the format of the
original release's human-written prompts (whose "caption" is our "input")."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

PROMPT_FIELDS = ("input", "edit", "output")
# The original's GPT output used "caption" for the input caption.
_ALIASES = {"caption": "input"}


def read_prompts(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The prompts of a JSONL file, one {"input", "edit", "output", ...} object per line (as
    `ip2p datagen instructions` writes, or the original's human-written-prompts.jsonl).
    Raises ValueError naming the file and line of a bad one."""
    path = Path(path)
    prompts = []
    with open(path, encoding="utf-8") as fp:
        for number, line in enumerate(fp, start=1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except ValueError as err:
                raise ValueError(f"{path}:{number}: not JSON ({err})") from err
            if not isinstance(raw, dict):
                raise ValueError(
                    f"{path}:{number}: expected a JSON object, got {type(raw).__name__}"
                )
            prompt = {_ALIASES.get(key, key): value for key, value in raw.items()}
            bad = [
                k
                for k in PROMPT_FIELDS
                if not isinstance(prompt.get(k), str) or not prompt[k].strip()
            ]
            if bad:
                raise ValueError(
                    f"{path}:{number}: needs non-empty string fields {list(PROMPT_FIELDS)}; "
                    f"missing or empty: {bad}"
                )
            prompts.append(prompt)
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts
