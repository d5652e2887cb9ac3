"""Stage 1 of the InstructPix2Pix data generator: captions -> (instruction, edited caption).

Follows ``dataset_creation/generate_txt_dataset.py`` of timothybrooks/instruct-pix2pix: the
LLM sees ``caption + DELIMITER_0`` and writes ``instruction + DELIMITER_1 + edited caption``,
ending at ``STOP``. A batch's accepted results are appended to a JSONL file as soon as its
tries are done, so a killed job resumes where it stopped. Output lines use the keys of the
original release's human-written prompts file: ``{"input": caption, "edit": instruction,
"output": edited caption}`` plus ``"id"`` and any other fields of the input line.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

if TYPE_CHECKING:
    from datagen.llm import Backend

DELIMITER_0 = "\n##\n"
DELIMITER_1 = "\n%%\n"
STOP = "\nEND"

# Rejection reasons, per try (see `parse_completion` and `generate_instructions`).
MALFORMED = "malformed"
EMPTY = "empty"
UNCHANGED = "unchanged"
DUPLICATE = "duplicate"
REJECTION_REASONS = (MALFORMED, EMPTY, UNCHANGED, DUPLICATE)

# Input JSONL fields that may hold the caption, in order of preference.
CAPTION_FIELDS = ("caption", "input", "TEXT", "text")
# Input JSONL fields that may hold the caption's id, in order of preference.
ID_FIELDS = ("id", "url")

# Hand-written (caption, instruction, edited caption) examples in the spirit of the paper's
# human-written prompts, for prompting a plain (not fine-tuned) causal LM.
DEFAULT_EXAMPLES: tuple[tuple[str, str, str], ...] = (
    ("a photo of a dog on the beach", "make it a cat", "a photo of a cat on the beach"),
    (
        "a red car parked on a city street",
        "make it a watercolor painting",
        "a watercolor painting of a red car parked on a city street",
    ),
    (
        "a cabin in the woods in summer",
        "make it winter",
        "a cabin in the woods in winter, covered in snow",
    ),
    (
        "portrait of a man with a beard",
        "give him sunglasses",
        "portrait of a man with a beard wearing sunglasses",
    ),
)


@dataclass(frozen=True)
class Caption:
    """One input caption: its text, its id and the other fields of its input line."""

    text: str
    id: str
    extra: dict = field(default_factory=dict)


@dataclass
class SamplingConfig:
    """LLM sampling settings; the defaults are the original generator's."""

    temperature: float = 0.7
    top_p: float = 1.0
    frequency_penalty: float = 0.1
    presence_penalty: float = 0.0
    max_tokens: int = 256
    retries: int = 3  # a caption gets 1 + retries tries


@dataclass
class InstructionSummary:
    """What a `generate_instructions` run did."""

    generated: int = 0  # accepted and written by this run
    resumed: int = 0  # lines already in the output file
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> tries
    failed_captions: int = 0  # captions whose every try was rejected
    duplicate_captions: int = 0  # input captions seen before in the input, skipped
    truncated_torn_line: bool = False  # the output file ended in a partly written line

    @property
    def total(self) -> int:
        """Lines in the output file after the run."""
        return self.generated + self.resumed

    def describe(self) -> str:
        """One readable paragraph."""
        rejected = sum(self.rejected.values())
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(self.rejected.items()) if n)
        text = (
            f"Wrote {self.generated} new instruction(s); {self.resumed} were already in the "
            f"output file ({self.total} in total). {rejected} tr{'y' if rejected == 1 else 'ies'} "
            f"rejected{f' ({reasons})' if reasons else ''}; {self.failed_captions} caption(s) "
            f"failed every try; {self.duplicate_captions} duplicate input caption(s) skipped."
        )
        if self.truncated_torn_line:
            text += " A partly written last line of the output file was removed."
        return text


