"""Importers for the two public InstructPix2Pix dataset formats, yielding schema examples.

1. The original release's folder format (timothybrooks/instruct-pix2pix,
   `dataset_creation/generate_img_dataset.py` + `prepare_dataset.py`)::

       seeds.json                  [["0000000", ["123", "456"]], ...]  sorted by prompt dir
       0000000/prompt.json         {"input": ..., "edit": ..., "output": ..., "url": ...}
       0000000/123_0.jpg           input image of seed 123
       0000000/123_1.jpg           edited image of seed 123
       0000000/metadata.jsonl      {"seed": 123, "p2p_threshold": ..., "clip_sim_dir": ...}

   `import_original(folder, split)` splits the prompts (not the images) exactly as the original
   `edit_dataset.py` does, so "train" / "validation" / "test" hold the same prompts as its
   "train" / "val" / "test"; every kept seed of a prompt becomes one example.

2. The hub parquet sets: `timbrooks/instructpix2pix-clip-filtered` (captions + instruction) and
   `fusing/instructpix2pix-1000-samples` (instruction only). `import_parquet(paths)` streams
   them batch by batch. They carry no split column: `split_by_key` is a stable hash split
   over the example keys, and `import_parquet(paths, split=...)` applies it.

Images are passed through as the stored JPEG/PNG bytes, never decoded, so a later
write -> read is byte-exact. Bad data (missing or non-image files, unreadable prompt.json,
empty instructions) never stops a stream: the example is skipped, counted in an
`ImportReport`, and one `DataImportWarning` at the end of the stream sums the skips up.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ip2p_jax.data.schema import FLOAT_FIELDS, ExampleError, image_format, make_example
from ip2p_jax.weights.atomic import write_text_atomically

SPLIT_NAMES = ("train", "validation", "test")
ORIGINAL_SPLITS = (0.9, 0.05, 0.05)  # edit_dataset.py's default `splits`
DEFAULT_FRACTIONS: Mapping[str, float] = MappingProxyType(
    {"train": 0.9, "validation": 0.05, "test": 0.05}
)

# Hub parquet schemas, told apart by their column names.
CLIP_FILTERED_COLUMNS = (
    "original_prompt",
    "original_image",
    "edit_prompt",
    "edited_prompt",
    "edited_image",
)
SAMPLES_1000_COLUMNS = ("input_image", "edit_prompt", "edited_image")

_SHOWN_PER_REASON = 3  # paths kept per skip reason for the warning


class DataImportWarning(UserWarning):
    """End-of-stream summary of the examples an importer skipped or left incomplete."""


@dataclass
class ImportReport:
    """What one import stream did; pass one in as `report=` and read it after iterating.

    `skipped` counts dropped examples per reason ("missing_image", "not_an_image",
    "bad_prompt_json", "empty_instruction", "bad_seed", "invalid_example");
    `examples_of_skips` keeps the first few paths or keys per reason. `unknown_metadata`
    counts imported examples whose metadata.jsonl line was missing (their floats are NaN).
    """

    source: str = ""
    imported: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    examples_of_skips: dict[str, list[str]] = field(default_factory=dict)
    unknown_metadata: int = 0
    examples_of_unknown_metadata: list[str] = field(default_factory=list)

    @property
    def total_skipped(self) -> int:
        """Examples dropped for any reason."""
        return sum(self.skipped.values())

    def skip(self, reason: str, where: str | Path) -> None:
        """Counts one dropped example under `reason`, keeping the first few locations."""
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        shown = self.examples_of_skips.setdefault(reason, [])
        if len(shown) < _SHOWN_PER_REASON:
            shown.append(str(where))

    def note_unknown_metadata(self, where: str | Path) -> None:
        """Counts one imported example that has no metadata line."""
        self.unknown_metadata += 1
        if len(self.examples_of_unknown_metadata) < _SHOWN_PER_REASON:
            self.examples_of_unknown_metadata.append(str(where))

    def summary(self) -> str:
        """One paragraph: imported, skipped per reason with example paths, unknown metadata."""
        lines = [f"{self.source}: imported {self.imported}, skipped {self.total_skipped}"]
        for reason, count in sorted(self.skipped.items()):
            lines.append(f"  {reason}: {count}, e.g. {self.examples_of_skips[reason]}")
        if self.unknown_metadata:
            lines.append(
                f"  no metadata.jsonl line (metadata left unknown): {self.unknown_metadata}, "
                f"e.g. {self.examples_of_unknown_metadata}"
            )
        return "\n".join(lines)

    def warn_if_incomplete(self) -> None:
        """Issues one DataImportWarning with the summary if anything was skipped or unknown."""
        if self.skipped or self.unknown_metadata:
            warnings.warn(self.summary(), DataImportWarning, stacklevel=3)


# --------------------------------------------------------------------------------------------
# The original folder format
# --------------------------------------------------------------------------------------------


def write_seeds_json(folder: str | Path) -> Path:
    """Writes `folder/seeds.json` the way the original `prepare_dataset.py` does: for every
    prompt dir, the seeds of its `*_0.jpg` files (as strings, in sorted file-name order), dirs
    without any left out, the list sorted by dir name. Hidden dirs (a writer's staging) are
    not prompts. Returns the file's path."""
    root = _existing_folder(folder)
    seeds = []
    for prompt_dir in root.iterdir():
        # Hidden folders are a writer's staging (`.0000012.xxxx`), never a finished prompt.
        if prompt_dir.is_dir() and not prompt_dir.name.startswith("."):
            prompt_seeds = [p.name.split("_")[0] for p in sorted(prompt_dir.glob("*_0.jpg"))]
            if prompt_seeds:
                seeds.append((prompt_dir.name, prompt_seeds))
    seeds.sort()
    # Atomic: shards of `ip2p datagen pairs` on several hosts may each rewrite it.
    return write_text_atomically(root / "seeds.json", json.dumps(seeds))


def split_bounds(n: int, splits: Sequence[float] = ORIGINAL_SPLITS) -> dict[str, tuple[int, int]]:
    """[start, stop) prompt indices of each split among `n` prompts, with the original
    `edit_dataset.py` arithmetic (float sums, `math.floor(fraction * n)`), so the boundaries
    match its "train" / "val" / "test" ("val" is our "validation")."""
    _check_splits(splits)
    edges = {
        "train": (0.0, splits[0]),
        "validation": (splits[0], splits[0] + splits[1]),
        "test": (splits[0] + splits[1], 1.0),
    }
    return {name: (math.floor(a * n), math.floor(b * n)) for name, (a, b) in edges.items()}


def read_seeds(folder: str | Path) -> list[tuple[str, list[str]]]:
    """The (prompt dir, seeds) list of `folder/seeds.json`; FileNotFoundError saying how to
    create it when it is missing, ValueError when it is not the original's layout."""
    root = _existing_folder(folder)
    path = root / "seeds.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: the original format lists its prompts and seeds there. Create "
            f"it as the original prepare_dataset.py does, with "
            f"ip2p_jax.data.importers.write_seeds_json({str(root)!r})"
        )
    try:
        with open(path) as fp:
            raw = json.load(fp)
        seeds = [_seeds_entry(entry) for entry in raw]
    except (TypeError, ValueError) as err:  # JSONDecodeError is a ValueError
        raise ValueError(
            f"{path}: expected a JSON list of [prompt_dir, [seed, ...]] pairs ({err})"
        ) from err
    return seeds


