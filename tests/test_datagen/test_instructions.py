"""Stage 1 of the data generator: captions -> (instruction, edited caption) JSONL."""

from __future__ import annotations

import argparse
import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from datagen.instructions import (
    DEFAULT_EXAMPLES,
    DELIMITER_0,
    DELIMITER_1,
    STOP,
    Caption,
    InstructionSummary,
    SamplingConfig,
    call_seed,
    few_shot_prompt,
    generate_instructions,
    parse_completion,
    read_captions,
    read_examples,
)
from datagen.instructions_cli import _backend_options, add_instructions_arguments, run_instructions
from datagen.llm import OpenAIBackend, TemplateBackend, caption_from_prompt, make_backend


def _completion(instruction: str, edited: str) -> str:
    return instruction + DELIMITER_1 + edited + STOP


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _captions(*texts: str) -> list[Caption]:
    return [Caption(text=text, id=str(i), extra={}) for i, text in enumerate(texts)]


# --- parse_completion -----------------------------------------------------------------------


def test_parse_completion_accepts_and_strips():
    got = parse_completion("a dog", " make it a cat " + DELIMITER_1 + " a cat \n")
    assert got == ("make it a cat", "a cat")


def test_parse_completion_cuts_at_the_first_stop():
    completion = _completion("make it a cat", "a cat") + "\n\nnext caption\n##\nx\n%%\ny\nEND"
    assert parse_completion("a dog", completion) == ("make it a cat", "a cat")


@pytest.mark.parametrize(
    "completion",
    ["make it a cat, a cat", "a" + DELIMITER_1 + "b" + DELIMITER_1 + "c", "", STOP],
)
def test_parse_completion_malformed(completion):
    assert parse_completion("a dog", completion) == "malformed"


@pytest.mark.parametrize("completion", [" " + DELIMITER_1 + "a cat", "make it a cat" + DELIMITER_1])
def test_parse_completion_empty_part(completion):
    assert parse_completion("a dog", completion) == "empty"


@pytest.mark.parametrize(
    "edited", ["A Dog on the beach!", "a dog on the beach", " a dog on the BEACH."]
)
def test_parse_completion_unchanged_ignores_case_and_end_punctuation(edited):
    caption = "a dog on the beach."
    assert parse_completion(caption, "do nothing" + DELIMITER_1 + edited) == "unchanged"
    # Inner punctuation counts as a change, as in the original rule.
    assert parse_completion(caption, "x" + DELIMITER_1 + "a dog, on the beach") != "unchanged"


# --- read_captions --------------------------------------------------------------------------