def read_captions(path: str | os.PathLike) -> list[Caption]:
    """Read captions from a ``.txt`` (one per line) or ``.jsonl`` file.

    JSONL lines are objects with the caption in one of `CAPTION_FIELDS` and an optional id in
    one of `ID_FIELDS`; without one the id is the 0-based line number. Blank lines are skipped.
    Raises ValueError naming the file and line for bad JSON or a missing caption field.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl"):
        raise ValueError(f"{path}: expected a .txt or .jsonl captions file, got {suffix!r}")
    # Split on "\n" only: str.splitlines() would also split at U+0085 or U+2028, which occur
    # inside web captions and inside JSON strings.
    with open(path, encoding="utf-8", newline="") as f:
        lines = [line.removesuffix("\r") for line in f.read().split("\n")]
    if suffix == ".txt":
        return [
            Caption(text=line.strip(), id=str(number), extra={})
            for number, line in enumerate(lines)
            if line.strip()
        ]
    return [
        caption
        for number, line in enumerate(lines)
        if line.strip() and (caption := _caption_from_json(path, number, line)).text
    ]


def _caption_from_json(path: Path, number: int, line: str) -> Caption:
    where = f"{path}, line {number + 1}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    key = next((k for k in CAPTION_FIELDS if k in record), None)
    if key is None:
        raise ValueError(
            f"{where}: no caption field; expected one of {', '.join(CAPTION_FIELDS)} "
            f"(found {', '.join(record) or 'none'})"
        )
    text = record[key]
    if not isinstance(text, str):
        raise ValueError(f"{where}: field {key!r} must be a string, got {type(text).__name__}")
    id_key = next((k for k in ID_FIELDS if record.get(k) is not None), None)
    caption_id = str(record[id_key]) if id_key else str(number)
    extra = {k: v for k, v in record.items() if k != key}
    return Caption(text=text.strip(), id=caption_id, extra=extra)


def read_examples(path: str | os.PathLike) -> list[tuple[str, str, str]]:
    """Hand-written ``(caption, instruction, edited caption)`` examples from a prompts JSONL.

    The file is read by `datagen.prompts.read_prompts` (one {"input", "edit", "output"} object
    a line; "caption" is accepted for "input"). Fields are stripped, as captions are. Raises
    ValueError naming the file and line of a bad object, or of a field holding one of the
    format's delimiters (which would make the prompt ambiguous to the model and the parser).
    """
    from datagen.prompts import read_prompts

    path = Path(path)
    prompts = read_prompts(path)
    markers = {"DELIMITER_0": DELIMITER_0, "DELIMITER_1": DELIMITER_1, "STOP": STOP}
    for prompt, number in zip(prompts, _nonblank_line_numbers(path), strict=True):
        for key in ("input", "edit", "output"):
            for name, marker in markers.items():
                if marker in prompt[key]:
                    raise ValueError(
                        f"{path}:{number}: field {key!r} holds the format's {name} "
                        f"{marker!r}; an example must not contain {DELIMITER_0!r}, "
                        f"{DELIMITER_1!r} or {STOP!r}"
                    )
    return [(p["input"].strip(), p["edit"].strip(), p["output"].strip()) for p in prompts]


def _nonblank_line_numbers(path: Path) -> list[int]:
    # The 1-based numbers of the lines read_prompts turns into prompts: it skips blank ones.
    with open(path, encoding="utf-8") as fp:
        return [number for number, line in enumerate(fp, start=1) if line.strip()]


def format_example(caption: str, instruction: str, edited: str) -> str:
    """One finished example in the paper's format, as the fine-tuned model was trained on."""
    return caption + DELIMITER_0 + instruction + DELIMITER_1 + edited + STOP


def few_shot_prefix(examples: Sequence[tuple[str, str, str]] = DEFAULT_EXAMPLES) -> str:
    """The examples part of `few_shot_prompt`; ``prefix + caption + DELIMITER_0`` is the prompt."""
    return "".join(format_example(*example) + "\n\n" for example in examples)


def few_shot_prompt(
    caption: str, examples: Sequence[tuple[str, str, str]] = DEFAULT_EXAMPLES
) -> str:
    """A prompt for a plain causal LM: the examples in the paper's format, then the caption."""
    return few_shot_prefix(examples) + caption + DELIMITER_0


def _normalize(text: str) -> str:
    # The original generator's "did the caption change" comparison.
    return text.strip().strip(".!?").lower()


def parse_completion(caption: str, completion: str) -> tuple[str, str] | str:
    """Parse a completion into ``(instruction, edited caption)``, or return the rejection reason.

    The completion is cut at the first `STOP` (for backends that do not stop there). Reasons:
    ``"malformed"`` (not exactly one `DELIMITER_1`), ``"empty"`` (a part is blank),
    ``"unchanged"`` (the edited caption equals the caption, ignoring case and end punctuation).
    """
    completion = completion.split(STOP, 1)[0]
    parts = completion.split(DELIMITER_1)
    if len(parts) != 2:
        return MALFORMED
    instruction, edited = (part.strip() for part in parts)
    if not instruction or not edited:
        return EMPTY
    if _normalize(caption) == _normalize(edited):
        return UNCHANGED
    return instruction, edited


