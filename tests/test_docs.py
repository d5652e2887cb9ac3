"""The manual (README.md, docs/*.md, the shapes model card) against the repository.

- every relative link and image resolves to a file or folder, and every #anchor to a heading;
- every ``ip2p ...`` command shown (in shell code blocks and inline code) names subcommands
  that exist and flags that the real argument parser knows (a --help-level check: nothing
  runs); ``make`` lines name Makefile targets;
- every repository path and ``ip2p_jax.*`` module named in code exists, and the Python code
  blocks parse.

Failures name the file, the line and what is wrong.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODEL_CARD = ROOT / "ip2p_jax" / "assets" / "shapes_model" / "README.md"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), MODEL_CARD]
PAGE_IDS = [str(p.relative_to(ROOT)) for p in PAGES]

FENCE = re.compile(r"^\s*(```|~~~)\s*([\w+-]*)")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*(\S+)", re.MULTILINE)
INLINE_CODE = re.compile(r"`([^`]+)`")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
# Paths inside the repository that the manual names (not outputs such as out/ or runs/).
REPO_PATH = re.compile(
    r"^(?:ip2p_jax|datagen|scripts|configs|tests|docs|\.ci)(?:/[\w.-]+)*/?(?:::\w+)?$"
)
MODULE = re.compile(r"\bip2p_jax(?:\.\w+)+")
SHELL_LANGUAGES = {"", "sh", "bash", "shell", "console", "text"}
WRAPPERS = {"srun", "sudo", "exec", "time", "env"}  # run the command after them
SEPARATORS = {"|", "||", "&&", ";"}
PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*$")  # MODEL, OUT, CHECKPOINT, ...


@dataclass
class Page:
    path: Path
    prose: str  # the text with code blocks blanked (line numbers kept)
    blocks: list[tuple[str, int, list[str]]]  # (language, first line number, lines)

    @property
    def name(self) -> str:
        return str(self.path.relative_to(ROOT))


def read_page(path: Path) -> Page:
    prose, blocks = [], []
    fence = None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        match = FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)
            blocks.append((match.group(2).lower(), number + 1, []))
            prose.append("")
        elif fence is not None:
            if line.strip().startswith(fence):
                fence = None
            else:
                blocks[-1][2].append(line)
            prose.append("")
        else:
            prose.append(line)
    return Page(path, "\n".join(prose), blocks)


def line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for line in read_page(path).prose.splitlines():
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def without_inline_code(text: str) -> str:
    """Inline code replaced by spaces (newlines kept), so links inside it are not links."""
    return INLINE_CODE.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)


def inline_spans(page: Page) -> list[tuple[int, str]]:
    return [
        (line_of(page.prose, m.start()), " ".join(m.group(1).split()))
        for m in INLINE_CODE.finditer(page.prose)
    ]


def logical_lines(lines: list[str], first: int) -> list[tuple[int, str]]:
    """Shell lines with their `\\` continuations joined, with the first line's number."""
    out, pending, start = [], "", first
    for offset, line in enumerate(lines):
        if not pending:
            start = first + offset
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((start, pending + line))
        pending = ""
    if pending:
        out.append((start, pending))
    return out


def shell_words(line: str) -> list[str]:
    try:
        return shlex.split(line, comments=True)
    except ValueError:  # an unbalanced quote: words up to a comment
        return line.split(" #")[0].split()


# -- the ip2p command --------------------------------------------------------------------------


def load_build_parser():
    """`build_parser` of the ip2p command, wherever under ip2p_jax/apps/cli/ it lives."""
    try:
        from ip2p_jax.apps.cli.main import build_parser

        return build_parser
    except ImportError:
        pass
    for module_file in sorted((ROOT / "ip2p_jax" / "apps" / "cli").glob("*.py")):
        if re.search(r"^def build_parser\b", module_file.read_text(), re.MULTILINE):
            module = importlib.import_module(f"ip2p_jax.apps.cli.{module_file.stem}")
            return module.build_parser
    raise AssertionError("no build_parser under ip2p_jax/apps/cli/")


@pytest.fixture(scope="module")
def ip2p_parser() -> argparse.ArgumentParser:
    return load_build_parser()()


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser] | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    return None