def test_read_captions_txt(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_text("a dog\n\n  a red car  \n")
    assert read_captions(path) == [Caption("a dog", "0", {}), Caption("a red car", "2", {})]


def test_read_captions_jsonl(tmp_path):
    path = tmp_path / "captions.jsonl"
    rows = [
        {"caption": "a dog", "url": "http://x/1.jpg", "aesthetic": 6.5},
        {"input": "a cat", "id": 7},
        {"TEXT": "a bird"},
        {"text": "a tree", "url": "u", "id": "own-id"},
    ]
    path.write_text("\n".join(json.dumps(row) for row in rows[:2]) + "\n\n")
    with open(path, "a") as f:
        f.write("\n".join(json.dumps(row) for row in rows[2:]) + "\n")
    assert read_captions(path) == [
        Caption("a dog", "http://x/1.jpg", {"url": "http://x/1.jpg", "aesthetic": 6.5}),
        Caption("a cat", "7", {"id": 7}),
        Caption("a bird", "3", {}),
        Caption("a tree", "own-id", {"url": "u", "id": "own-id"}),
    ]


def test_read_captions_bad_json_names_file_and_line(tmp_path):
    path = tmp_path / "captions.jsonl"
    path.write_text('{"caption": "a dog"}\n{"caption": "a cat"\n')
    with pytest.raises(ValueError, match=r"captions\.jsonl, line 2: not valid JSON"):
        read_captions(path)


def test_read_captions_missing_field_names_file_line_and_fields(tmp_path):
    path = tmp_path / "captions.jsonl"
    path.write_text('{"caption": "a dog"}\n\n{"prompt": "a cat"}\n')
    with pytest.raises(ValueError) as error:
        read_captions(path)
    message = str(error.value)
    assert "captions.jsonl, line 3" in message
    assert "caption, input, TEXT, text" in message and "prompt" in message


def test_read_captions_unknown_suffix(tmp_path):
    path = tmp_path / "captions.csv"
    path.write_text("a dog\n")
    with pytest.raises(ValueError, match=r"\.txt or \.jsonl"):
        read_captions(path)


# --- prompts and the template backend -------------------------------------------------------


def test_few_shot_prompt_is_the_paper_format():
    examples = [("a dog", "make it a cat", "a cat"), ("a car", "make it red", "a red car")]
    expected = (
        "a dog\n##\nmake it a cat\n%%\na cat\nEND\n\n"
        "a car\n##\nmake it red\n%%\na red car\nEND\n\n"
        "a house\n##\n"
    )
    assert few_shot_prompt("a house", examples) == expected
    default = few_shot_prompt("a house")
    assert default.count(STOP + "\n\n") == len(DEFAULT_EXAMPLES) >= 3
    assert default.endswith(STOP + "\n\na house" + DELIMITER_0)


def test_caption_from_prompt_handles_plain_and_few_shot_prompts():
    assert caption_from_prompt("a red car" + DELIMITER_0) == "a red car"
    assert caption_from_prompt(few_shot_prompt("a red car")) == "a red car"


def test_template_backend_is_deterministic_and_edits_the_caption():
    captions = ["a red car on a street", "a photo of a dog", "a house by the lake", "portrait"]
    prompts = [c + DELIMITER_0 for c in captions]
    backend, sampling = TemplateBackend(), SamplingConfig()
    first = backend.complete(prompts, sampling, seed=3)
    assert first == backend.complete(prompts, sampling, seed=3)
    assert len(first) == len(prompts)
    for caption, completion in zip(captions, first, strict=True):
        parsed = parse_completion(caption, completion)
        assert isinstance(parsed, tuple), (caption, completion, parsed)
        assert parsed[1].lower() != caption.lower()
    # Seeds choose among the templates: across seeds a caption gets several edits.
    edits = {backend.complete(prompts[:1], sampling, seed=s)[0] for s in range(40)}
    assert len(edits) >= 5
    # A colour caption can get its colour swapped.
    assert any("make the red car" in e for e in edits)


# --- generate_instructions ------------------------------------------------------------------


class ScriptedBackend:
    """Returns scripted completions: caption -> one completion per try (the last repeats)."""

    def __init__(self, script: dict[str, list[str]]):
        self.script = script
        self.calls: list[tuple[list[str], int]] = []
        self.tries: dict[str, int] = {}

    def complete(self, prompts, sampling, seed):
        self.calls.append((list(prompts), seed))
        out = []
        for prompt in prompts:
            caption = caption_from_prompt(prompt)
            n = self.tries.get(caption, 0)
            self.tries[caption] = n + 1
            answers = self.script[caption]
            out.append(answers[min(n, len(answers) - 1)])
        return out


def test_generate_with_template_backend_writes_lines(tmp_path):
    captions = [Caption(f"a red car number {i}", f"u{i}", {"url": f"u{i}"}) for i in range(5)]
    out = tmp_path / "sub" / "instructions.jsonl"
    summary = generate_instructions(captions, TemplateBackend(), out, batch_size=2, progress=False)
    assert summary.generated == 5 and summary.total == 5 and summary.failed_captions == 0
    lines = _lines(out)
    assert [line["input"] for line in lines] == [c.text for c in captions]
    for line, caption in zip(lines, captions, strict=True):
        assert line["id"] == caption.id and line["url"] == caption.id
        assert line["edit"] and line["output"] and line["output"] != line["input"]
        assert set(line) == {"id", "url", "input", "edit", "output"}


def test_generate_counts_every_rejection_reason_and_retries(tmp_path):
    script = {
        "a dog": [_completion("make it a cat", "a cat")],
        "a car": [_completion("keep it", "A car!")],  # unchanged on every try: fails
        "a bird": [
            "no delimiter",
            _completion("make it a cat", "A cat!"),  # the same edit as "a dog"'s
            " " + DELIMITER_1 + "x",
            _completion("make it blue", "a blue bird"),
        ],
    }
    backend = ScriptedBackend(script)
    captions = _captions("a dog", "a car", "a dog", "a bird")
    summary = generate_instructions(
        captions, backend, tmp_path / "o.jsonl", sampling=SamplingConfig(), progress=False
    )
    assert summary.rejected == {"malformed": 1, "empty": 1, "unchanged": 4, "duplicate": 1}
    assert summary.generated == 2
    assert summary.failed_captions == 1
    assert summary.duplicate_captions == 1
    assert backend.tries == {"a dog": 1, "a car": 4, "a bird": 4}  # 1 + retries at most
    # The first call has the three distinct captions; retries only those still rejected.
    assert [len(prompts) for prompts, _ in backend.calls] == [3, 2, 2, 2]
    lines = _lines(tmp_path / "o.jsonl")
    assert [(x["id"], x["input"], x["edit"], x["output"]) for x in lines] == [
        ("0", "a dog", "make it a cat", "a cat"),
        ("3", "a bird", "make it blue", "a blue bird"),
    ]
    text = summary.describe()
    assert "2 new" in text and "7 tries rejected" in text and "1 caption(s) failed" in text


def test_generate_duplicate_result_is_dropped_for_a_later_caption(tmp_path):
    same = _completion("make it a cat", "a cat")
    backend = ScriptedBackend({"a dog": [same], "a puppy": [same, _completion("add a hat", "x")]})
    summary = generate_instructions(
        _captions("a dog", "a puppy"), backend, tmp_path / "o.jsonl", batch_size=1, progress=False
    )
    assert summary.rejected["duplicate"] == 1 and summary.generated == 2
    assert [x["output"] for x in _lines(tmp_path / "o.jsonl")] == ["a cat", "x"]


def test_generate_batches_and_seeds_are_reproducible(tmp_path):
    captions = _captions(*(f"caption {i}" for i in range(5)))
    script = {c.text: ["bad", _completion("edit", c.text + " edited")] for c in captions}
    runs = []
    for name in ("a.jsonl", "b.jsonl"):
        backend = ScriptedBackend(script)
        generate_instructions(
            captions, backend, tmp_path / name, batch_size=2, seed=7, progress=False
        )
        runs.append(backend.calls)
    assert [len(p) for p, _ in runs[0]] == [2, 2, 2, 2, 1, 1]
    assert [s for _, s in runs[0]] == [s for _, s in runs[1]]
    seeds = [s for _, s in runs[0]]
    assert len(set(seeds)) == len(seeds)  # every (batch, try) gets its own seed
    assert seeds[0] == call_seed(7, 0, 0) and seeds[1] == call_seed(7, 0, 1)
    assert call_seed(8, 0, 0) != call_seed(7, 0, 0)
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()


def test_generate_stops_at_num_samples(tmp_path):
    captions = _captions(*(f"caption {i}" for i in range(10)))
    backend = ScriptedBackend({c.text: [_completion("edit", c.text + "!?x")] for c in captions})
    summary = generate_instructions(
        captions, backend, tmp_path / "o.jsonl", num_samples=3, batch_size=8, progress=False
    )
    assert summary.generated == 3 and len(_lines(tmp_path / "o.jsonl")) == 3
    assert [len(p) for p, _ in backend.calls] == [3]  # asked for no more than needed


def test_generate_resumes_without_duplicates(tmp_path):
    captions = _captions(*(f"a red car number {i}" for i in range(5)), "a red car number 1")
    out = tmp_path / "o.jsonl"
    first = generate_instructions(captions, TemplateBackend(), out, num_samples=2, progress=False)
    assert (first.generated, first.resumed) == (2, 0)
    second = generate_instructions(captions, TemplateBackend(), out, progress=False)
    assert (second.generated, second.resumed, second.duplicate_captions) == (3, 2, 1)
    third = generate_instructions(captions, TemplateBackend(), out, num_samples=9, progress=False)
    assert (third.generated, third.resumed, third.total) == (0, 5, 5)
    inputs = [line["input"] for line in _lines(out)]
    assert sorted(inputs) == sorted({c.text for c in captions})


def test_unicode_line_separators_inside_captions_survive_a_resume(tmp_path):
    # U+0085 and U+2028 occur in web captions; JSON keeps them unescaped with ensure_ascii=False.
    texts = ["caf\u00e9 sign\u0085 at night", "a red car\u2028on a street", "a dog\r"]
    path = tmp_path / "captions.jsonl"
    path.write_text("".join(json.dumps({"caption": t}, ensure_ascii=False) + "\n" for t in texts))
    captions = read_captions(path)
    assert [c.text for c in captions] == [texts[0], texts[1], "a dog"]
    out = tmp_path / "o.jsonl"
    generate_instructions(captions, TemplateBackend(), out, progress=False)
    again = generate_instructions(captions, TemplateBackend(), out, progress=False)
    assert (again.resumed, again.generated) == (3, 0)


def test_generate_truncates_a_torn_last_line(tmp_path):
    captions = _captions("a dog", "a cat", "a bird")
    out = tmp_path / "o.jsonl"
    generate_instructions(captions[:2], TemplateBackend(), out, progress=False)
    good = out.read_text()
    out.write_text(good + '{"id": "2", "input": "a bird", "ed')  # killed mid-line
    with pytest.warns(UserWarning, match="partly written last line"):
        summary = generate_instructions(captions, TemplateBackend(), out, progress=False)
    assert (summary.resumed, summary.generated, summary.truncated_torn_line) == (2, 1, True)
    lines = _lines(out)
    assert [line["input"] for line in lines] == ["a dog", "a cat", "a bird"]


def test_generate_truncates_an_invalid_last_line_but_rejects_one_in_the_middle(tmp_path):
    out = tmp_path / "o.jsonl"
    out.write_text('{"input": "a dog", "edit": "e", "output": "o"}\n{"input": \n')
    with pytest.warns(UserWarning):
        summary = generate_instructions([], TemplateBackend(), out, progress=False)
    assert summary.resumed == 1 and out.read_text().count("\n") == 1
    out.write_text('{"input": "a"}\nnot json\n{"input": "b"}\n')
    with pytest.raises(ValueError, match=r"o\.jsonl, line 2"):
        generate_instructions([], TemplateBackend(), out, progress=False)


def test_summary_describe_mentions_the_counts():
    summary = InstructionSummary(
        generated=4, resumed=1, rejected={"malformed": 2, "empty": 0}, failed_captions=1
    )
    text = summary.describe()
    assert "4 new" in text and "5 in total" in text and "2 malformed" in text
    assert "empty" not in text


# --- transformers: penalties, stop text, a tiny random LM -----------------------------------


def test_penalty_logits_processor_exact_numbers():
    import torch

    from datagen.llm import PenaltyLogitsProcessor

    processor = PenaltyLogitsProcessor(prompt_length=2, frequency_penalty=0.5, presence_penalty=2.0)
    # Prompt tokens (3, 3) are not counted; generated: 1, 1, 4 in row 0 and 0 in row 1.
    input_ids = torch.tensor([[3, 3, 1, 1, 4], [3, 0, 0, 2, 2]])
    scores = torch.zeros(2, 5)
    out = processor(input_ids, scores.clone())
    expected = torch.tensor(
        [
            [0.0, -(2 * 0.5 + 2.0), 0.0, 0.0, -(0.5 + 2.0)],
            [-(0.5 + 2.0), 0.0, -(2 * 0.5 + 2.0), 0.0, 0.0],
        ]
    )
    torch.testing.assert_close(out, expected)
    # Nothing generated yet: nothing to penalize.
    assert torch.equal(processor(input_ids[:, :2], scores), scores)


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> Path:
    """A 1-layer GPT-2 with random weights and a byte-level BPE tokenizer, saved locally."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_lm")
    corpus = [few_shot_prompt("a red car on a street"), "a photo of a dog\n##\nEND %% ##"]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus * 4, vocab_size=300, min_frequency=1, special_tokens=["<eos>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<eos>")
    tokenizer.save_pretrained(folder)  # no pad token: the backend must fall back to eos
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=1,
        n_head=2,
        n_embd=16,
        n_positions=2048,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_backend(tiny_lm):
    from datagen.llm import TransformersBackend

    return TransformersBackend(tiny_lm)


def test_stop_on_text_looks_at_generated_text_only(tiny_backend):
    import torch

    from datagen.llm import StopOnText

    tokenizer = tiny_backend.tokenizer
    rows = [tokenizer("make it\n%%\nx\nEND")["input_ids"], tokenizer("a dog\n##\n")["input_ids"]]
    width = max(map(len, rows))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows])
    assert StopOnText(tokenizer, prompt_length=0)(ids, None).tolist() == [True, False]
    # STOP inside the prompt does not count.
    prompt = tokenizer("x\nEND")["input_ids"]
    ids = torch.tensor([prompt + tokenizer(" a")["input_ids"]])
    assert StopOnText(tokenizer, prompt_length=len(prompt))(ids, None).tolist() == [False]


def test_transformers_backend_samples_reproducibly(tiny_backend):
    import torch

    assert tiny_backend.tokenizer.pad_token == "<eos>"
    prompts = ["a red car" + DELIMITER_0, "a photo of a dog on the beach" + DELIMITER_0]
    sampling = SamplingConfig(max_tokens=12)
    before = torch.random.get_rng_state()
    first = tiny_backend.complete(prompts, sampling, seed=1)
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's RNG is untouched
    assert len(first) == 2 and all(isinstance(text, str) for text in first)
    assert any(first)
    assert tiny_backend.complete(prompts, sampling, seed=1) == first
    assert tiny_backend.complete(prompts, sampling, seed=2) != first


def _spy_generate(backend, prompts, sampling) -> tuple[list[int], list[int]]:
    """Run `complete` on one prompt; return the prompt's and the generated token ids."""
    captured = []
    generate = backend.model.generate

    def spy(**kwargs):
        captured.append((kwargs["input_ids"], generate(**kwargs)))
        return captured[-1][1]

    backend.model.generate = spy
    try:
        backend.complete(prompts, sampling, seed=0)
    finally:
        del backend.model.generate
    prompt, output = captured[0]
    return prompt[0].tolist(), output[0, prompt.shape[1] :].tolist()


def test_transformers_backend_prompts(tiny_backend, tiny_lm):
    from datagen.llm import TransformersBackend

    sampling = SamplingConfig(max_tokens=1)
    prompt, _ = _spy_generate(tiny_backend, ["a red car" + DELIMITER_0], sampling)
    assert tiny_backend.tokenizer.decode(prompt) == few_shot_prompt("a red car")
    bare = TransformersBackend(tiny_lm, few_shot=False)
    prompt, _ = _spy_generate(bare, ["a red car" + DELIMITER_0], sampling)
    assert bare.tokenizer.decode(prompt) == "a red car" + DELIMITER_0


def test_transformers_backend_applies_the_penalty(tiny_lm):
    from datagen.llm import TransformersBackend

    # Greedy decoding of this random model on the bare prompt loops on one token...
    backend = TransformersBackend(tiny_lm, few_shot=False)
    prompts = ["a red car" + DELIMITER_0]
    greedy = SamplingConfig(temperature=0, frequency_penalty=0, max_tokens=30)
    _, plain = _spy_generate(backend, prompts, greedy)
    assert len(set(plain)) < len(plain)
    # ...which a huge presence penalty forbids.
    penalized = SamplingConfig(temperature=0, presence_penalty=1e4, max_tokens=30)
    _, generated = _spy_generate(backend, prompts, penalized)
    assert len(generated) > 10 and len(set(generated)) == len(generated)


def test_generate_instructions_end_to_end_with_transformers(tiny_backend, tmp_path):
    calls = []

    class Counting:
        def complete(self, prompts, sampling, seed):
            calls.append(len(prompts))
            return tiny_backend.complete(prompts, sampling, seed)

    captions = _captions("a red car", "a photo of a dog", "a house by the lake")
    sampling = SamplingConfig(max_tokens=8, retries=1)
    summary = generate_instructions(
        captions, Counting(), tmp_path / "o.jsonl", sampling=sampling, batch_size=2, progress=False
    )
    tries = sum(calls)
    assert tries == summary.generated + sum(summary.rejected.values())
    assert summary.generated + summary.failed_captions == len(captions)
    assert len(_lines(tmp_path / "o.jsonl")) == summary.generated


# --- OpenAI-compatible server ---------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server's name)
        server = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server.requests.append((self.path, dict(self.headers), body))
        status, answer = server.answers.pop(0) if server.answers else server.default(body)
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def _echo(body):
    # Choices reversed, out of index order: the client must sort them.
    choices = [
        {"index": i, "text": f" edit {i}{DELIMITER_1}out {i}", "finish_reason": "stop"}
        for i in range(len(body["prompt"]))
    ]
    return 200, {"id": "cmpl", "object": "text_completion", "choices": choices[::-1]}


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.requests, httpd.answers, httpd.default = [], [], _echo
    thread = threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _url(httpd) -> str:
    return f"http://127.0.0.1:{httpd.server_address[1]}/v1/"


def test_openai_backend_request_and_choice_order(server):
    backend = OpenAIBackend(_url(server), "my-model", api_key="k", few_shot=False)
    sampling = SamplingConfig(temperature=0.5, frequency_penalty=0.3)
    out = backend.complete(["a" + DELIMITER_0, "b" + DELIMITER_0, "c" + DELIMITER_0], sampling, 9)
    assert out == [f" edit {i}{DELIMITER_1}out {i}" for i in range(3)]
    (path, headers, body), *_ = server.requests
    assert path == "/v1/completions"
    assert headers["Authorization"] == "Bearer k"
    assert body["model"] == "my-model"
    assert body["prompt"] == ["a" + DELIMITER_0, "b" + DELIMITER_0, "c" + DELIMITER_0]
    assert body["stop"] == [STOP]
    assert (body["temperature"], body["frequency_penalty"], body["top_p"]) == (0.5, 0.3, 1.0)
    assert (body["max_tokens"], body["presence_penalty"], body["seed"]) == (256, 0.0, 9)


def test_openai_backend_few_shot_and_one_prompt_per_request(server, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    backend = OpenAIBackend(_url(server), "m", list_prompts=False)
    assert len(backend.complete(["a" + DELIMITER_0, "b" + DELIMITER_0], SamplingConfig(), 0)) == 2
    assert [body["prompt"] for _, _, body in server.requests] == [
        [few_shot_prompt("a")],
        [few_shot_prompt("b")],
    ]
    assert "Authorization" not in server.requests[0][1]


def test_openai_backend_retries_server_errors(server):
    server.answers = [(500, {"error": "busy"}), (429, {"error": {"message": "slow down"}})]
    backend = OpenAIBackend(_url(server), "m", backoff=0.001, few_shot=False)
    assert backend.complete(["a" + DELIMITER_0], SamplingConfig(), 0) == [
        f" edit 0{DELIMITER_1}out 0"
    ]
    assert len(server.requests) == 3


def test_openai_backend_gives_up_naming_url_and_last_error(server):
    server.answers = [(503, {"error": {"message": "overloaded"}})] * 3
    backend = OpenAIBackend(_url(server), "m", max_attempts=3, backoff=0.001)
    with pytest.raises(RuntimeError, match=r"/v1/completions: no answer after 3 .*overloaded"):
        backend.complete(["a"], SamplingConfig(), 0)
    assert len(server.requests) == 3


def test_openai_backend_client_error_raises_at_once(server):
    server.answers = [(400, {"error": {"message": "model 'm' not found"}})]
    backend = OpenAIBackend(_url(server), "m", backoff=0.001)
    with pytest.raises(RuntimeError, match=r"HTTP 400: model 'm' not found"):
        backend.complete(["a"], SamplingConfig(), 0)
    assert len(server.requests) == 1


def test_openai_backend_connection_refused_is_retried_then_raises():
    with ThreadingHTTPServer(("127.0.0.1", 0), _Handler) as closed:
        port = closed.server_address[1]  # closed on exit: nothing listens there
    backend = OpenAIBackend(f"http://127.0.0.1:{port}/v1", "m", max_attempts=2, backoff=0.001)
    with pytest.raises(
        RuntimeError, match=rf"127\.0\.0\.1:{port}/v1/completions: no answer after 2"
    ):
        backend.complete(["a"], SamplingConfig(), 0)


# --- make_backend and the command line ------------------------------------------------------


def test_make_backend():
    assert isinstance(make_backend("template"), TemplateBackend)
    backend = make_backend("openai", base_url="http://h/v1/", model="m")
    assert isinstance(backend, OpenAIBackend) and backend.url == "http://h/v1/completions"
    with pytest.raises(ValueError, match="template, transformers, openai"):
        make_backend("gpt3")


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_instructions_arguments(parser)
    return parser.parse_args(argv)


_OPENAI = ["--backend", "openai", "--model", "m", "--base-url", "http://127.0.0.1:9/v1"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--backend", "transformers"], "needs --model"),
        (["--backend", "openai", "--model", "m"], "needs --base-url"),
        ([*_OPENAI, "--examples", "missing.jsonl", "--no-few-shot"], "exclude each other"),
        (["--backend", "template", "--examples", "missing.jsonl"], "template uses no prompt"),
        ([*_OPENAI, "--concurrency", "0"], "--concurrency must be at least 1, got 0"),
        (
            ["--backend", "transformers", "--model", "m", "--concurrency", "2"],
            "--concurrency 2 is for --backend openai",
        ),
    ],
)
def test_cli_checks_options_before_loading(tmp_path, extra, message):
    args = _parse("--captions", str(tmp_path / "missing.txt"), "--out", "o.jsonl", *extra)
    with pytest.raises(ValueError, match=message):  # not FileNotFoundError: checked first
        run_instructions(args)


def test_cli_backend_is_required_and_its_error_lists_the_choices(tmp_path):
    args = _parse("--captions", str(tmp_path / "missing.txt"), "--out", "o.jsonl")
    assert args.backend is None  # no silent default
    with pytest.raises(ValueError) as error:  # not FileNotFoundError: checked first
        run_instructions(args)
    message = str(error.value)
    assert "--backend is required" in message
    assert all(name in message for name in ("transformers", "openai", "template"))
    assert "smoke test" in message and "not training data" in message
    with pytest.raises(SystemExit):  # argparse still refuses an unknown backend
        _parse("--captions", "c.txt", "--out", "o.jsonl", "--backend", "gpt3")


def test_the_ip2p_command_without_backend_is_a_clear_error(tmp_path, capsys):
    from ip2p_jax.apps.cli.main import main

    code = main(["datagen", "instructions", "--captions", "c.txt", "--out", str(tmp_path / "o")])
    assert code == 2
    assert "--backend is required" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# --- user examples in the few-shot prompt ---------------------------------------------------

_USER_EXAMPLES = [
    ("a bowl of ramen", "add a fried egg", "a bowl of ramen with a fried egg"),
    ("a lighthouse on a cliff", "make it stormy", "a lighthouse on a cliff in a storm"),
]


def _write_examples(path: Path, examples=_USER_EXAMPLES) -> Path:
    # The first one with the original's "caption" key and padded fields, then a blank line.
    first, *rest = examples
    lines = [json.dumps({"caption": first[0], "edit": f" {first[1]} ", "output": first[2]}), ""]
    lines += [json.dumps(dict(zip(("input", "edit", "output"), e, strict=True))) for e in rest]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_read_examples_reads_prompts_and_strips(tmp_path):
    assert read_examples(_write_examples(tmp_path / "ex.jsonl")) == _USER_EXAMPLES


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ('{"input": "a", "edit": "b"}', "needs non-empty string fields"),
        ('{"input": "a", "edit": "b\\n%%\\nc", "output": "d"}', "field 'edit' holds"),
        ('{"input": "a\\n##\\n", "edit": "b", "output": "d"}', "field 'input' holds"),
        ('{"input": "a", "edit": "b", "output": "c\\nEND"}', "field 'output' holds"),
    ],
)
def test_read_examples_errors_name_file_and_line(tmp_path, bad, message):
    path = tmp_path / "ex.jsonl"
    path.write_text('{"input": "x", "edit": "y", "output": "z"}\n\n' + bad + "\n")
    with pytest.raises(ValueError, match=message) as error:
        read_examples(path)
    assert f"{path}:3:" in str(error.value)


