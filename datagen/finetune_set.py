"""``ip2p datagen finetune-set``: hand-written examples -> an LLM fine-tuning set.

The paper fine-tuned GPT-3 on 700 human-written (caption, instruction, edited caption)
triples. This writes such triples as prompt/completion JSONL in the format
`datagen.instructions` prompts and parses: ``{"prompt": caption + DELIMITER_0, "completion":
" " + instruction + DELIMITER_1 + edited caption + STOP}``, which OpenAI-compatible
fine-tuning and transformers/TRL's prompt-completion SFT read. The leading space of the
completion is what OpenAI's legacy fine-tuning guide asked for (the original's
``prepare_for_gpt.py`` has none); `parse_completion` strips it. A model tuned on this set is
then run with ``ip2p datagen instructions --no-few-shot``. No torch needed.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path

from datagen.instructions import DELIMITER_0, DELIMITER_1, STOP, read_examples


def finetune_record(caption: str, instruction: str, edited: str) -> dict[str, str]:
    """One fine-tuning example: the paper's prompt and its completion."""
    return {
        "prompt": caption + DELIMITER_0,
        "completion": " " + instruction + DELIMITER_1 + edited + STOP,
    }


def write_finetune_set(
    examples: Sequence[tuple[str, str, str]], out: str | os.PathLike, *, overwrite: bool = False
) -> Path:
    """Write ``examples`` as prompt/completion JSONL to ``out``, whole or not at all.

    Raises FileExistsError when ``out`` exists and ``overwrite`` is false.
    """
    from ip2p_jax.weights.atomic import write_text_atomically

    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    text = "".join(
        json.dumps(finetune_record(*example), ensure_ascii=False) + "\n" for example in examples
    )
    return write_text_atomically(out, text)


def add_finetune_set_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``finetune-set`` options to ``parser``."""
    parser.add_argument(
        "--examples",
        type=Path,
        required=True,
        help='JSONL of hand-written {"input", "edit", "output"} examples ("caption" works '
        'for "input"), e.g. the original release\'s human-written prompts',
    )
    parser.add_argument("--out", type=Path, required=True, help="prompt/completion .jsonl to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def run_finetune_set(args: argparse.Namespace) -> int:
    """Run the ``finetune-set`` command from parsed arguments; prints what it wrote."""
    if args.out.exists() and not args.overwrite:  # before reading: fail fast
        raise FileExistsError(f"{args.out} exists; pass --overwrite to replace it")
    examples = read_examples(args.examples)
    path = write_finetune_set(examples, args.out, overwrite=args.overwrite)
    print(f"wrote {len(examples)} example(s) to {path}")
    return 0
