"""The pure-Python CLIP tokenizer against transformers' CLIPTokenizer on the same files."""

from __future__ import annotations

import json
import random
import shutil
import warnings

import numpy as np
import pytest

from ip2p_jax.models.tokenizer import BUNDLED_DIR, CLIPTokenizer, clean_text, fix_text

# transformers 5's CLIPTokenizer is the `tokenizers` (Rust) implementation: its normalizer is only
# NFC + whitespace collapse + lowercase, with no ftfy and no HTML unescape. So on strings that
# OpenAI's cleanup changes it gives other ids than OpenAI's tokenizer (which SD was trained with).
# Our ids must equal transformers' ids on OpenAI-cleaned text for every string, and on the raw text
# for the strings that cleanup leaves alone.
RAW_MATCH = [
    "a photo of a cat",
    "Turn the SKY into a STARRY NIGHT",
    "make it look like a Van Gogh painting!!! (oil, 1889) -- vivid; #art @home",
    "don't, it's, we're, I've, I'm, you'll, he'd",
    "DON'T IT'S",
    "café naïve résumé",
    "cafe\u0301",  # combining accent: NFC in both
    "把天空变成日落 日本語のテキスト 한국어",
    "make it 🌹🔥 👩‍👩‍👧",
    "  extra   spaces\n\nnew lines\tand\ttabs  ",
    "1234 2.5 3,000 1e-4",
    "",
    "<|endoftext|> hi",
]
NEEDS_CLEANUP = [
    "&amp; &lt;b&gt; &#39;quoted&#39; &amp;amp;",  # HTML entities (unescaped twice)
    "cafÃ© naÃ¯ve â€œmojibakeâ€\x9d",  # mojibake that ftfy fixes
    "don\u2019t \u201ccurly\u201d",  # ftfy straightens curly quotes
    "ﬁne ｆｕｌｌｗｉｄｔｈ",  # ligature and full-width forms
    "ΟΔΟΣ",  # str.lower() writes the final sigma, the Rust Lowercase does not
    "x\x00y\x07z",  # control characters
]
LONG = "a photo of a red cat sitting on a blue chair in a sunny garden, " * 8


@pytest.fixture(scope="module")
def tok() -> CLIPTokenizer:
    return CLIPTokenizer.bundled()


@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers")
    return transformers.CLIPTokenizer.from_pretrained(str(BUNDLED_DIR))


def _hf_ids(hf, text: str) -> list[int]:
    return hf(text, add_special_tokens=False)["input_ids"]


def _hf_padded(hf, texts: list[str]) -> np.ndarray:
    out = hf(texts, padding="max_length", truncation=True, max_length=77, return_tensors="np")
    return out["input_ids"]


def test_fix_text_skips_ftfy_only_where_ftfy_changes_nothing() -> None:
    import ftfy

    rng = random.Random(0)
    printable = [chr(code) for code in range(32, 127) if chr(code) != "&"]
    lines = ["".join(rng.choices(printable, k=rng.randint(0, 40))) for _ in range(20000)]
    # and lines ftfy does change, which must still reach it
    lines += [
        "caf\u00c3\u00a9",
        "\u201cquoted\u201d",
        "a &amp; b",
        "tab\there",
        "\ufb01ne",
        "x\x00y",
    ]
    for line in lines:
        assert fix_text(line) == ftfy.fix_text(line), repr(line)
    assert fix_text("caf\u00c3\u00a9") == "caf\u00e9"


def test_bundled_vocab_and_specials(tok: CLIPTokenizer) -> None:
    assert tok.vocab_size == 49408
    assert len(tok.bpe_ranks) == 48894
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, 49407)
    assert tok.encoder["<|startoftext|>"] == 49406 and tok.encoder["<|endoftext|>"] == 49407
    assert tok.model_max_length == 77
    assert tok.encode("a photo of a cat") == [320, 1125, 539, 320, 2368]


@pytest.mark.parametrize("text", RAW_MATCH + NEEDS_CLEANUP + [LONG])
def test_ids_match_transformers_on_cleaned_text(tok: CLIPTokenizer, hf, text: str) -> None:
    assert tok.encode(text) == _hf_ids(hf, clean_text(text))


@pytest.mark.parametrize("text", RAW_MATCH + [LONG])
def test_ids_match_transformers_on_raw_text(tok: CLIPTokenizer, hf, text: str) -> None:
    assert tok.encode(text) == _hf_ids(hf, text)


def test_padded_batch_matches_transformers(tok: CLIPTokenizer, hf) -> None:
    texts = RAW_MATCH + NEEDS_CLEANUP + [LONG]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = tok(texts)
    assert ours.dtype == np.int32 and ours.shape == (len(texts), 77)
    np.testing.assert_array_equal(ours, _hf_padded(hf, [clean_text(t) for t in texts]))
    assert tok("a cat").shape == (1, 77)