def test_cli_examples_reach_the_openai_prompt(server, tmp_path):
    captions = tmp_path / "captions.txt"
    captions.write_text("a red car\n")
    examples = _write_examples(tmp_path / "ex.jsonl")
    args = _parse(
        "--captions", str(captions), "--out", str(tmp_path / "o.jsonl"), "--backend", "openai",
        "--model", "m", "--base-url", _url(server), "--examples", str(examples),
    )  # fmt: skip
    assert run_instructions(args) == 0
    prompt = server.requests[0][2]["prompt"]
    assert prompt == [few_shot_prompt("a red car", _USER_EXAMPLES)]
    assert "a bowl of ramen" in prompt[0] and DEFAULT_EXAMPLES[0][0] not in prompt[0]


def test_cli_examples_reach_the_transformers_prompt(tiny_lm, tmp_path):
    examples = read_examples(_write_examples(tmp_path / "ex.jsonl"))
    args = _parse(
        "--captions", "c.txt", "--out", "o.jsonl", "--backend", "transformers",
        "--model", str(tiny_lm), "--examples", "ex.jsonl",
    )  # fmt: skip
    backend = make_backend("transformers", **_backend_options(args, examples))
    prompt, _ = _spy_generate(backend, ["a red car" + DELIMITER_0], SamplingConfig(max_tokens=1))
    assert backend.tokenizer.decode(prompt) == few_shot_prompt("a red car", _USER_EXAMPLES)


