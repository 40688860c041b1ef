"""Every command's --help states each meaningful default once, and no meaningless one."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = [["-m", "leworld.data.collect"], ["-m", "leworld.probe"], ["-m", "leworld.forecast"],
            ["-m", "leworld.separation"], ["surprise.py"]]


def option_helps(text: str) -> dict[str, str]:
    """Option name -> its help text, joined over wrapped lines."""
    body = text.split("options:", 1)[1]
    helps: dict[str, str] = {}
    name = None
    for line in body.splitlines():
        m = re.match(r"^  (-{1,2}[\w-]+)", line)
        if m:
            name = m.group(1)
            helps[name] = line[len(m.group(0)):]
        elif name and line.strip():
            helps[name] += " " + line.strip()
    return helps


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[-1])
def test_help_states_defaults_once(command):
    text = subprocess.run([sys.executable, *command, "--help"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout
    helps = option_helps(text)
    assert "--seed" in helps and re.search(r"\(default: \d+\)", helps["--seed"])  # a default of 0 is still shown
    for name, help_text in helps.items():
        assert "(default: None)" not in help_text and "(default: False)" not in help_text, (name, help_text)
        assert help_text.lower().count("default") <= 1, (name, help_text)
