"""README's examples run as written: every ``facesearch ...`` line of its shell blocks names real commands and real
options, in a combination the command line accepts (paths need not exist: the examples name the user's files).

Optional parts written ``[--opt value]`` are checked one by one on top of the line without them, and ``a|b``
alternatives inside them are each tried, so a renamed or removed option anywhere in the README fails here.
"""

from __future__ import annotations

import re
import shlex
import warnings
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from facesearch.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def _shell_lines(text: str) -> Iterator[str]:
    """Logical lines (continuations joined) of the ```bash blocks."""
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip():
                yield line.strip()


def _examples() -> list[str]:
    out = []
    for line in _shell_lines(README.read_text(encoding="utf-8")):
        words = line.split()
        while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # FACESEARCH_TOKEN=... facesearch serve
            words = words[1:]
        if words and words[0] == "facesearch":
            out.append(" ".join(words))
    return out


def _variants(line: str) -> list[list[str]]:
    """The line without its ``[...]`` parts, then once with each part (each ``|`` alternative of its value)."""
    line = re.sub(r"\s#.*$", "", line)  # a trailing comment
    optional = re.findall(r"\[([^\]]*)\]", line)
    base = re.sub(r"\s*\[[^\]]*\]", "", line)
    variants = [shlex.split(base)]
    for part in optional:
        words = shlex.split(part)
        alternatives = [words]
        if len(words) == 2 and "|" in words[1]:
            alternatives = [[words[0], v] for v in words[1].split("|")]
        elif len(words) == 1 and "|" not in words[0] and not words[0].startswith("-"):
            continue  # a placeholder, not an option
        variants += [shlex.split(base) + alt for alt in alternatives]
    return variants


def _parse(args: list[str]) -> None:
    """Parse ``facesearch <args>`` down to the leaf command without running it; path options need not exist."""
    cmd: click.Command = main
    name, rest, parent = "facesearch", args[1:], None
    while True:
        saved = {}
        for p in cmd.params:
            if isinstance(p.type, (click.Path, click.File)):
                saved[p] = p.type
                p.type = click.STRING
        try:
            ctx = cmd.make_context(name, list(rest), parent=parent)
        finally:
            for p, t in saved.items():
                p.type = t
        if not isinstance(cmd, click.Group):
            return
        with warnings.catch_warnings():  # click 8.2 deprecates protected_args (9.0 keeps every token in args)
            warnings.simplefilter("ignore", DeprecationWarning)
            tokens = [*getattr(ctx, "protected_args", []), *ctx.args]
        sub_name, sub, sub_rest = cmd.resolve_command(ctx, tokens)
        assert sub is not None and sub_name is not None
        cmd, name, rest, parent = sub, sub_name, sub_rest, ctx


EXAMPLES = _examples()


def test_the_readme_has_examples() -> None:
    assert len(EXAMPLES) >= 30, EXAMPLES


@pytest.mark.parametrize("line", EXAMPLES)
def test_readme_example_parses(line: str) -> None:
    for args in _variants(line):
        try:
            _parse(args)
        except click.ClickException as e:
            pytest.fail(f"README: `{' '.join(args)}`: {e.format_message()}")