def test_cli_bad_examples_fail_before_the_model_loads(tmp_path):
    captions = tmp_path / "captions.txt"
    captions.write_text("a red car\n")
    examples = tmp_path / "ex.jsonl"
    examples.write_text('{"input": "a", "edit": "b", "output": "c"}\nnot json\n')
    args = _parse(
        "--captions", str(captions), "--out", str(tmp_path / "o.jsonl"),
        "--backend", "transformers", "--model", str(tmp_path / "no-such-model"),
        "--examples", str(examples),
    )  # fmt: skip
    with pytest.raises(ValueError, match=rf"{examples}:2: not JSON"):
        run_instructions(args)


def test_cli_runs_the_template_backend(tmp_path, capsys):
    captions = tmp_path / "captions.txt"
    captions.write_text("a red car\na dog\na red car\n")
    out = tmp_path / "o.jsonl"
    args = _parse(
        "--captions", str(captions), "--out", str(out), "--num", "5", "--seed", "3",
        "--backend", "template",
    )  # fmt: skip
    assert args.temperature == 0.7 and args.retries == 3 and args.frequency_penalty == 0.1
    assert run_instructions(args) == 0
    assert [line["input"] for line in _lines(out)] == ["a red car", "a dog"]
    printed = capsys.readouterr().out
    assert "2 new" in printed and "1 duplicate input caption" in printed


