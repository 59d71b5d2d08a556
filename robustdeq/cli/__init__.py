"""The ``robustdeq`` command line: demo, train, attack, eval, harden, certify, federate,
benchmark, judge.

One module per command holds its parser beside the command; :mod:`.main` builds the parser and
turns errors into exit statuses; :mod:`.common` holds what the commands share. The CLI maps flags
onto the library's typed configs; the library never sees argparse.
"""
from __future__ import annotations

from .main import build_parser, main

__all__ = ["main", "build_parser"]
