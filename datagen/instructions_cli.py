"""``ip2p datagen instructions``: captions -> JSONL of (instruction, edited caption)."""

from __future__ import annotations

import argparse
from pathlib import Path

from datagen.instructions import SamplingConfig
from datagen.llm import BACKENDS

_DEFAULTS = SamplingConfig()


def add_instructions_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``instructions`` options to ``parser``."""
    parser.add_argument(
        "--captions", type=Path, required=True, help="captions: .txt (one a line) or .jsonl"
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="output .jsonl (appended to; resumes)"
    )
    # Not argparse's required=True: its error would not list the choices or warn about
    # template; `_check` does both before anything is loaded.
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        help="required. transformers: a local causal LM; openai: an OpenAI-compatible "
        "/completions server (vLLM, llama.cpp, ollama); template: rule-based, no model, "
        "a smoke test only, not training data",
    )
    parser.add_argument(
        "--model", help="transformers: model folder or hub id; openai: the served model's name"
    )
    parser.add_argument("--base-url", help="openai: server URL, e.g. http://localhost:8000/v1")
    parser.add_argument("--api-key", help="openai: API key (default: $OPENAI_API_KEY)")
    parser.add_argument(
        "--no-few-shot",
        action="store_true",
        help="send the bare 'caption\\n##\\n' prompt (a model fine-tuned on the format)",
    )
    parser.add_argument(
        "--examples",
        type=Path,
        help="transformers, openai: a JSONL of your own {input, edit, output} examples for "
        "the few-shot prompt, instead of the built-in ones",
    )
    parser.add_argument("--num", type=int, help="stop once the output has this many lines")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per LLM call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="openai: batch requests in flight at once (the output stays in input order)",
    )
    parser.add_argument("--temperature", type=float, default=_DEFAULTS.temperature)
    parser.add_argument("--top-p", type=float, default=_DEFAULTS.top_p)
    parser.add_argument("--frequency-penalty", type=float, default=_DEFAULTS.frequency_penalty)
    parser.add_argument("--presence-penalty", type=float, default=_DEFAULTS.presence_penalty)
    parser.add_argument("--max-tokens", type=int, default=_DEFAULTS.max_tokens)
    parser.add_argument(
        "--retries", type=int, default=_DEFAULTS.retries, help="extra tries per caption"
    )
    parser.add_argument("--device", default="cpu", help="transformers: torch device")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16", "float16"),
        help="transformers: model dtype",
    )


def _check(args: argparse.Namespace) -> None:
    """Fail on missing or clashing options before any model or file is loaded."""
    if args.backend is None:
        raise ValueError(
            "--backend is required; choose one of: transformers (a local causal LM, with "
            "--model), openai (an OpenAI-compatible server such as vLLM, with --base-url and "
            "--model), template (rule-based, no model: a smoke test of the pipeline, not "
            "training data)"
        )
    if args.backend in ("transformers", "openai") and not args.model:
        raise ValueError(f"--backend {args.backend} needs --model")
    if args.backend == "openai" and not args.base_url:
        raise ValueError("--backend openai needs --base-url (e.g. http://localhost:8000/v1)")
    if args.examples is not None and args.backend == "template":
        raise ValueError(
            "--examples is for the transformers and openai backends; template uses no prompt"
        )
    if args.examples is not None and args.no_few_shot:
        raise ValueError(
            "--examples and --no-few-shot exclude each other: the examples go into the "
            "few-shot prompt, which --no-few-shot leaves out"
        )
    if args.concurrency < 1:
        raise ValueError(f"--concurrency must be at least 1, got {args.concurrency}")
    if args.concurrency > 1 and args.backend != "openai":
        raise ValueError(
            f"--concurrency {args.concurrency} is for --backend openai (requests to a "
            f"server); --backend {args.backend} runs one batch at a time"
        )
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.retries < 0:
        raise ValueError(f"--retries must not be negative, got {args.retries}")
    if args.num is not None and args.num < 0:
        raise ValueError(f"--num must not be negative, got {args.num}")


def _backend_options(args: argparse.Namespace, examples: list | None = None) -> dict:
    """`make_backend` options from the arguments; ``examples`` replace the built-in ones."""
    prompt = dict(few_shot=not args.no_few_shot)
    if examples is not None:
        prompt["examples"] = examples
    if args.backend == "transformers":
        return dict(model=args.model, device=args.device, dtype=args.dtype, **prompt)
    if args.backend == "openai":
        return dict(base_url=args.base_url, model=args.model, api_key=args.api_key, **prompt)
    return {}


def run_instructions(args: argparse.Namespace) -> int:
    """Run the ``instructions`` command from parsed arguments; prints the summary."""
    from datagen.instructions import generate_instructions, read_captions, read_examples
    from datagen.llm import make_backend

    _check(args)
    # The small files first: a bad line in one fails before a model loads.
    examples = read_examples(args.examples) if args.examples is not None else None
    captions = read_captions(args.captions)
    sampling = SamplingConfig(
        temperature=args.temperature,
        top_p=args.top_p,
        frequency_penalty=args.frequency_penalty,
        presence_penalty=args.presence_penalty,
        max_tokens=args.max_tokens,
        retries=args.retries,
    )
    backend = make_backend(args.backend, **_backend_options(args, examples))
    summary = generate_instructions(
        captions,
        backend,
        args.out,
        sampling=sampling,
        num_samples=args.num,
        batch_size=args.batch_size,
        seed=args.seed,
        concurrency=args.concurrency,
    )
    print(summary.describe())
    print(f"wrote {args.out}")
    return 0