# --- concurrency ----------------------------------------------------------------------------


def _answer(caption: str, seed: int) -> str:
    """A deterministic completion: malformed for about a quarter of (caption, seed)."""
    if int(hashlib.sha256(f"{caption}:{seed}".encode()).hexdigest(), 16) % 4 == 0:
        return "no delimiter here"
    return f" edit {caption} {seed % 7}{DELIMITER_1}{caption} edited {seed % 7}"


class _InFlight:
    """A fake server's answers that record how many requests were in flight at once.

    With ``wait_for_peer`` a request waits (up to 2 s) until a second one has arrived, so a
    concurrent client is seen overlapping however the threads are scheduled.
    """

    def __init__(self, wait_for_peer: bool):
        self.condition = threading.Condition()
        self.now = self.most = 0
        self.wait_for_peer = wait_for_peer

    def __call__(self, body):
        with self.condition:
            self.now += 1
            self.most = max(self.most, self.now)
            self.condition.notify_all()
            if self.wait_for_peer:
                self.condition.wait_for(lambda: self.most >= 2, timeout=2)
        try:
            texts = [_answer(caption_from_prompt(p), body["seed"]) for p in body["prompt"]]
            choices = [{"index": i, "text": t} for i, t in enumerate(texts)]
            return 200, {"choices": choices}
        finally:
            with self.condition:
                self.now -= 1


