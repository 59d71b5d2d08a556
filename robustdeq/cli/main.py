"""The parser of every command and :func:`main`: exit statuses and the one-line
``robustdeq: error: ...`` of a user error."""
from __future__ import annotations

import sys
from typing import List, Optional

from . import attack, benchmark, certify, demo, evaluate, federate, judge, train
from .common import Parser, int_at_least, setup_logging


def build_parser() -> Parser:
    """The ``robustdeq`` argument parser with every command's subparser."""
    from .. import __version__
    p = Parser(prog="robustdeq", description="Adversarial robustness of deep equilibrium models. "
               "Without a command, runs the demo (robustdeq demo).")
    p.add_argument("--version", action="version", version=f"robustdeq {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="-v info, -vv debug logging")
    p.add_argument("--debug", action="store_true", help="show the full traceback of errors")
    p.add_argument("--threads", type=int_at_least(0), default=1,
                   help="torch CPU threads (default 1: the zoo's small models run fastest on one; 0 = torch default)")
    sub = p.add_subparsers(dest="command")
    demo.add_parser(sub)
    train.add_parser(sub)
    attack.add_parser(sub)
    evaluate.add_parsers(sub)
    certify.add_parser(sub)
    federate.add_parser(sub)
    benchmark.add_parser(sub)
    judge.add_parser(sub)
    return p


def _settings(args) -> dict:
    """The command and its options as the user wrote them (flags), for the ranks' agreement."""
    out = {"command": args.command}
    for k, v in vars(args).items():
        if k not in ("func", "command", "_given"):
            out[k if k in ("checkpoint",) else "--" + k.replace("_", "-")] = v
    return out


def _owned_folder(args) -> Optional[str]:
    """The output folder the command writes (None: it writes none, or ``--out`` names a file,
    which the command reports itself)."""
    if args.command == "attack":  # its --out is a file
        return None
    out = getattr(args, "out", None)
    if not out:
        return None
    from pathlib import Path
    p = Path(out)
    if (p.exists() and not p.is_dir()) or any(q.exists() and not q.is_dir() for q in p.parents):
        return None
    return out


# the library's messages name its Python arguments; on the command line they are these flags
_FLAG_WORDS = (("resume=False (--no-resume)", "--no-resume"), ("resume=False", "--no-resume"),
               ("out_dir (--out)", "--out"), ("another out_dir", "another --out"))


def _as_flags(msg: str) -> str:
    for words, flag in _FLAG_WORDS:
        msg = msg.replace(words, flag)
    return msg


def _os_error(e: OSError, args) -> str:
    """One line for an operating-system error: its cause and the file (a full disk says so and
    names the output folder when the error carries no file name)."""
    import errno
    where = e.filename or ""
    if not where and e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)) and getattr(args, "out", None):
        where = f"writing under --out {args.out}"
    cause = "no space left on device" if e.errno == errno.ENOSPC else (e.strerror or str(e))
    return f"{cause}: {where}".rstrip(": ")


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; returns the exit status (2 for a user error, printed on one line as
    ``robustdeq: error: ...``; ``--debug`` shows the traceback instead)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.command is None:  # the default job
        print("no command given: running the demo ('robustdeq --help' lists the commands)", file=sys.stderr)
        args = parser.parse_args(argv + ["demo"])
    setup_logging(args.verbose)
    from ..errors import RobustDEQError
    quiet, created = None, False
    try:
        if args.threads > 0:
            import torch
            torch.set_num_threads(args.threads)
        from ..distributed import context as dist_context, init as init_distributed
        had_group = dist_context(auto_init=False) is not None
        group = init_distributed()  # under torchrun: train, eval and certify share the work
        created = group is not None and not had_group
        if group is not None:  # every rank runs the same command with the same options
            from ..distributed import check_agreement
            check_agreement(_settings(args), "robustdeq", group)
        if group is not None and not group.is_main:  # rank 0 prints the results
            import os
            quiet, sys.stdout = sys.stdout, open(os.devnull, "w")
        from .. import runlock
        with runlock.hold_group(_owned_folder(args), group):  # one run per output folder
            return int(args.func(args) or 0)
    except (RobustDEQError, OSError) as e:
        if args.debug:
            raise
        msg = _as_flags(str(e)) if isinstance(e, RobustDEQError) else _os_error(e, args)
        print(f"robustdeq: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("robustdeq: interrupted", file=sys.stderr)
        return 130
    finally:
        if quiet is not None:
            sys.stdout.close()
            sys.stdout = quiet
        if created:
            import torch.distributed as dist
            dist.destroy_process_group()
