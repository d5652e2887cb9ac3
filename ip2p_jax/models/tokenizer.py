"""CLIP BPE tokenizer in pure Python (no torch, no transformers).

OpenAI's CLIP tokenizer, read from a Hugging Face tokenizer folder (``vocab.json`` +
``merges.txt``, or else the ``tokenizer.json`` that transformers 5 writes; optional
``tokenizer_config.json`` / ``special_tokens_map.json``), as found under ``tokenizer/`` in a
Stable Diffusion checkpoint. The SD-1.x files are bundled under
``ip2p_jax/assets/clip_tokenizer`` (rebuilt offline by ``scripts/build_clip_tokenizer.py``).

Text is cleaned as OpenAI does (``ftfy.fix_text``, ``html.unescape`` twice, whitespace collapse,
lower case) before the BPE, so the ids equal OpenAI's ``SimpleTokenizer``. A batch becomes
``[BOS] + ids + [EOS]`` padded to ``model_max_length`` (77), as ``transformers.CLIPTokenizer``
with ``padding="max_length", truncation=True`` gives it.
"""

from __future__ import annotations

import functools
import html
import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import ftfy
import numpy as np
import regex

from ip2p_jax.assets import ASSETS

BUNDLED_DIR = ASSETS / "clip_tokenizer"
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """OpenAI's reversible map from the 256 byte values to printable unicode characters."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def fix_text(text: str) -> str:
    """``ftfy.fix_text``, which leaves a line of printable ASCII without '&' (no mojibake,
    curly quotes, ligatures, control characters or HTML entities) as it is: such a line skips
    it, and its ~50 us, most of the time tokenizing a training example took."""
    if text.isascii() and text.isprintable() and "&" not in text:
        return text
    return ftfy.fix_text(text)


def clean_text(text: str) -> str:
    """OpenAI's cleanup: ftfy fix, HTML unescape (twice), collapsed whitespace, lower case."""
    text = html.unescape(html.unescape(fix_text(text))).strip()
    return " ".join(text.split()).lower()