def test_cli_concurrency_keeps_requests_in_flight_and_the_output_of_concurrency_1(
    server, tmp_path, capsys
):
    captions = tmp_path / "captions.txt"
    captions.write_text("".join(f"caption {i}\n" for i in range(23)))
    outputs = {}
    for concurrency in (1, 4):
        server.default = counter = _InFlight(wait_for_peer=concurrency > 1)
        server.requests.clear()
        out = tmp_path / f"o{concurrency}.jsonl"
        args = _parse(
            "--captions", str(captions), "--out", str(out), "--batch-size", "3",
            "--concurrency", str(concurrency), "--seed", "5", *_OPENAI[:4],
            "--base-url", _url(server),
        )  # fmt: skip
        assert run_instructions(args) == 0
        outputs[concurrency] = (out.read_text(), capsys.readouterr().out.splitlines()[-2])
        if concurrency == 1:
            assert counter.most == 1
        else:
            assert counter.most >= 2, "never more than one request in flight"
    assert len(server.requests) > 8  # 8 batches and some retries
    text, summary = outputs[1]
    assert "rejected (" in summary and "malformed" in summary  # retries were exercised
    assert [line["input"] for line in map(json.loads, text.splitlines())][:3] == [
        "caption 0",
        "caption 1",
        "caption 2",
    ]
    assert outputs[4] == outputs[1]  # the same file, the same counts


