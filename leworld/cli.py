"""Help text for the package's argparse commands.

Example:
    >>> import argparse
    >>> from leworld.cli import HelpFormatter
    >>> p = argparse.ArgumentParser(formatter_class=HelpFormatter)
    >>> _ = p.add_argument("--steps", type=int, default=100, help="env steps per episode")
    >>> "(default: 100)" in p.format_help()
    True
"""
from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults formatter, minus the noise: no "(default: None)" or "(default: False)"
    for options without a meaningful default, and nothing added to help that already states its
    default (for example "default: the policy's")."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        meaningless = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if "default" in text.lower() or meaningless:  # identity: a default of 0 is still shown
            return action.help
        return super()._get_help_string(action)