def _seeds_entry(entry: Any) -> tuple[str, list[str]]:
    """One seeds.json entry [prompt_dir, [seed, ...]] with str names and seeds."""
    if not isinstance(entry, list | tuple) or len(entry) != 2 or not isinstance(entry[1], list):
        raise ValueError(f"bad entry {entry!r}")
    return str(entry[0]), [str(seed) for seed in entry[1]]


def original_split_names(
    folder: str | Path, *, splits: Sequence[float] = ORIGINAL_SPLITS
) -> dict[str, list[str]]:
    """The prompt dir names of each split ("train", "validation", "test") of an original
    dataset folder, split over the seeds.json prompts exactly as the original."""
    seeds = read_seeds(folder)
    return {
        name: [prompt for prompt, _ in seeds[start:stop]]
        for name, (start, stop) in split_bounds(len(seeds), splits).items()
    }


def import_original(
    folder: str | Path,
    split: str,
    *,
    splits: Sequence[float] = ORIGINAL_SPLITS,
    report: ImportReport | None = None,
) -> Iterator[dict[str, Any]]:
    """Examples of one split ("train", "validation" or "test") of an original-format folder.

    One example per (prompt dir, seed) of the split's prompts, in seeds.json order, keyed
    `"{prompt_dir}/{seed}"`: instruction = prompt.json "edit", input/edited caption = its
    "input"/"output", seed, and the six metadata.jsonl floats (NaN where the seed has no
    line). A bad folder, split name or `splits` raises here, before iterating; bad data
    (missing image, unreadable prompt.json, non-image bytes) is skipped and counted in
    `report`, with one DataImportWarning when the stream ends.
    """
    _check_split_name(split)
    _check_splits(splits)
    root = _existing_folder(folder)
    seeds = read_seeds(root)
    start, stop = split_bounds(len(seeds), splits)[split]
    report = report if report is not None else ImportReport()
    report.source = report.source or f"{root} [{split}]"
    return _original_examples(root, seeds[start:stop], report)