class _SlowFirstBackend:
    """Thread-safe, answers by (caption, seed); "a dog" answers only after "a puppy" has.

    At their first try both give the same result, so at concurrency 2 the later batch
    ("a puppy") accepts it before the earlier one is written and must run again on its turn.
    """

    def __init__(self, delay: float):
        self.delay = delay
        self.first_seeds = {call_seed(0, index, 0) for index in range(3)}  # batch_size 1
        self.puppy_answered = threading.Event()
        self.calls: list[tuple[tuple[str, ...], int]] = []
        self.lock = threading.Lock()

    def complete(self, prompts, sampling, seed):
        captions = tuple(caption_from_prompt(p) for p in prompts)
        with self.lock:
            self.calls.append((captions, seed))
        if "a dog" in captions and self.delay:
            self.puppy_answered.wait(timeout=2)
            time.sleep(self.delay)  # let the "a puppy" batch finish its tries meanwhile
        first = seed in self.first_seeds
        answers = [
            _completion("make it a cat", "a cat")
            if first and caption in ("a dog", "a puppy")
            else _completion("edit", f"{caption} {'first' if first else 'retried'}")
            for caption in captions
        ]
        if "a puppy" in captions:
            self.puppy_answered.set()
        return answers


def test_generate_concurrent_batch_that_raced_an_earlier_result_is_run_again(tmp_path):
    captions = _captions("a dog", "a puppy", "a bird")
    runs = {}
    for concurrency in (1, 2):
        backend = _SlowFirstBackend(delay=0.2 if concurrency > 1 else 0)
        out = tmp_path / f"o{concurrency}.jsonl"
        summary = generate_instructions(
            captions, backend, out, batch_size=1, concurrency=concurrency, progress=False
        )
        runs[concurrency] = (out.read_text(), summary, backend.calls)
    text, summary, calls = runs[1]
    assert [(x["input"], x["output"]) for x in map(json.loads, text.splitlines())] == [
        ("a dog", "a cat"),
        ("a puppy", "a puppy retried"),  # its first result was a duplicate
        ("a bird", "a bird first"),
    ]
    assert summary.rejected["duplicate"] == 1
    assert runs[2][0] == text and runs[2][1] == summary
    # The puppy batch ran twice (speculatively, then on its turn): more calls than at 1.
    assert len(runs[2][2]) > len(calls)


