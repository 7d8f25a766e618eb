"""The README stays a five-minute read whose commands run as written, and the generated parts of docs/
are what the code says."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _sh_blocks(text: str) -> list[str]:
    return re.findall(r"```sh\n(.*?)```", text, flags=re.S)


def _commands(block: str) -> list[list[str]]:
    lines = [line.split("#", 1)[0].strip() for line in block.splitlines()]
    return [shlex.split(line) for line in lines if line]


README_COMMANDS = [words for block in _sh_blocks(README) for words in _commands(block)]


def test_the_readme_is_short_and_indexes_every_doc():
    assert len(README) <= 12_000
    for page in (ROOT / "docs").glob("*.md"):
        assert f"(docs/{page.name})" in README, f"the README's index lacks docs/{page.name}"
    for linked in re.findall(r"\((docs/[\w.]+)\)", README):
        assert (ROOT / linked).is_file(), linked


def test_the_readme_names_the_make_targets_it_documents():
    makefile = (ROOT / "Makefile").read_text()
    used = {words[1] for words in README_COMMANDS if words[0] == "make"}
    assert used >= {"demo", "test"}
    for target in used:
        assert re.search(rf"^{target}:", makefile, flags=re.M), target


@pytest.mark.parametrize(
    "words", [w for w in README_COMMANDS if w[0] == "redux-edge"], ids=lambda w: " ".join(w[:3])
)
def test_every_readme_command_is_one_the_cli_has_with_those_options(cli, words):
    """Each command is checked against its own --help: the verbs exist and take every option used."""
    verbs = [word for word in words[1:3] if re.fullmatch(r"[a-z][a-z0-9-]*", word)]
    helped = cli(*verbs, "--help")
    if helped.exit_code != 0 or ("Commands:" in helped.stdout and len(verbs) > 1):
        helped = cli(*verbs[:1], "--help")
    assert helped.exit_code == 0, helped.stderr
    options = {word.split("=", 1)[0] for word in words if word.startswith("-")}
    if "Commands:" in helped.stdout:  # a group with a default command (profile BUNDLE)
        helped = cli(verbs[0], "run", "--help")
    for option in options:
        assert re.search(rf"(^|[\s,/]){re.escape(option)}\b", helped.stdout, flags=re.M), (option, words)


def test_the_pass_tables_in_the_docs_are_what_the_passes_command_prints(cli):
    doc = (ROOT / "docs" / "PASSES.md").read_text()
    generated = doc.split("<!-- generated: redux-edge passes --markdown -->\n", 1)[1].split("<!-- end", 1)[0]
    printed = cli("passes", "--markdown")
    assert printed.exit_code == 0
    assert generated == printed.stdout, "run: redux-edge passes --markdown, and paste it into docs/PASSES.md"


def test_no_reference_leads_outside_the_repository():
    for path in [*ROOT.glob("redux_edge/**/*.py"), *ROOT.glob("docs/*.md"), ROOT / "README.md"]:
        assert "../shared/" not in path.read_text(), path
