"""The MagicBrush test set's folder layout, read and checked, and the names of generated images.

The test split (the zip the MagicBrush authors hand out) unpacks to::

    test/
      edit_sessions.json        {session: [{"input", "mask", "output", "instruction"}, ...]}
      local_descriptions.json   {session: {"<session>-output<k>.png": caption, ...}}
      global_descriptions.json  {session: {"<session>-input.png": caption, ...outputs...}}
      images/<session>/<session>-input.png, -output1.png, -mask1.png, -output2.png, ...

Turn k's ``input`` is the ground truth it starts from (the session's input image for turn 1,
``-output<k-1>.png`` after it); ``output`` is its ground-truth target. Generated images follow
the MagicBrush evaluation script's naming (its evaluation/README.md), under ``OUT/images``:
``<session>/<session>_1.png`` for turn 1 (shared by both settings: its input is the ground
truth either way), ``<session>_inde_<k>.png`` for turn k edited from its ground-truth input
(single-turn) and ``<session>_iter_<k>.png`` for turn k edited from the model's own turn k-1
(multi-turn). So the script's ``image_eval.py --generated_path OUT/images`` reads them too.

Everything is checked here, before any model loads: a missing or malformed file names the file
and the key.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

SESSIONS_FILE = "edit_sessions.json"
CAPTION_FILES = {"local": "local_descriptions.json", "global": "global_descriptions.json"}
TURN_FIELDS = ("input", "output", "instruction")


@dataclasses.dataclass(frozen=True)
class Turn:
    """One edit of a session: its ground-truth source and target, and the target's caption."""

    session: str
    number: int  # 1-based, as the file names count
    instruction: str
    source: Path  # ground truth this turn edits (single-turn input)
    target: Path  # ground truth it should produce
    caption: str | None  # the target's description (CLIP-T), when captions were read


@dataclasses.dataclass(frozen=True)
class Session:
    """A session's turns in order."""

    name: str
    turns: tuple[Turn, ...]


def first_output(out: Path, session: str) -> Path:
    """Turn 1's generated image: the same edit in both settings."""
    return out / session / f"{session}_1.png"


def single_turn_output(out: Path, turn: Turn) -> Path:
    """Turn k edited from its ground-truth input ('independent' in the script's naming)."""
    if turn.number == 1:
        return first_output(out, turn.session)
    return out / turn.session / f"{turn.session}_inde_{turn.number}.png"


def multi_turn_output(out: Path, turn: Turn) -> Path:
    """Turn k edited from the model's own turn k-1 ('iterative' in the script's naming)."""
    if turn.number == 1:
        return first_output(out, turn.session)
    return out / turn.session / f"{turn.session}_iter_{turn.number}.png"


def read_layout(
    data: str | Path, *, captions: str | None = "local", num: int | None = None
) -> list[Session]:
    """The sessions of a MagicBrush test folder (the first ``num``, in the file's order).

    ``captions``: 'local' (the script's README usage and the paper's CLIP-T) or 'global'
    descriptions of each target, or None to read none. Every turn's source and target must
    be a readable image; FileNotFoundError or ValueError otherwise, naming the file and key.
    """
    data = Path(data)
    if not data.is_dir():
        raise NotADirectoryError(f"{data} is not a folder (expected the MagicBrush test folder)")
    if captions is not None and captions not in CAPTION_FILES:
        raise ValueError(f"captions must be one of {sorted(CAPTION_FILES)}, got {captions!r}")
    if num is not None and num < 1:
        raise ValueError(f"--num must be at least 1, got {num}")
    sessions_file = data / SESSIONS_FILE
    raw = _read_json(sessions_file, data)
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{sessions_file}: expected a non-empty object {{session: [turns]}}")
    names = list(raw)[:num]
    caption_table = None
    if captions is not None:
        caption_file = data / CAPTION_FILES[captions]
        caption_table = _read_json(caption_file, data)
        if not isinstance(caption_table, dict):
            raise ValueError(f"{caption_file}: expected an object {{session: {{image: text}}}}")
    sessions = []
    for name in names:
        where = f"{sessions_file}[{name!r}]"
        _check_name(name, where)
        turns = raw[name]
        if not isinstance(turns, list) or not turns:
            raise ValueError(f"{where}: expected a non-empty list of turns")
        read = []
        for index, entry in enumerate(turns):
            fields = _turn_fields(entry, f"{where}[{index}]")
            target_name = fields["output"]
            read.append(
                Turn(
                    session=name,
                    number=index + 1,
                    instruction=fields["instruction"],
                    source=_image(data, name, fields["input"], f"{where}[{index}]['input']"),
                    target=_image(data, name, target_name, f"{where}[{index}]['output']"),
                    caption=None
                    if caption_table is None
                    else _caption(caption_table, data / CAPTION_FILES[captions], name, target_name),
                )
            )
        sessions.append(Session(name, tuple(read)))
    return sessions


def _read_json(path: Path, data: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {data} should be the MagicBrush test folder ({SESSIONS_FILE}, "
            f"{CAPTION_FILES['local']}, images/<session>/...)"
        )
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


def _check_name(name: str, where: str) -> None:
    """A session or image name is one path component: it names folders and files."""
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ValueError(f"{where}: {name!r} is not a plain file or folder name")


def _turn_fields(entry: Any, where: str) -> dict[str, str]:
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected an object with {', '.join(TURN_FIELDS)}")
    fields = {}
    for field in TURN_FIELDS:
        value = entry.get(field)
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{where}: missing or empty {field!r}")
        fields[field] = value
    return fields


def _image(data: Path, session: str, name: str, where: str) -> Path:
    """images/<session>/<name>, which must exist and open as an image (its header only)."""
    _check_name(name, where)
    path = data / "images" / session / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (named by {where})")
    try:
        with Image.open(path) as image:
            if image.width == 0 or image.height == 0:
                raise ValueError(f"{path} has zero size (named by {where})")
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{path}: not a readable image ({err}; named by {where})") from err
    return path


def _caption(table: dict, path: Path, session: str, image: str) -> str:
    entry = table.get(session)
    text = entry.get(image) if isinstance(entry, dict) else None
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{path}: no caption at [{session!r}][{image!r}] (CLIP-T needs one)")
    return text