def test_generate_concurrency_stops_at_num_samples_and_resumes(tmp_path):
    captions = _captions(*(f"caption {i}" for i in range(20)))
    script = {c.text: ["bad", _completion("edit", c.text + " x")] for c in captions}
    out = tmp_path / "o.jsonl"
    backend = ScriptedBackend(script)
    summary = generate_instructions(
        captions, backend, out, num_samples=7, batch_size=2, concurrency=3, progress=False
    )
    assert summary.generated == 7 and len(_lines(out)) == 7
    # Never more captions asked for than lines missing: 7 captions, in batches of 2, 2, 2, 1.
    assert sorted(len(p) for p, _ in backend.calls) == [1, 1, 2, 2, 2, 2, 2, 2]
    again = generate_instructions(
        captions, ScriptedBackend(script), out, concurrency=3, progress=False
    )
    assert (again.resumed, again.generated) == (7, 13)
    assert [x["input"] for x in _lines(out)] == [c.text for c in captions]


def test_generate_concurrency_error_raises_after_writing_the_batches_before(tmp_path):
    class Failing:
        def complete(self, prompts, sampling, seed):
            caption = caption_from_prompt(prompts[0])
            if caption == "caption 2":
                raise RuntimeError("server gone")
            return [_completion("edit", caption + " x")]

    out = tmp_path / "o.jsonl"
    with pytest.raises(RuntimeError, match="server gone"):
        generate_instructions(
            _captions(*(f"caption {i}" for i in range(6))), Failing(), out,
            batch_size=1, concurrency=3, progress=False,
        )  # fmt: skip
    assert [x["input"] for x in _lines(out)] == ["caption 0", "caption 1"]
