"""Progress bars on stderr for every long loop, one switch to silence them all (`mt --quiet`).

Bars show only when stderr is a terminal (tqdm's `disable=None`); the training loop then writes
plain periodic log lines instead.
"""

from __future__ import annotations

import logging
import sys

from tqdm import tqdm

_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def configure_output(log: logging.Logger, verbose: bool = False, quiet: bool = False) -> None:
    """`--quiet`/`--verbose` for bars and for `log`, whose lines go to the current stderr.

    The handler is made anew each time: an in-process caller (a test runner) swaps sys.stderr.
    """
    set_quiet(quiet)
    for handler in [h for h in log.handlers if getattr(h, "mt_cli", False)]:
        log.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"))
    handler.mt_cli = True  # type: ignore[attr-defined]
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)


def bars_enabled() -> bool:
    """Whether bars show: not `--quiet`, and stderr is a terminal."""
    return not _quiet and sys.stderr.isatty()


def progress_bar(iterable=None, **kwargs) -> tqdm:
    """A tqdm bar that follows `--quiet` and hides itself when stderr is not a terminal."""
    if _quiet:
        kwargs["disable"] = True
    else:
        kwargs.setdefault("disable", None)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)