def _token_content(value: str | dict | None) -> str | None:
    """A special token from HF files: a plain string or a dict with a "content" key."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _read_bpe(folder: Path) -> tuple[dict[str, int], list[tuple[str, ...]]]:
    """Vocabulary and ranked merges of a tokenizer folder.

    ``vocab.json`` + ``merges.txt`` are preferred; otherwise the Hugging Face ``tokenizers``
    file ``tokenizer.json`` (``model.vocab``, ``model.merges`` as ``"a b"`` strings or
    ``[a, b]`` pairs, plus the ids of its ``added_tokens``).
    """
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    if vocab_file.is_file() and merges_file.is_file():
        vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
        lines = merges_file.read_text(encoding="utf-8").split("\n")
        merges = [tuple(ln.split()) for ln in lines if ln.strip() and not ln.startswith("#version")]
        return vocab, merges
    if (folder / "tokenizer.json").is_file():
        data = _read_json(folder / "tokenizer.json")
        model = data.get("model", {})
        if model.get("type", "BPE") != "BPE":
            raise ValueError(f"{folder / 'tokenizer.json'} holds a {model['type']} model, not BPE")
        vocab = dict(model["vocab"])
        vocab.update({t["content"]: t["id"] for t in data.get("added_tokens", [])})
        merges = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        return vocab, merges
    raise FileNotFoundError(
        f"no CLIP tokenizer files in {folder}: need vocab.json + merges.txt, or tokenizer.json"
    )


class CLIPTokenizer:
    """OpenAI's CLIP BPE tokenizer with Hugging Face's special tokens, padding and truncation."""

    def __init__(
        self,
        vocab: dict[str, int],
        merges: Sequence[Sequence[str]],
        *,
        bos_token: str = BOS_TOKEN,
        eos_token: str = EOS_TOKEN,
        pad_token: str = EOS_TOKEN,
        unk_token: str = EOS_TOKEN,
        model_max_length: int = 77,
    ) -> None:
        """Build from a vocabulary (token -> id) and the merges in rank order."""
        self.encoder = dict(vocab)
        self.decoder = {i: t for t, i in self.encoder.items()}
        self.bpe_ranks = {tuple(m): r for r, m in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        ids = {}
        for name, token in [("bos", bos_token), ("eos", eos_token), ("pad", pad_token)]:
            if token not in self.encoder:
                raise ValueError(f"{name} token {token!r} is not in the vocabulary")
            ids[name] = self.encoder[token]
        self.bos_token_id, self.eos_token_id, self.pad_token_id = ids["bos"], ids["eos"], ids["pad"]
        self.unk_token_id = self.encoder.get(unk_token, self.eos_token_id)
        self.model_max_length = int(model_max_length)
        self._specials = {BOS_TOKEN, EOS_TOKEN}
        self._bpe = functools.lru_cache(maxsize=2**16)(self._bpe_uncached)
        self.folder: Path | None = None

    def __getstate__(self) -> dict:
        # The BPE cache is a bound lru_cache, which pickle refuses: worker processes (grain's
        # data loader) get the tables and build their own cache.
        state = dict(self.__dict__)
        del state["_bpe"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._bpe = functools.lru_cache(maxsize=2**16)(self._bpe_uncached)

    @classmethod
    def from_folder(cls, path: str | Path) -> CLIPTokenizer:
        """Load an HF tokenizer folder: vocab.json + merges.txt (or tokenizer.json) and configs."""
        folder = Path(path)
        vocab, merges = _read_bpe(folder)
        # special_tokens_map.json overrides tokenizer_config.json, as in transformers.
        config = _read_json(folder / "tokenizer_config.json")
        config.update(_read_json(folder / "special_tokens_map.json"))
        kwargs = {}
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            token = _token_content(config.get(key))
            if token is not None:
                kwargs[key] = token
        max_length = int(config.get("model_max_length", 77))
        if max_length > 10**6:  # transformers' "no limit" sentinel (int(1e30)): CLIP has 77
            max_length = 77
        tokenizer = cls(vocab, merges, model_max_length=max_length, **kwargs)
        tokenizer.folder = folder  # where it came from, so a saved model can ship the same files
        return tokenizer

    @classmethod
    def bundled(cls) -> CLIPTokenizer:
        """The SD-1.x tokenizer shipped with the package (pad = ``<|endoftext|>``)."""
        return cls.from_folder(BUNDLED_DIR)

    @property
    def vocab_size(self) -> int:
        """Number of ids (49,408 for CLIP)."""
        return len(self.encoder)

    def _bpe_uncached(self, token: str) -> tuple[str, ...]:
        """OpenAI's BPE of one pre-token (already mapped to byte-unicode symbols)."""
        if token in self._specials:
            return (token,)
        word = (*token[:-1], token[-1] + "</w>")
        while len(word) > 1:
            pairs = set(zip(word[:-1], word[1:], strict=True))
            bigram = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            merged: list[str] = []
            i = 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        return word

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text`` after OpenAI's cleanup, without BOS/EOS."""
        ids = []
        for piece in _PATTERN.findall(clean_text(text)):
            symbols = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder.get(t, self.unk_token_id) for t in self._bpe(symbols))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ids (OpenAI's decode: word ends become spaces), stripped."""
        text = "".join(self.decoder[int(i)] for i in ids)
        data = bytearray(self.byte_decoder[c] for c in text)
        return data.decode("utf-8", errors="replace").replace("</w>", " ").strip()

    def tokenize_with_info(
        self, texts: str | Sequence[str], max_length: int | None = None
    ) -> tuple[np.ndarray, list[str | None]]:
        """Ids of a batch and, for each prompt, the text cut off by truncation (None if none).

        Each row is ``[BOS] + ids + [EOS]``; ids beyond ``max_length - 2`` are dropped (EOS
        stays last), then the row is padded with the pad id. ``texts`` may be a single string
        (a batch of one). Returns int32 ids of shape [batch, max_length].
        """
        max_length = self.model_max_length if max_length is None else int(max_length)
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 (BOS and EOS), got {max_length}")
        batch = [texts] if isinstance(texts, str) else list(texts)
        out = np.full((len(batch), max_length), self.pad_token_id, dtype=np.int32)
        removed: list[str | None] = []
        for row, text in enumerate(batch):
            ids = self.encode(text)
            keep = max_length - 2
            removed.append(self.decode(ids[keep:]) if len(ids) > keep else None)
            ids = [self.bos_token_id, *ids[:keep], self.eos_token_id]
            out[row, : len(ids)] = ids
        return out, removed

    def __call__(self, texts: str | Sequence[str], max_length: int | None = None) -> np.ndarray:
        """Padded int32 ids [batch, max_length]; warns with the removed text when truncating."""
        ids, removed = self.tokenize_with_info(texts, max_length)
        for cut in removed:
            if cut is not None:
                warnings.warn(
                    "The following part of your input was truncated because CLIP can only "
                    f"handle sequences up to {ids.shape[1]} tokens: {cut!r}",
                    stacklevel=2,
                )
        return ids
