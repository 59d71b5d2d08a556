"""What the commands share: the parser with one-line errors, argument types, JSON options, output
folders, data loading that names ``--data-root``, and the arguments of the checkpoint commands.

Nothing here imports torch at module level (``robustdeq --help`` stays fast).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
from pathlib import Path
from typing import Iterator, Optional

from .._support import text_table as table
from ..config import Norm, check_radii
from ..registry import WRAPPERS


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (``robustdeq: error: ...``, exit status 2); the options the
    user gave are recorded in ``args._given`` (their dests), so that an option that does not
    apply can be refused instead of silently ignored (:func:`refuse_without`)."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        """Print ``robustdeq: error: <message>`` with a pointer to ``--help`` and exit with
        status 2."""
        hint = f" (see '{self.prog} --help')"
        self.exit(2, f"robustdeq: error: {message}{hint}\n")

    def add_argument(self, *args, **kwargs):
        """argparse's ``add_argument``; an option's action also records its dest in
        ``namespace._given`` when the user gives it (:func:`given`)."""
        action = super().add_argument(*args, **kwargs)
        if action.option_strings and not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            base = type(action)

            class Recorded(base):  # type: ignore[misc, valid-type]
                """The option's own action, which also records its dest in ``_given``."""

                def __call__(self, parser, namespace, values, option_string=None):
                    given = set(getattr(namespace, "_given", ()))
                    given.add(self.dest)
                    setattr(namespace, "_given", given)
                    super().__call__(parser, namespace, values, option_string)
            Recorded.__name__ = base.__name__
            action.__class__ = Recorded
        return action


def given(args, dest: str) -> bool:
    """Whether the user gave the option stored in ``dest`` on the command line."""
    return dest in getattr(args, "_given", ())


def refuse_without(args, needed: str, needed_flag: str, options: dict) -> None:
    """ConfigError naming the first option of ``options`` (dest -> flag) given without the
    option ``needed`` (its dest; ``needed_flag`` for the message), which it only applies to."""
    value = getattr(args, needed, None)
    if value is not None and value is not False:  # given, even as 0 (which its own check refuses)
        return
    for dest, flag in options.items():
        if given(args, dest):
            from ..errors import ConfigError
            raise ConfigError(f"{flag} only applies with {needed_flag}; without it {flag} would be "
                              f"ignored: add {needed_flag} or drop {flag}")


def setup_logging(verbose: int) -> None:
    """Configure the root logger: warnings at ``verbose <= 0``, info at 1, debug from 2."""
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def refuse_flag_keys(options: dict, flags: dict, what: str) -> None:
    """ConfigError naming the keys of the JSON ``options`` (given as ``what``) that have a flag of
    their own (``flags``: key -> flag): the JSON would silently override the flag or its default."""
    from ..errors import ConfigError
    dup = [k for k in options if k in flags]
    if dup:
        raise ConfigError(f"{what}: " + "; ".join(f"{k!r} has its own flag {flags[k]}" for k in dup))


def json_arg(text: Optional[str], what: str) -> dict:
    """The JSON object ``text`` (``{}`` if empty); a ConfigError naming ``what`` otherwise."""
    from ..errors import ConfigError
    if not text:
        return {}
    try:
        val = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{what} must be a JSON object, e.g. '{{\"key\": 1}}': {e}") from None
    if not isinstance(val, dict):
        raise ConfigError(f"{what} must be a JSON object, got {type(val).__name__} {text!r}")
    return val


def int_at_least(low: int):
    """An argparse type: an integer >= ``low``."""
    def parse(text: str) -> int:
        try:
            val = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if val < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {val}")
        return val
    parse.__name__ = "int"
    return parse


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    try:
        val = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (val > 0 and math.isfinite(val)):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return val


positive_float.__name__ = "float"


def floats(text: Optional[str], what: str = "--eps") -> tuple:
    """Comma-separated non-negative radii; a ConfigError naming ``what`` otherwise."""
    from ..errors import ConfigError
    if not text:
        return ()
    try:
        vals = tuple(float(t) for t in text.split(","))
    except ValueError:
        raise ConfigError(f"{what} expects comma-separated numbers, got {text!r}") from None
    return check_radii(vals, what)


def one_radius(text: Optional[str], command: str) -> float:
    """The single radius of ``--eps`` for a command that takes one; a ConfigError otherwise."""
    from ..errors import ConfigError
    eps = floats(text, "--eps")
    if len(eps) != 1:
        raise ConfigError(f"{command} takes one radius in --eps, got {text!r}")
    return eps[0]


def out_folder(path: Optional[str], flag: str = "--out") -> Optional[Path]:
    """``path`` as an output folder: an existing file there is a ConfigError naming ``flag``."""
    from ..errors import ConfigError
    if path is None:
        return None
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{flag} {path} is an existing file; {flag} names an output folder")
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{flag} {path}: {parent} is a file, not a folder")
            break
    return p