def split_commands(words: list[str]) -> list[list[str]]:
    """The ip2p invocations in a shell line: for each, the words after `ip2p`."""
    commands, segment = [], []
    for word in [*words, ";"]:
        if word not in SEPARATORS:
            segment.append(word)
            continue
        while segment and (
            word_is_assignment(segment[0]) or segment[0] in WRAPPERS or segment[0] == "..."
        ):
            segment.pop(0)
        if segment and Path(segment[0]).name == "ip2p":
            commands.append(segment[1:])
        elif len(segment) >= 3 and segment[1:3] == ["-m", "ip2p_jax"]:
            commands.append(segment[3:])
        segment = []
    return commands


def word_is_assignment(word: str) -> bool:
    return re.match(r"^[A-Za-z_]\w*=", word) is not None


def check_command(
    parser: argparse.ArgumentParser, words: list[str], *, complete: bool
) -> list[str]:
    """What is wrong with `ip2p WORDS`: unknown subcommands and flags. `complete`: a
    subcommand group must not be the last word (code blocks; inline code may name a group)."""
    problems, path, open_path = [], ["ip2p"], False
    for raw in words:
        word = raw.strip("[]")
        if not word or word == "...":
            continue
        if word.startswith("--"):
            flag = word.split("=", 1)[0]
            if flag.startswith("--config.") and path[1:2] in (["train"], ["train-vae"]):
                continue  # a config override, checked against the config when it runs
            if flag not in parser._option_string_actions:
                problems.append(f"`{' '.join(path)}` has no option {flag}")
            continue
        choices = subcommands(parser)
        if choices is None or open_path:
            continue  # a positional argument or an option's value
        if PLACEHOLDER.match(word):
            open_path = True  # `ip2p COMMAND --help`: any subcommand
            continue
        if word not in choices:
            problems.append(f"`{' '.join(path)}` has no subcommand {word!r}")
            return problems
        parser = choices[word]
        path.append(word)
    wants_help = any(w.strip("[]") in ("-h", "--help") for w in words)
    if complete and not open_path and not wants_help and subcommands(parser) is not None:
        problems.append(f"`{' '.join(path)}` needs a subcommand")
    return problems


def makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([\w.-]+)\s*:(?!=)", text, re.MULTILINE))


# -- repository paths and modules --------------------------------------------------------------


def check_repo_path(text: str) -> str | None:
    path, _, test_name = text.partition("::")
    target = ROOT / path
    if not target.exists():
        return f"{text} does not exist"
    if test_name and not re.search(
        rf"^\s*def {re.escape(test_name)}\b", target.read_text(), re.MULTILINE
    ):
        return f"{path} defines no {test_name}"
    return None


def defines(module_file: Path, name: str) -> bool:
    text = module_file.read_text()
    pattern = rf'^\s*(?:def|class)\s+{name}\b|^{name}\s*[:=]|^\s*"{name}":'
    return re.search(pattern, text, re.MULTILINE) is not None


def check_module(dotted: str, names: tuple[str, ...] = ()) -> str | None:
    """`ip2p_jax.a.b[.attr]` names a module (and, after it, something it defines)."""
    parts = dotted.split(".")
    module_file, rest = None, []
    for end in range(len(parts), 0, -1):
        base = ROOT.joinpath(*parts[:end])
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                module_file, rest = candidate, parts[end:]
                break
        if module_file:
            break
    if module_file is None:
        return f"module {dotted} does not exist"
    for name in [*rest[:1], *names]:
        if not defines(module_file, name):
            where = module_file.relative_to(ROOT)
            return f"{dotted}: {where} defines no {name}"
    return None


# -- the tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PAGES, ids=PAGE_IDS)
def test_relative_links_resolve(path: Path):
    page = read_page(path)
    text = without_inline_code(page.prose)
    targets = [(m.start(), m.group(1)) for m in LINK.finditer(text)]
    targets += [(m.start(), m.group(1)) for m in REFERENCE_LINK.finditer(text)]
    problems = []
    for offset, target in targets:
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http(s), mailto, ...
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        where = f"{page.name}:{line_of(text, offset)}: link {target}"
        if not resolved.exists():
            problems.append(f"{where}: {file_part} does not exist")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            problems.append(f"{where}: no heading #{anchor} in {resolved.relative_to(ROOT)}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", PAGES, ids=PAGE_IDS)
