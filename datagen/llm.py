"""LLM backends for `datagen.instructions`: prompt -> raw completion in the paper's format.

Every backend takes prompts ``caption + DELIMITER_0`` and returns the text after the prompt,
``instruction + DELIMITER_1 + edited caption`` (maybe followed by ``STOP`` and more).

- `TemplateBackend`: no model; rewrites the caption with a few edit templates (a smoke test
  of the pipeline, not training data).
- `TransformersBackend`: a local causal LM through 🤗 transformers, with the OpenAI sampling
  options (frequency and presence penalties, stop text) reimplemented.
- `OpenAIBackend`: an OpenAI-compatible ``/completions`` server (vLLM, llama.cpp, ollama);
  thread-safe, so `generate_instructions(concurrency=N)` can keep N requests in flight.

torch and transformers are imported only when a `TransformersBackend` (or the
`PenaltyLogitsProcessor` / `StopOnText` classes) is first used.
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import json
import os
import random
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from datagen.instructions import (
    DEFAULT_EXAMPLES,
    DELIMITER_0,
    DELIMITER_1,
    STOP,
    SamplingConfig,
    few_shot_prefix,
)

BACKENDS = ("template", "transformers", "openai")


class Backend(Protocol):
    """Anything that completes prompts: one raw completion (text after the prompt) each."""

    def complete(self, prompts: list[str], sampling: SamplingConfig, seed: int) -> list[str]: ...


def caption_from_prompt(prompt: str) -> str:
    """The caption of a prompt ``[few-shot examples] caption + DELIMITER_0``."""
    head = prompt.rsplit(DELIMITER_0, 1)[0]
    return head.rsplit(STOP + "\n\n", 1)[-1].strip()  # drop few-shot examples, if any


# --- TemplateBackend ------------------------------------------------------------------------

_COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
_SWAPS = {
    "dog": "cat",
    "cat": "dog",
    "horse": "zebra",
    "car": "bicycle",
    "man": "robot",
    "woman": "statue",
    "apple": "orange",
    "house": "castle",
    "bird": "butterfly",
    "city": "village",
    "boat": "pirate ship",
    "tree": "palm tree",
}
_STYLES = (
    "watercolor painting",
    "oil painting",
    "pencil sketch",
    "charcoal drawing",
    "Van Gogh painting",
    "pixel art image",
    "stained glass window",
)
_SETTINGS = (
    ("make it winter", "in winter"),
    ("make it autumn", "in autumn"),
    ("make it night", "at night"),
    ("make it sunset", "at sunset"),
    ("make it rain", "in the rain"),
    ("make it foggy", "in thick fog"),
)
_ADDITIONS = (
    ("add a hat", "with a hat"),
    ("add fireworks", "with fireworks in the sky"),
    ("add a rainbow", "with a rainbow"),
    ("add snow", "covered in snow"),
    ("add a full moon", "under a full moon"),
)

_Edit = Callable[[str, random.Random], "tuple[str, str] | None"]


def _article(phrase: str) -> str:
    return "an" if phrase[:1].lower() in "aeiou" else "a"


def _base(caption: str) -> str:
    return caption.strip().rstrip(".!?")


def _colour_edit(caption: str, rng: random.Random) -> tuple[str, str] | None:
    match = re.search(rf"\b({'|'.join(_COLOURS)})\b", caption, flags=re.IGNORECASE)
    if match is None:
        return None
    old = match.group(1).lower()
    new = rng.choice([c for c in _COLOURS if c != old])
    noun = re.match(r"\s+([A-Za-z]+)", caption[match.end() :])
    thing = noun.group(1) if noun else "parts"
    edited = caption[: match.start()] + new + caption[match.end() :]
    return f"make the {old} {thing} {new}", edited


def _swap_edit(caption: str, rng: random.Random) -> tuple[str, str] | None:
    match = re.search(rf"\b({'|'.join(_SWAPS)})\b", caption, flags=re.IGNORECASE)
    if match is None:
        return None
    old = match.group(1).lower()
    new = _SWAPS[old]
    edited = caption[: match.start()] + new + caption[match.end() :]
    return f"turn the {old} into {_article(new)} {new}", edited


def _style_edit(caption: str, rng: random.Random) -> tuple[str, str]:
    style = rng.choice(_STYLES)
    base = _base(caption)
    base = base[:1].lower() + base[1:]
    return f"turn it into {_article(style)} {style}", f"{_article(style)} {style} of {base}"


def _setting_edit(caption: str, rng: random.Random) -> tuple[str, str]:
    instruction, phrase = rng.choice(_SETTINGS)
    return instruction, f"{_base(caption)}, {phrase}"


def _addition_edit(caption: str, rng: random.Random) -> tuple[str, str]:
    instruction, phrase = rng.choice(_ADDITIONS)
    return instruction, f"{_base(caption)}, {phrase}"


_EDITS: tuple[_Edit, ...] = (_colour_edit, _swap_edit, _style_edit, _setting_edit, _addition_edit)


class TemplateBackend:
    """No model: rewrites the caption with an edit template, deterministic in (prompt, seed).

    Templates: swap a colour word, swap a known object, restyle, change season or time, add
    something. Every one really changes the caption. Output is in the paper's format
    ``instruction + DELIMITER_1 + edited + STOP``, so it goes through the same parser.
    """

    def complete(self, prompts: list[str], sampling: SamplingConfig, seed: int) -> list[str]:
        """One templated completion per prompt; ``sampling`` is ignored."""
        return [self._complete_one(prompt, seed) for prompt in prompts]

    @staticmethod
    def _complete_one(prompt: str, seed: int) -> str:
        caption = caption_from_prompt(prompt)
        # hashlib, not hash(): str hashes change between Python processes.
        digest = hashlib.sha256(f"{seed}\0{prompt}".encode()).digest()
        rng = random.Random(int.from_bytes(digest[:8], "little"))
        candidates = [result for edit in _EDITS if (result := edit(caption, rng)) is not None]
        instruction, edited = rng.choice(candidates)
        return instruction + DELIMITER_1 + edited + STOP


# --- TransformersBackend --------------------------------------------------------------------


@functools.cache
def _torch_classes() -> dict[str, type]:
    """Classes that subclass transformers' types; built on first use to keep imports light."""
    import torch
    from transformers import LogitsProcessor, StoppingCriteria

    class PenaltyLogitsProcessor(LogitsProcessor):
        """OpenAI's frequency and presence penalties on the tokens generated so far.

        ``logits[j] -= count[j] * frequency_penalty + (count[j] > 0) * presence_penalty``, with
        ``count`` over the generated tokens only (from ``prompt_length`` on), not the prompt.
        """

        def __init__(
            self, prompt_length: int, frequency_penalty: float, presence_penalty: float
        ) -> None:
            self.prompt_length = prompt_length
            self.frequency_penalty = frequency_penalty
            self.presence_penalty = presence_penalty

        def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
            generated = input_ids[:, self.prompt_length :]
            if generated.shape[1] == 0:
                return scores
            counts = torch.zeros_like(scores).scatter_add_(
                1, generated, torch.ones_like(generated, dtype=scores.dtype)
            )
            present = (counts > 0).to(scores.dtype)
            return scores - counts * self.frequency_penalty - present * self.presence_penalty

    class StopOnText(StoppingCriteria):
        """Stops a row once its decoded generated text contains ``stop``."""

        def __init__(self, tokenizer: Any, prompt_length: int, stop: str = STOP) -> None:
            self.tokenizer = tokenizer
            self.prompt_length = prompt_length
            self.stop = stop

        def __call__(
            self, input_ids: torch.LongTensor, scores: torch.Tensor | None, **kwargs: Any
        ) -> torch.BoolTensor:
            texts = self.tokenizer.batch_decode(
                input_ids[:, self.prompt_length :], skip_special_tokens=True
            )
            return torch.tensor([self.stop in text for text in texts], device=input_ids.device)

    return {"PenaltyLogitsProcessor": PenaltyLogitsProcessor, "StopOnText": StopOnText}