def call_seed(seed: int, index: int, attempt: int) -> int:
    """The backend seed for a call: stable across runs, different per caption index and try."""
    digest = hashlib.blake2b(f"{seed}:{index}:{attempt}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF  # 31 bits: every server accepts it


@dataclass
class _Existing:
    captions: set[str]
    results: set[tuple[str, str]]
    lines: int
    truncated: bool


def _read_existing(path: Path) -> _Existing:
    """Read an output file left by an earlier run, cutting away a torn last line."""
    existing = _Existing(captions=set(), results=set(), lines=0, truncated=False)
    if not path.exists():
        return existing
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1  # a last line without "\n" was being written when killed
    lines = data[:keep].split(b"\n")[:-1]  # b"\n" only: see read_captions
    records = []
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
            if not isinstance(record, dict) or not isinstance(record.get("input"), str):
                raise ValueError("not an object with an 'input' string")
        except ValueError as e:
            if number == len(lines) - 1:  # the last line: torn by a kill, drop it
                keep -= len(line) + 1
                break
            raise ValueError(
                f"{path}, line {number + 1}: not a valid output line ({e}); expected a JSON "
                "object with 'input', 'edit' and 'output'"
            ) from None
        records.append(record)
    if keep < len(data):
        warnings.warn(
            f"{path}: removed a partly written last line ({len(data) - keep} bytes) "
            "left by an interrupted run",
            stacklevel=3,
        )
        with open(path, "r+b") as f:
            f.truncate(keep)
        existing.truncated = True
    for record in records:
        existing.captions.add(record["input"])
        existing.results.add(_result_key(str(record.get("edit")), str(record.get("output"))))
    existing.lines = len(records)
    return existing


def _result_key(instruction: str, edited: str) -> tuple[str, str]:
    return _normalize(instruction), _normalize(edited)


def _pending(
    captions: Iterable[Caption], done: set[str], summary: InstructionSummary
) -> list[tuple[int, Caption]]:
    """Captions still to do, with their input index; counts duplicate input captions."""
    seen: set[str] = set()
    pending = []
    for index, caption in enumerate(captions):
        if caption.text in seen:
            summary.duplicate_captions += 1
            continue
        seen.add(caption.text)
        if caption.text not in done:
            pending.append((index, caption))
    return pending


def generate_instructions(
    captions: Iterable[Caption],
    backend: Backend,
    out_path: str | os.PathLike,
    *,
    sampling: SamplingConfig | None = None,
    num_samples: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
    concurrency: int = 1,
    progress: bool = True,
) -> InstructionSummary:
    """Write an instruction and edited caption for each caption to ``out_path`` (JSONL).

    A batch's accepted lines are appended and flushed once its tries are done (a kill loses
    at most the batches in flight). Captions already in ``out_path`` are skipped, so a
    restarted job continues; a torn last line is removed with a warning. Stops
    once ``num_samples`` lines are in the file (counting those from before). Captions go to the
    backend ``batch_size`` at a time; each caption gets ``1 + sampling.retries`` tries, and the
    seed of a call is derived from ``seed``, the batch's first caption index and the try, so a
    rerun on the same input reproduces it.

    ``concurrency`` > 1 keeps up to that many batches in flight at once on worker threads
    (for a server backend; ``backend.complete`` must then be thread-safe). Batches are still
    written one after another in input order, each exactly as a ``concurrency=1`` run would
    write it: a batch that accepted a result which an earlier batch wrote meanwhile is run
    again once its turn comes, so a deterministic backend gives the same file either way. With
    ``num_samples`` only as many captions are in flight as lines are still missing; when some
    fail, the batches after them can be composed differently than at ``concurrency=1``.
    """
    sampling = sampling or SamplingConfig()
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    if num_samples is not None and num_samples < 0:
        raise ValueError(f"num_samples must not be negative, got {num_samples}")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    existing = _read_existing(out_path)
    summary = InstructionSummary(
        resumed=existing.lines,
        rejected=dict.fromkeys(REJECTION_REASONS, 0),
        truncated_torn_line=existing.truncated,
    )
    pending = _pending(captions, existing.captions, summary)
    target = None if num_samples is None else num_samples - summary.resumed
    results = existing.results

    def run(batch: list[tuple[int, Caption]]) -> _BatchOutcome:
        return _run_batch(batch, backend, sampling, seed, results)

    # Threads only when asked: a local model stays on the calling thread.
    executor = ThreadPoolExecutor(concurrency) if concurrency > 1 else _InlineExecutor()
    in_flight: deque[tuple[list[tuple[int, Caption]], Future[_BatchOutcome]]] = deque()
    queued = 0  # captions in flight
    start = 0  # pending[start:] are not yet sent; an index, not slicing: O(1) per batch
    try:
        with (
            open(out_path, "a", encoding="utf-8") as out,
            tqdm(
                total=len(pending), desc="instructions", unit="caption", disable=not progress
            ) as bar,
        ):
            while True:
                while start < len(pending) and len(in_flight) < concurrency:
                    # Ask for no more than still needed (counting captions in flight as
                    # written), so a --num run does not overshoot and never passes num.
                    need = None if target is None else target - summary.generated - queued
                    if need is not None and need <= 0:
                        break
                    size = batch_size if need is None else min(batch_size, need)
                    batch = pending[start : start + size]
                    start += len(batch)
                    queued += len(batch)
                    in_flight.append((batch, executor.submit(run, batch)))
                if not in_flight:
                    break
                batch, future = in_flight.popleft()
                queued -= len(batch)
                outcome = future.result()
                if any(_result_key(*result) in results for _, *result in outcome.accepted):
                    # An earlier batch wrote one of these results after this batch checked:
                    # run it again against everything written before it, as concurrency=1 does.
                    outcome = run(batch)
                _commit(outcome, out, results, summary)
                bar.update(len(batch))
                bar.set_postfix(written=summary.generated)
    finally:
        # On an error or Ctrl-C: drop batches not started; running ones end on their own.
        executor.shutdown(wait=True, cancel_futures=True)
    return summary


class _InlineExecutor:
    """``submit`` runs the call at once on this thread: `generate_instructions` at concurrency 1."""

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as error:  # re-raised by future.result(), as a pool would
            future.set_exception(error)
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Nothing to stop."""


@dataclass
class _BatchOutcome:
    """What the tries for one batch gave, not yet written."""

    accepted: list[tuple[Caption, str, str]]  # in the order accepted: the write order
    rejected: dict[str, int]
    failed: int  # captions whose every try was rejected


def _run_batch(
    batch: list[tuple[int, Caption]],
    backend: Backend,
    sampling: SamplingConfig,
    seed: int,
    results: set[tuple[str, str]],
) -> _BatchOutcome:
    """Up to ``1 + retries`` tries for a batch of captions; writes nothing.

    ``results`` (the results written so far) is only read, here perhaps from a worker thread
    while the writing thread adds to it; a result is a duplicate if it is in ``results`` or was
    accepted earlier in this batch.
    """
    outcome = _BatchOutcome(accepted=[], rejected={}, failed=0)
    accepted: set[tuple[str, str]] = set()
    todo = batch
    for attempt in range(1 + sampling.retries):
        if not todo:
            break
        prompts = [caption.text + DELIMITER_0 for _, caption in todo]
        completions = backend.complete(prompts, sampling, call_seed(seed, todo[0][0], attempt))
        if len(completions) != len(prompts):
            raise RuntimeError(
                f"backend {type(backend).__name__} returned {len(completions)} completions "
                f"for {len(prompts)} prompts"
            )
        retry = []
        for (index, caption), completion in zip(todo, completions, strict=True):
            parsed = parse_completion(caption.text, completion)
            if isinstance(parsed, tuple):
                key = _result_key(*parsed)
                if key in accepted or key in results:
                    parsed = DUPLICATE  # the same edit was already written for another caption
            if isinstance(parsed, str):
                outcome.rejected[parsed] = outcome.rejected.get(parsed, 0) + 1
                retry.append((index, caption))
                continue
            outcome.accepted.append((caption, *parsed))
            accepted.add(key)
        todo = retry
    outcome.failed = len(todo)
    return outcome


def _commit(
    outcome: _BatchOutcome, out: Any, results: set[tuple[str, str]], summary: InstructionSummary
) -> None:
    """Write a batch's accepted results and count it in ``summary``."""
    for caption, instruction, edited in outcome.accepted:
        _write(out, caption, instruction, edited)
        results.add(_result_key(instruction, edited))
        summary.generated += 1
    for reason, count in outcome.rejected.items():
        summary.rejected[reason] = summary.rejected.get(reason, 0) + count
    summary.failed_captions += outcome.failed


def _write(out: Any, caption: Caption, instruction: str, edited: str) -> None:
    record = {
        **caption.extra,
        "id": caption.id,
        "input": caption.text,
        "edit": instruction,
        "output": edited,
    }
    out.write(json.dumps(record, ensure_ascii=False) + "\n")
    out.flush()  # a killed job loses at most the line being written