def _original_examples(
    root: Path, seeds: Iterable[tuple[str, list[str]]], report: ImportReport
) -> Iterator[dict[str, Any]]:
    for name, prompt_seeds in seeds:
        prompt_dir = root / name
        prompt = _read_prompt(prompt_dir / "prompt.json")
        metadata = _read_metadata(prompt_dir / "metadata.jsonl")
        for seed in prompt_seeds:
            example = _original_example(prompt_dir, name, seed, prompt, metadata, report)
            if example is not None:
                report.imported += 1
                yield example
    report.warn_if_incomplete()


def _original_example(
    prompt_dir: Path,
    name: str,
    seed: str,
    prompt: dict[str, str] | None,
    metadata: dict[int, dict[str, float]],
    report: ImportReport,
) -> dict[str, Any] | None:
    """One (prompt, seed) example, or None after counting why it was skipped."""
    key = f"{name}/{seed}"
    if prompt is None:
        report.skip("bad_prompt_json", prompt_dir / "prompt.json")
        return None
    if not prompt["edit"].strip():
        report.skip("empty_instruction", prompt_dir / "prompt.json")
        return None
    try:
        seed_int = int(seed)
    except ValueError:
        report.skip("bad_seed", key)
        return None
    images = []
    for index in (0, 1):
        path = prompt_dir / f"{seed}_{index}.jpg"
        data = _read_bytes(path)
        if data is None:
            report.skip("missing_image", path)
            return None
        if image_format(data) is None:
            report.skip("not_an_image", path)
            return None
        images.append(data)
    floats = metadata.get(seed_int)
    if floats is None:
        report.note_unknown_metadata(f"{prompt_dir / 'metadata.jsonl'} (seed {seed})")
    return _make(
        report,
        key,
        *images,
        instruction=prompt["edit"],
        input_caption=prompt["input"],
        edited_caption=prompt["output"],
        seed=seed_int,
        **(floats or {}),
    )


def _read_prompt(path: Path) -> dict[str, str] | None:
    """prompt.json's input/edit/output strings (other keys such as "url" dropped), or None
    when the file is missing, not JSON, or has no string "edit"."""
    try:
        with open(path) as fp:
            raw = json.load(fp)
    except (OSError, ValueError):
        return None
    if not isinstance(raw, dict) or not isinstance(raw.get("edit"), str):
        return None
    prompt = {"edit": raw["edit"]}
    for name in ("input", "output"):
        value = raw.get(name, "")
        if not isinstance(value, str):
            return None
        prompt[name] = value
    return prompt