def __getattr__(name: str) -> Any:
    # PEP 562: `from datagen.llm import PenaltyLogitsProcessor` imports torch only then.
    if name in ("PenaltyLogitsProcessor", "StopOnText"):
        return _torch_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _resolve_dtype(dtype: Any) -> Any:
    import torch

    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"dtype {dtype!r} is not a torch dtype (e.g. float32, bfloat16)")
        return resolved
    return dtype


class TransformersBackend:
    """A causal LM through transformers (AutoTokenizer + AutoModelForCausalLM).

    ``model`` is a local folder or a hub id. With ``few_shot`` (for a plain LM) the prompt is
    `few_shot_prompt`; without it (a model fine-tuned on the format) it is the bare
    ``caption + DELIMITER_0``. Sampling follows the OpenAI options: temperature, top_p,
    max_tokens, frequency and presence penalties (`PenaltyLogitsProcessor`), stop at `STOP`.
    Batches are left-padded; ``seed`` makes a call reproducible.
    """

    def __init__(
        self,
        model: str | Path,
        *,
        few_shot: bool = True,
        device: str = "cpu",
        dtype: Any = None,
        examples: Sequence[tuple[str, str, str]] = DEFAULT_EXAMPLES,
    ) -> None:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.prefix = few_shot_prefix(examples) if few_shot else ""
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(str(model))
        self.tokenizer.padding_side = "left"  # generation continues right after each prompt
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is None:
                raise ValueError(
                    f"{model}: the tokenizer has neither a pad nor an eos token; batched "
                    "generation needs one to pad with"
                )
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # transformers 4.56 renamed torch_dtype to dtype.
        major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
        dtype_key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
        self.model = AutoModelForCausalLM.from_pretrained(
            str(model), **{dtype_key: _resolve_dtype(dtype)}
        )
        self.model.to(self.device).eval()

    def complete(self, prompts: list[str], sampling: SamplingConfig, seed: int) -> list[str]:
        """Sample one completion per prompt, cut at `STOP`."""
        import torch
        from transformers import LogitsProcessorList, StoppingCriteriaList

        classes = _torch_classes()
        encoded = self.tokenizer(
            [self.prefix + prompt for prompt in prompts], return_tensors="pt", padding=True
        ).to(self.device)
        prompt_length = encoded["input_ids"].shape[1]  # the same for all rows: left padding
        processors = LogitsProcessorList()
        if sampling.frequency_penalty or sampling.presence_penalty:
            processors.append(
                classes["PenaltyLogitsProcessor"](
                    prompt_length, sampling.frequency_penalty, sampling.presence_penalty
                )
            )
        stopping = StoppingCriteriaList([classes["StopOnText"](self.tokenizer, prompt_length)])
        if sampling.temperature > 0:
            # top_k=0 and repetition_penalty=1: no extra filtering from the model's defaults.
            options = dict(
                do_sample=True,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=0,
                repetition_penalty=1.0,
            )
        else:
            options = dict(do_sample=False)  # temperature 0: greedy, as OpenAI does
        # fork_rng: seed this call without changing the caller's random state.
        cuda = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda), torch.inference_mode():
            torch.manual_seed(seed)
            output = self.model.generate(
                **encoded,
                max_new_tokens=sampling.max_tokens,
                logits_processor=processors,
                stopping_criteria=stopping,
                pad_token_id=self.tokenizer.pad_token_id,
                **options,
            )
        texts = self.tokenizer.batch_decode(output[:, prompt_length:], skip_special_tokens=True)
        return [text.split(STOP, 1)[0] for text in texts]