def test_commands_parse(path: Path, ip2p_parser: argparse.ArgumentParser):
    page = read_page(path)
    problems = []
    shown = []  # (line, words, complete)
    for language, first, lines in page.blocks:
        if language not in SHELL_LANGUAGES:
            continue
        for number, line in logical_lines(lines, first):
            words = shell_words(line)
            shown += [(number, command, True) for command in split_commands(words)]
            if words[:1] == ["make"]:
                targets = makefile_targets()
                for target in words[1:]:
                    if not word_is_assignment(target) and target not in targets:
                        problems.append(f"{page.name}:{number}: no Makefile target {target!r}")
    for number, span in inline_spans(page):
        shown += [(number, command, False) for command in split_commands(shell_words(span))]
    for number, words, complete in shown:
        for problem in check_command(ip2p_parser, words, complete=complete):
            problems.append(f"{page.name}:{number}: {problem}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", PAGES, ids=PAGE_IDS)
def test_named_paths_and_modules_exist(path: Path):
    page = read_page(path)
    problems = []
    named = []  # (line, text)
    for number, span in inline_spans(page):
        named.append((number, span))
    for language, first, lines in page.blocks:
        if language == "python":
            source = "\n".join(lines)
            try:
                tree = ast.parse(source)
            except SyntaxError as err:
                problems.append(f"{page.name}:{first + (err.lineno or 1) - 1}: {err.msg}")
                continue
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ip2p_jax"):
                    names = tuple(alias.name for alias in node.names)
                    problem = check_module(node.module, names)
                    if problem:
                        problems.append(f"{page.name}:{first + node.lineno - 1}: {problem}")
        elif language in SHELL_LANGUAGES:
            for number, line in logical_lines(lines, first):
                named += [(number, word) for word in shell_words(line)]
    for number, text in named:
        where = f"{page.name}:{number}"
        if REPO_PATH.match(text):
            problem = check_repo_path(text)
            if problem:
                problems.append(f"{where}: {problem}")
        for match in MODULE.finditer(text):
            problem = check_module(match.group(0))
            if problem:
                problems.append(f"{where}: {problem}")
    assert not problems, "\n".join(problems)


def test_the_checks_catch_mistakes(ip2p_parser: argparse.ArgumentParser):
    """The checkers themselves: a wrong subcommand, flag, path or module is reported."""
    assert check_command(ip2p_parser, ["eval", "shapes", "--train-phrasing"], complete=True) == []
    assert check_command(ip2p_parser, ["train", "--config.steps=3"], complete=True) == []
    assert check_command(ip2p_parser, ["edit", "--config.steps=3"], complete=True) != []
    assert check_command(ip2p_parser, ["eval", "shape"], complete=True) != []
    assert check_command(ip2p_parser, ["datagen"], complete=True) != []
    assert check_command(ip2p_parser, ["datagen"], complete=False) == []
    assert check_command(ip2p_parser, ["edit", "--no-such-flag"], complete=False) != []
    assert split_commands(shell_words("X=1 srun ip2p train --resume | ip2p app # --x")) == [
        ["train", "--resume"],
        ["app"],
    ]
    assert check_repo_path("tests/parity/test_components.py") is not None
    assert check_repo_path("tests/test_docs.py::test_the_checks_catch_mistakes") is None
    assert check_module("ip2p_jax.pipelines.edit", ("EditPipeline",)) is None
    assert check_module("ip2p_jax.pipeline", ("EditPipeline",)) is not None
    assert check_module("ip2p_jax", ("EditPipeline",)) is None
    found = [
        m.group(1) for m in LINK.finditer(without_inline_code("[a](b.md#c) `[d](e)` ![f](g.png)"))
    ]
    assert found == ["b.md#c", "g.png"]
    assert "edit-quality" in anchors(ROOT / "docs" / "shapes-world.md")
    assert slug("CPU: `make setup`") == "cpu-make-setup"
    assert slug("Performance (CPU, measured)") == "performance-cpu-measured"