def _read_metadata(path: Path) -> dict[int, dict[str, float]]:
    """metadata.jsonl as seed -> the schema's float fields; unreadable lines are ignored (their
    seeds then count as having unknown metadata), a missing file gives {}."""
    try:
        text = path.read_text()
    except OSError:
        return {}
    metadata: dict[int, dict[str, float]] = {}
    for line in text.splitlines():
        try:
            row = json.loads(line)
            metadata[int(row["seed"])] = {
                name: float(row[name]) for name in FLOAT_FIELDS if row.get(name) is not None
            }
        except (ValueError, TypeError, KeyError):
            continue
    return metadata


# --------------------------------------------------------------------------------------------
# Hub parquet sets
# --------------------------------------------------------------------------------------------


def split_by_key(key: str, fractions: Mapping[str, float] = DEFAULT_FRACTIONS) -> str:
    """A stable split name for an example key, for sets without a split column.

    The first 53 bits of sha256(key) make a number u in [0, 1); the key goes to the first
    split whose cumulative fraction (in `fractions`' order) exceeds u. The same key always
    lands in the same split, on any machine and Python version, and the split sizes follow
    `fractions` up to sampling noise. Changing `fractions` moves only keys near the edges.
    """
    _check_fractions(fractions)
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    # 53 bits, so the float division is exact and u stays below 1.
    u = (int.from_bytes(digest[:8], "big") >> 11) / 2**53
    cumulative = 0.0
    for name, fraction in fractions.items():
        cumulative += fraction
        if u < cumulative:
            return name
    return next(name for name, fraction in reversed(fractions.items()) if fraction > 0)


