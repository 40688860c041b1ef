"""The commands the docs give still run: every option they pass exists.

README.md, docs/*.md, the configs' header comments and the scripts' docstrings quote about two
hundred commands (`python plan.py ...`, `python -m leworld.probe ...`, `python train.py fit ...`).
Each one is parsed here and every `--option` it passes is looked up in the parser of the script
it calls: argparse parsers for the scripts, the LightningCLI's resolved config for `train.py`.
Config files a command names, and repository paths the docs name, must exist. A renamed or
removed option or file then fails this test instead of a reader's run.
"""
from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Where commands are quoted: the docs, the configs' header comments, the scripts' docstrings.
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "configs").glob("*.yaml"))]
SCRIPT_FILES = [ROOT / "train.py", ROOT / "plan.py", ROOT / "surprise.py", *sorted((ROOT / "bench").glob("*.py")),
                *sorted(p for p in (ROOT / "leworld").rglob("*.py") if "__main__" in p.read_text())]

COMMAND = re.compile(r"python3? (-m [\w.]+|[\w/]+\.py)(.*)")
# A command ends where the shell or the prose around it takes over.
END = re.compile(r"`|&&|\|\||;| \| | > | 2>| < |\)$")


def _text_of(path: Path) -> str:
    text = path.read_text()
    if path.suffix == ".py":
        return ast.get_docstring(ast.parse(text)) or ""
    if path.suffix == ".yaml":
        return "\n".join(line.lstrip("# ") for line in text.splitlines() if line.lstrip().startswith("#"))
    return text


def quoted_commands() -> list[tuple[str, str, list[str]]]:
    """(where, script, argument tokens) for every `python ...` command in the docs."""
    found = []
    for path in DOC_FILES + SCRIPT_FILES:
        lines = _text_of(path).splitlines()
        i = 0
        while i < len(lines):
            line = lines[i].split("#", 1)[0] if path.suffix != ".md" else lines[i]
            while line.rstrip().endswith("\\") and i + 1 < len(lines):  # shell line continuations
                i += 1
                line = line.rstrip()[:-1] + " " + lines[i].lstrip("# ")
            for match in COMMAND.finditer(line):
                script = match.group(1)
                rest = END.split(match.group(2), maxsplit=1)[0]
                try:
                    tokens = shlex.split(rest, comments=True)
                except ValueError:  # an unbalanced quote in prose: take the plain words
                    tokens = rest.split()
                found.append((f"{path.relative_to(ROOT)}:{i + 1}", script, tokens))
            i += 1
    return found


class _Parser(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser


def _capture(self, *args, **kwargs):
    raise _Parser(self)


def argparse_options(script: str, monkeypatch) -> set[str]:
    """The option strings of the parser a script's `main` builds (stopped at parse_args)."""
    if script.startswith("-m "):
        module = importlib.import_module(script[3:])
    else:
        spec = importlib.util.spec_from_file_location(f"_doc_{Path(script).stem}", ROOT / script)
        module = importlib.util.module_from_spec(spec)
        sys.path.insert(0, str(ROOT))
        try:
            spec.loader.exec_module(module)
        finally:
            sys.path.remove(str(ROOT))
    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", _capture)
        m.setattr(sys, "argv", [script])
        with pytest.raises(_Parser) as caught:
            module.main()
    return set(caught.value.parser._option_string_actions)


def train_options(build_cli) -> set[str]:
    """Every dotted key `train.py fit` accepts, from the resolved config of a shipped preset."""
    cli = build_cli(["--config", str(ROOT / "configs" / "pusht_tiny.yaml")])
    keys = set()

    def walk(node, prefix):
        for key, value in vars(node).items() if hasattr(node, "__dict__") else node.items():
            name = f"{prefix}.{key}" if prefix else key
            keys.add(name)
            if hasattr(value, "__dict__") or isinstance(value, dict):
                walk(value, name)

    walk(cli.config, "")
    # The CLI's own switches are not config keys.
    return {f"--{k}" for k in keys} | {"--config", "--print_config", "--ckpt_path", "--help"}


def test_the_docs_quote_commands():
    """The extraction itself finds the commands it is meant to check (a broken regex checks nothing)."""
    scripts = {script for _, script, _ in quoted_commands()}
    assert {"train.py", "plan.py", "surprise.py", "-m leworld.probe", "-m leworld.data.collect"} <= scripts
    assert len(quoted_commands()) > 100


def test_every_quoted_command_uses_options_its_script_has(monkeypatch, build_cli):
    by_script: dict[str, list[tuple[str, list[str]]]] = {}
    for where, script, tokens in quoted_commands():
        if script.startswith("-m pytest") or script == "-m":
            continue
        by_script.setdefault(script, []).append((where, tokens))
    problems = []
    for script, uses in sorted(by_script.items()):
        if script == "train.py":
            options = train_options(build_cli)
        else:
            if not script.startswith("-m ") and not (ROOT / script).exists():
                problems.append(f"{uses[0][0]}: no script {script}")
                continue
            options = argparse_options(script, monkeypatch)
        for where, tokens in uses:
            if script == "train.py" and tokens[:1] == ["fit"]:
                tokens = tokens[1:]
            for k, token in enumerate(tokens):
                if not token.startswith("--"):
                    continue
                flag = token.split("=", 1)[0]
                if flag not in options:
                    problems.append(f"{where}: `python {script}` has no option {flag}")
                if flag == "--config" and k + 1 < len(tokens) and tokens[k + 1].endswith(".yaml"):
                    if not (ROOT / tokens[k + 1]).exists():
                        problems.append(f"{where}: config {tokens[k + 1]} does not exist")
    assert not problems, "\n".join(problems)


def test_the_check_catches_a_renamed_option(monkeypatch):
    """An option no parser has is reported (the check can fail)."""
    options = argparse_options("plan.py", monkeypatch)
    assert "--receding-horizon" in options and "--model" in options
    assert "--receding-horizons" not in options


def test_every_repository_path_the_docs_name_exists():
    """Files and folders named in backticks (`leworld/probe.py`) and linked images exist."""
    missing = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text()
        named = re.findall(r"`((?:leworld|envs|configs|bench|docs|tests|\.ci)/[\w./-]+)`", text)
        for name in named:
            if re.fullmatch(r"leworld/\w+-v\d+", name):  # a gymnasium id, not a path
                continue
            if not (ROOT / name).exists():
                missing.append(f"{path.relative_to(ROOT)}: `{name}`")
        for link in re.findall(r"\]\(([\w./-]+\.(?:png|gif|jpg|md))\)", text):
            if not (path.parent / link).exists():
                missing.append(f"{path.relative_to(ROOT)}: link {link}")
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize("path", SCRIPT_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_script_docstring_opens_with_a_runnable_example(path):
    """A summary line, then `Example:` and the command (checked for its options above)."""
    lines = (ast.get_docstring(ast.parse(path.read_text())) or "").splitlines()
    assert len(lines) >= 4 and lines[0].strip(), f"{path.name}: no docstring with a summary line"
    assert lines[2].strip() == "Example:", f"{path.name}: the docstring's third line should be 'Example:'"
    assert COMMAND.search(lines[3]), f"{path.name}: no `python ...` command under 'Example:'"