@contextlib.contextmanager
def data_root_hint(name: str, root: Optional[str]) -> Iterator[None]:
    """A dataset that needs a local folder, asked for without one, is named as ``--data-root``
    (the library's wording names the Python argument)."""
    from ..errors import DataError
    try:
        yield
    except DataError as e:
        if root is None and "root=" in str(e):
            raise DataError(f"dataset {name!r} is read from a local folder: pass --data-root <folder> "
                            "(nothing is downloaded)") from None
        raise


def load_data(name: str, root: Optional[str], split: str, limit: Optional[int] = None):
    """``(x, y)`` of the dataset's split (its first ``limit`` samples)."""
    from ..data import load_dataset
    with data_root_hint(name, root):
        x, y = load_dataset(name, split, root=root)
    if limit:
        x, y = x[:limit], y[:limit]
    return x, y


def wrap_flagged(model, wrap: str, options_text: Optional[str]):
    """``defenses.wrap`` with the options of ``--wrap-options``; errors name the flags."""
    from ..defenses import wrap as wrap_model
    from ..errors import ConfigError
    options = json_arg(options_text, "--wrap-options")
    if wrap == "none" and options:
        raise ConfigError(f"--wrap-options {json.dumps(options)} given with --wrap none: choose a defense "
                          f"with --wrap ({', '.join(w for w in WRAPPERS if w != 'none')}) or drop the options")
    return wrap_model(model, wrap, options, what=f"--wrap {wrap} (--wrap-options)")


def add_device_arg(p) -> None:
    """``--device``: where the command computes (default: CUDA when present, else the CPU)."""
    p.add_argument("--device", default=None, metavar="DEVICE",
                   help="cpu, cuda, cuda:K or mps (default: cuda when available, else cpu; under torchrun "
                        "'cuda' is each process's own GPU, cuda:LOCAL_RANK)")


def device_of(args) -> str:
    """The device named by ``--device`` (checked), or the default: CUDA when present, else CPU."""
    import torch
    from ..errors import ConfigError
    text = getattr(args, "device", None)
    if text is None:
        text = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {text!r}: expected cpu, cuda, cuda:K or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {text}: CUDA is not available on this machine (use --device cpu)")
        if dev.index is None:
            from ..distributed import context
            ctx = context(auto_init=False)
            dev = torch.device("cuda", ctx.local_rank if ctx is not None else torch.cuda.current_device())
        if dev.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"--device {text}: MPS is not available on this machine (use --device cpu)")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"--device {text!r}: expected cpu, cuda, cuda:K or mps")
    return str(dev)


def load_for_eval(args):
    """Load a checkpoint (and wrap it in an inference-time defense), plus the evaluation data, on
    ``--device``."""
    from ..checkpoint import load_model
    model, ck = load_model(args.checkpoint, map_location=device_of(args))
    model.eval()
    dataset = args.dataset or ck.metadata.get("dataset", "digits")
    x, y = load_data(dataset, args.data_root, args.split, args.n)
    model = wrap_flagged(model, args.wrap, args.wrap_options)
    return model, x, y


#: help texts of the options several commands share
HELP_CHECKPOINT = "a checkpoint file written by robustdeq train, federate or robustdeq.checkpoint.save_checkpoint"
HELP_DATA_ROOT = ("folder with the MNIST idx / CIFAR-10 binary files (--dataset mnist or cifar10; "
                  "nothing is downloaded)")
HELP_SPLIT = "the dataset split used (train or test; default test)"
HELP_NORM = "threat model: Linf or L2 (default Linf)"
HELP_SEED = "random seed (default 0; the same seed gives the same run)"
HELP_NO_PROGRESS = "no progress bars"
HELP_NO_RESUME = "start again, discarding what --out holds from an earlier run"


def add_eval_args(p, *, eps_default: str, steps_help: Optional[str] = None) -> None:
    """The arguments of the commands that attack a checkpoint (attack, eval, harden)."""
    p.add_argument("checkpoint", help=HELP_CHECKPOINT)
    p.add_argument("--dataset", default=None, help="default: the checkpoint's dataset")
    p.add_argument("--data-root", default=None, help=HELP_DATA_ROOT)
    p.add_argument("--split", default="test", help=HELP_SPLIT)
    p.add_argument("-n", type=int_at_least(1), default=200, help="number of samples (default 200)")
    p.add_argument("--norm", default="Linf", choices=[n.value for n in Norm], help=HELP_NORM)
    p.add_argument("--eps", default=eps_default,
                   help=("the radius" if "," not in eps_default else "comma-separated radii")
                   + f" (default {eps_default})")
    p.add_argument("--steps", type=int_at_least(1), default=20,
                   help=steps_help or "attack iterations (default 20; an evaluation's native APGD units run 5x)")
    p.add_argument("--seed", type=int, default=0, help=HELP_SEED)
    p.add_argument("--wrap", default="none", choices=WRAPPERS.names(), help="inference-time defense")
    p.add_argument("--wrap-options", default=None, help="JSON options of the inference-time defense")
    p.add_argument("--no-progress", action="store_true", help=HELP_NO_PROGRESS)
    add_device_arg(p)


__all__ = ["Parser", "setup_logging", "json_arg", "int_at_least", "positive_float", "floats", "out_folder",
           "data_root_hint", "load_data", "wrap_flagged", "load_for_eval", "add_eval_args", "table"]