def parquet_files(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    """The parquet files named by `paths`: a file, a folder (every `*.parquet` under it,
    sorted), or a list of either. Raises on missing paths, no files, or repeated file stems
    (the stem starts every key, so two equal stems would give equal keys)."""
    items = [paths] if isinstance(paths, str | Path) else list(paths)
    files: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(path.rglob("*.parquet"))
            if not found:
                raise FileNotFoundError(f"no *.parquet files under {path}")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{path} not found (expected a parquet file or a folder)")
    if not files:
        raise ValueError("no parquet paths given")
    stems: dict[str, Path] = {}
    for path in files:
        if path.stem in stems:
            raise ValueError(
                f"{stems[path.stem]} and {path} share the file stem {path.stem!r}, which "
                f"starts every example key; import them separately or rename one"
            )
        stems[path.stem] = path
    return files


def parquet_schema(path: str | Path) -> tuple[str, ...]:
    """The columns an InstructPix2Pix parquet file is read by: CLIP_FILTERED_COLUMNS or
    SAMPLES_1000_COLUMNS, told from its column names; ValueError naming the file and the
    columns otherwise."""
    import pyarrow.parquet as pq

    columns = pq.read_schema(path).names
    for expected in (CLIP_FILTERED_COLUMNS, SAMPLES_1000_COLUMNS):
        if set(expected) <= set(columns):
            return expected
    raise ValueError(
        f"{path}: unknown parquet schema, columns {columns}; expected the columns of "
        f"timbrooks/instructpix2pix-clip-filtered {list(CLIP_FILTERED_COLUMNS)} or of "
        f"fusing/instructpix2pix-1000-samples {list(SAMPLES_1000_COLUMNS)}"
    )


def import_parquet(
    paths: str | Path | Sequence[str | Path],
    *,
    split: str | None = None,
    fractions: Mapping[str, float] = DEFAULT_FRACTIONS,
    batch_size: int = 32,
    report: ImportReport | None = None,
) -> Iterator[dict[str, Any]]:
    """Examples of hub InstructPix2Pix parquet files, streamed `batch_size` rows at a time.

    `paths`: a parquet file, a folder (all `*.parquet` under it, sorted) or a list. Keys are
    `"{file_stem}/{row_index}"`; instruction = edit_prompt, input_caption = original_prompt,
    edited_caption = edited_prompt ("" for the 1000-sample set, which has no captions); seed
    and metadata unknown. With `split`, only rows whose key `split_by_key(key, fractions)`
    puts in that split. Paths and schemas are checked here, before iterating; rows with
    missing or non-image images or an empty instruction are skipped and counted in
    `report`, with one DataImportWarning when the stream ends.
    """
    if split is not None and split not in fractions:
        raise ValueError(f"unknown split {split!r}; expected one of {list(fractions)}")
    _check_fractions(fractions)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    files = parquet_files(paths)
    schemas = [parquet_schema(path) for path in files]
    report = report if report is not None else ImportReport()
    report.source = report.source or (str(files[0]) if len(files) == 1 else f"{len(files)} files")
    return _parquet_examples(files, schemas, split, fractions, batch_size, report)


def _parquet_examples(
    files: list[Path],
    schemas: list[tuple[str, ...]],
    split: str | None,
    fractions: Mapping[str, float],
    batch_size: int,
    report: ImportReport,
) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    for path, columns in zip(files, schemas, strict=True):
        row_index = 0
        # iter_batches reads one row group at a time, so a multi-GB shard never sits whole
        # in memory; only the needed columns are read.
        for batch in pq.ParquetFile(path).iter_batches(
            batch_size=batch_size, columns=list(columns)
        ):
            rows = batch.to_pylist()
            for row in rows:
                key = f"{path.stem}/{row_index}"
                row_index += 1
                if split is not None and split_by_key(key, fractions) != split:
                    continue
                example = _parquet_example(path, key, row, report)
                if example is not None:
                    report.imported += 1
                    yield example
    report.warn_if_incomplete()


def _parquet_example(
    path: Path, key: str, row: dict[str, Any], report: ImportReport
) -> dict[str, Any] | None:
    """One parquet row as an example, or None after counting why it was skipped."""
    where = f"{path}#{key.rsplit('/', 1)[1]}"
    input_column = "original_image" if "original_image" in row else "input_image"
    images = []
    for column in (input_column, "edited_image"):
        data = _image_bytes(row[column], path.parent)
        if data is None:
            report.skip("missing_image", f"{where} {column}")
            return None
        if image_format(data) is None:
            report.skip("not_an_image", f"{where} {column}")
            return None
        images.append(data)
    instruction = row["edit_prompt"]
    if not isinstance(instruction, str) or not instruction.strip():
        report.skip("empty_instruction", where)
        return None
    return _make(
        report,
        key,
        *images,
        instruction=instruction,
        input_caption=row.get("original_prompt") or "",
        edited_caption=row.get("edited_prompt") or "",
    )


def _image_bytes(value: Any, base: Path) -> bytes | None:
    """The encoded bytes of a Hugging Face `datasets` Image value ({bytes, path} struct, or
    plain bytes): the stored bytes, else the file at `path` relative to the parquet file's
    folder; None when neither is there."""
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if not isinstance(value, dict):
        return None
    if value.get("bytes") is not None:
        return bytes(value["bytes"])
    if value.get("path"):
        return _read_bytes(base / value["path"])
    return None


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def _make(
    report: ImportReport, key: str, input_image: bytes, edited_image: bytes, **fields: Any
) -> dict[str, Any] | None:
    """make_example, with any ExampleError it still finds counted instead of raised."""
    try:
        return make_example(input_image, edited_image, key=key, **fields)
    except ExampleError:
        report.skip("invalid_example", key)
        return None


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _existing_folder(folder: str | Path) -> Path:
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} not found")
    return root


def _check_split_name(split: str) -> None:
    if split not in SPLIT_NAMES:
        raise ValueError(
            f"unknown split {split!r}; expected one of {list(SPLIT_NAMES)} (the original's "
            f'"val" is "validation")'
        )


def _check_splits(splits: Sequence[float]) -> None:
    # The original asserts sum(splits) == 1; isclose also takes e.g. (0.8, 0.1, 0.1).
    if len(splits) != 3 or any(s < 0 for s in splits) or not math.isclose(sum(splits), 1.0):
        raise ValueError(
            f"splits must be three non-negative fractions (train, validation, test) summing "
            f"to 1, got {tuple(splits)}"
        )


def _check_fractions(fractions: Mapping[str, float]) -> None:
    values = list(fractions.values())
    if not values or any(v < 0 for v in values) or not math.isclose(sum(values), 1.0):
        raise ValueError(f"fractions must be non-negative and sum to 1, got {dict(fractions)}")
