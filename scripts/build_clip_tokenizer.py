"""Rebuild the SD-1.x CLIP tokenizer folder (HF layout) from OpenAI's BPE file, offline.

OpenAI's ``bpe_simple_vocab_16e6.txt.gz`` ships inside the open-clip-torch wheel
(``open_clip/bpe_simple_vocab_16e6.txt.gz``). This script reads it (from the .gz file itself or
from the wheel), checks its md5 and writes ``vocab.json``, ``merges.txt``,
``tokenizer_config.json`` and ``special_tokens_map.json``: the same tokenizer as the ``tokenizer/``
folder of Stable Diffusion 1.x (49,408 ids, model_max_length 77, pad = ``<|endoftext|>``).

Run from the repository root::

    python scripts/build_clip_tokenizer.py /path/to/open_clip_torch-3.3.0-py3-none-any.whl
    python scripts/build_clip_tokenizer.py bpe_simple_vocab_16e6.txt.gz --out DIR

The output defaults to ``ip2p_jax/assets/clip_tokenizer`` (the bundled tokenizer).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import zipfile
from pathlib import Path

from ip2p_jax.models.tokenizer import BOS_TOKEN as BOS
from ip2p_jax.models.tokenizer import EOS_TOKEN as EOS
from ip2p_jax.models.tokenizer import bytes_to_unicode

BPE_MD5 = "933b7abbbbde62c36f02f0e6ccde464f"
WHEEL_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # 48,894 merges, as OpenAI's and HF's CLIP tokenizers read them
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "ip2p_jax" / "assets" / "clip_tokenizer"


def read_bpe_gz(path: Path) -> bytes:
    """The raw bytes of ``bpe_simple_vocab_16e6.txt.gz``, from the file or from a wheel/zip."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            return zf.read(WHEEL_MEMBER)
    return path.read_bytes()


def build(bpe_gz: bytes) -> tuple[dict[str, int], list[str]]:
    """The vocabulary (token -> id) and the merges ("a b" lines, by rank) of OpenAI's CLIP."""
    md5 = hashlib.md5(bpe_gz).hexdigest()
    if md5 != BPE_MD5:
        raise ValueError(f"bpe_simple_vocab_16e6.txt.gz has md5 {md5}, expected {BPE_MD5}")
    lines = gzip.decompress(bpe_gz).decode("utf-8").split("\n")
    merges = lines[1 : NUM_MERGES + 1]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens) or len(vocab) != 49408:
        raise ValueError(f"expected 49,408 distinct tokens, got {len(vocab)} of {len(tokens)}")
    return vocab, merges


def _special(content: str) -> dict:
    """A special token as HF writes it in the SD-1.x tokenizer files."""
    return {
        "content": content,
        "lstrip": False,
        "normalized": True,
        "rstrip": False,
        "single_word": False,
    }


def write_folder(out: Path, vocab: dict[str, int], merges: list[str]) -> None:
    """Write the four HF tokenizer files into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(
        json.dumps(vocab, ensure_ascii=False, separators=(",", ":")), encoding="utf-8"
    )
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special_map = {
        "bos_token": _special(BOS),
        "eos_token": _special(EOS),
        "pad_token": EOS,
        "unk_token": _special(EOS),
    }
    config = {
        "add_prefix_space": False,
        **special_map,
        "do_lower_case": True,
        "errors": "replace",
        "model_max_length": 77,
        "tokenizer_class": "CLIPTokenizer",
    }
    for name, obj in [("special_tokens_map.json", special_map), ("tokenizer_config.json", config)]:
        (out / name).write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "bpe", type=Path, help="bpe_simple_vocab_16e6.txt.gz or the open-clip wheel"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    args = parser.parse_args(argv)
    vocab, merges = build(read_bpe_gz(args.bpe))
    write_folder(args.out, vocab, merges)
    print(f"wrote {len(vocab)} ids and {len(merges)} merges to {args.out}")


if __name__ == "__main__":
    main()