def test_truncation_keeps_eos_and_warns(tok: CLIPTokenizer) -> None:
    assert len(tok.encode(LONG)) > 75
    with pytest.warns(UserWarning, match="truncated.*77 tokens") as record:
        ids = tok([LONG, "a cat"])
    assert len(record) == 1
    assert ids.shape == (2, 77) and ids[0, -1] == 49407 and ids[0, 0] == 49406
    assert ids[1, 3] == 49407 and (ids[1, 4:] == 49407).all()

    ids2, removed = tok.tokenize_with_info([LONG, "a cat"])
    np.testing.assert_array_equal(ids, ids2)
    assert removed[1] is None
    assert removed[0] == tok.decode(tok.encode(LONG)[75:])
    assert removed[0].endswith("in a sunny garden ,")  # OpenAI's decode: one space per word end
    assert removed[0] in str(record[0].message)

    with pytest.warns(UserWarning, match="up to 5 tokens: 'a red cat'"):
        short = tok("a photo of a red cat", max_length=5)
    assert short.tolist() == [[49406, 320, 1125, 539, 49407]]


def test_sd2_style_folder_pads_with_exclamation(tmp_path, hf) -> None:
    shutil.copytree(BUNDLED_DIR, tmp_path, dirs_exist_ok=True)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        config = json.loads((tmp_path / name).read_text())
        config["pad_token"] = {"content": "!", "lstrip": False, "normalized": True}
        (tmp_path / name).write_text(json.dumps(config))
    tok = CLIPTokenizer.from_folder(tmp_path)
    assert tok.pad_token_id == 0 and tok.eos_token_id == 49407
    ids = tok(["a cat", ""])
    assert ids[0].tolist()[:4] == [49406, 320, 2368, 49407] and (ids[0, 4:] == 0).all()

    hf2 = type(hf).from_pretrained(str(tmp_path))
    assert hf2.pad_token_id == 0
    np.testing.assert_array_equal(ids, _hf_padded(hf2, ["a cat", ""]))


def test_missing_merges_is_a_clear_error(tmp_path) -> None:
    shutil.copy(BUNDLED_DIR / "vocab.json", tmp_path / "vocab.json")
    with pytest.raises(FileNotFoundError, match="merges.txt") as err:
        CLIPTokenizer.from_folder(tmp_path)
    assert str(tmp_path) in str(err.value) and "tokenizer.json" in str(err.value)


TOKENIZER_JSON_TEXTS = ["a photo of a cat", "make it look like a Van Gogh painting!!!", "", LONG]


def _save_hf(hf, folder, pad_token: str | None = None):
    """transformers' save_pretrained of the bundled tokenizer, left with tokenizer.json only.

    transformers 5 writes no vocab.json / merges.txt; they are removed for older versions.
    """
    hf = type(hf).from_pretrained(str(BUNDLED_DIR))
    if pad_token is not None:
        hf.pad_token = pad_token
    hf.save_pretrained(str(folder))
    for name in ("vocab.json", "merges.txt"):
        (folder / name).unlink(missing_ok=True)
    return hf


@pytest.mark.parametrize("merges_as", ["saved", "strings"])
def test_reads_tokenizer_json(tmp_path, tok: CLIPTokenizer, hf, merges_as: str) -> None:
    hf_saved = _save_hf(hf, tmp_path)
    if merges_as == "strings":  # older `tokenizers` write merges as "a b" strings
        data = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
        data["model"]["merges"] = [
            m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]
        ]
        (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    ours = CLIPTokenizer.from_folder(tmp_path)
    assert ours.encoder == tok.encoder and ours.bpe_ranks == tok.bpe_ranks
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (49406, 49407, 49407)
    assert ours.model_max_length == 77
    for text in TOKENIZER_JSON_TEXTS:
        assert ours.encode(text) == tok.encode(text) == _hf_ids(hf_saved, text)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids = ours(TOKENIZER_JSON_TEXTS)
        np.testing.assert_array_equal(ids, tok(TOKENIZER_JSON_TEXTS))
    np.testing.assert_array_equal(ids, _hf_padded(hf_saved, TOKENIZER_JSON_TEXTS))


def test_reads_tokenizer_json_with_exclamation_pad(tmp_path, hf) -> None:
    hf_saved = _save_hf(hf, tmp_path, pad_token="!")
    assert hf_saved.pad_token_id == 0
    ours = CLIPTokenizer.from_folder(tmp_path)
    assert ours.pad_token_id == 0 and ours.eos_token_id == 49407
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids = ours(TOKENIZER_JSON_TEXTS)
    assert ids[0].tolist()[:7] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (ids[0, 7:] == 0).all()
    np.testing.assert_array_equal(ids, _hf_padded(hf_saved, TOKENIZER_JSON_TEXTS))


def test_vocab_json_and_merges_txt_are_preferred(tmp_path, tok: CLIPTokenizer) -> None:
    shutil.copytree(BUNDLED_DIR, tmp_path, dirs_exist_ok=True)
    (tmp_path / "tokenizer.json").write_text("{}", encoding="utf-8")  # would fail if read
    assert CLIPTokenizer.from_folder(tmp_path).encoder == tok.encoder
