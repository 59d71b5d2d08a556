"""Every command's options are documented in its --help."""
import argparse

import pytest

from robustdeq.cli import build_parser


def _commands():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


@pytest.mark.parametrize("name", sorted(_commands()))
def test_every_option_has_help_text(name):
    sp = _commands()[name]
    undocumented = [a.option_strings[0] if a.option_strings else a.dest
                    for a in sp._actions if not (a.help or "").strip()]
    assert not undocumented, f"robustdeq {name}: options without help text: {undocumented}"
    text = sp.format_help()
    for a in sp._actions:
        if a.option_strings:
            assert a.option_strings[-1] in text