# --- OpenAIBackend --------------------------------------------------------------------------


def _server_message(error: urllib.error.HTTPError) -> str:
    """The error text of an OpenAI-style error body, else the raw body."""
    try:
        body = error.read().decode("utf-8", errors="replace")
    except OSError:
        return str(error.reason)
    try:
        data = json.loads(body)
    except ValueError:
        return body.strip()[:500] or str(error.reason)
    detail = data.get("error", data.get("detail", data)) if isinstance(data, dict) else data
    if isinstance(detail, dict) and "message" in detail:
        return str(detail["message"])
    return str(detail)


class OpenAIBackend:
    """An OpenAI-compatible ``/completions`` endpoint (vLLM, llama.cpp server, ollama).

    Retries with exponential backoff (``backoff * 2**n`` seconds) on connection errors, 5xx and
    429; other 4xx errors raise at once with the server's message. With ``few_shot`` the
    prompt is `few_shot_prompt` (for a plain model); without it the bare paper prompt.
    ``list_prompts=False`` sends one prompt per request, for servers that take no lists.
    ``complete`` keeps no state between calls (one connection per request), so several threads
    may call it at once.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        timeout: float = 60,
        max_attempts: int = 4,
        backoff: float = 1.0,
        few_shot: bool = True,
        examples: Sequence[tuple[str, str, str]] = DEFAULT_EXAMPLES,
        list_prompts: bool = True,
    ) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
        self.url = base_url.rstrip("/") + "/completions"
        self.model = model
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.prefix = few_shot_prefix(examples) if few_shot else ""
        self.list_prompts = list_prompts

    def complete(self, prompts: list[str], sampling: SamplingConfig, seed: int) -> list[str]:
        """One completion per prompt, in prompt order."""
        prompts = [self.prefix + prompt for prompt in prompts]
        if self.list_prompts:
            return self._request(prompts, sampling, seed)
        return [self._request([prompt], sampling, seed)[0] for prompt in prompts]

    def _request(self, prompts: list[str], sampling: SamplingConfig, seed: int) -> list[str]:
        body = {
            "model": self.model,
            "prompt": prompts,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_tokens": sampling.max_tokens,
            "frequency_penalty": sampling.frequency_penalty,
            "presence_penalty": sampling.presence_penalty,
            "stop": [STOP],
            "seed": seed,
        }
        data = self._post(body)
        choices = data.get("choices") if isinstance(data, dict) else None
        if not isinstance(choices, list) or len(choices) != len(prompts):
            count = len(choices) if isinstance(choices, list) else "no"
            raise RuntimeError(
                f"{self.url}: expected {len(prompts)} choices for {len(prompts)} prompts, "
                f"got {count}: {json.dumps(data)[:300]}"
            )
        # Servers may return choices in any order; "index" is the prompt's position.
        ordered = sorted(choices, key=lambda choice: choice.get("index", 0))
        return [str(choice.get("text", "")) for choice in ordered]

    def _post(self, body: dict) -> Any:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(
            self.url, data=json.dumps(body).encode("utf-8"), headers=headers, method="POST"
        )
        last_error = ""
        for attempt in range(self.max_attempts):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    payload = response.read()
            except urllib.error.HTTPError as e:  # before URLError: it is a subclass
                message = _server_message(e)
                if e.code == 429 or e.code >= 500:  # overloaded or broken for now: retry
                    last_error = f"HTTP {e.code}: {message}"
                    continue
                raise RuntimeError(f"{self.url}: HTTP {e.code}: {message}") from None
            except (OSError, http.client.HTTPException) as e:  # refused, reset, timed out
                last_error = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
                continue
            try:
                return json.loads(payload)
            except ValueError:
                raise RuntimeError(
                    f"{self.url}: the answer is not JSON: {payload[:300]!r}"
                ) from None
        raise RuntimeError(
            f"{self.url}: no answer after {self.max_attempts} attempts; last error: {last_error}"
        )


def make_backend(name: str, **options: Any) -> Backend:
    """Build a backend by name: "template", "transformers" or "openai" (options: its kwargs)."""
    if name == "template":
        return TemplateBackend(**options)
    if name == "transformers":
        return TransformersBackend(**options)
    if name == "openai":
        return OpenAIBackend(**options)
    raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
