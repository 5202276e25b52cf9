"""Progress bars on stderr for every long loop, one switch to silence them all (`mt --quiet`).

Bars show only when stderr is a terminal (tqdm's `disable=None`); the training loop then writes
plain periodic log lines instead.
"""

from __future__ import annotations

import sys

from tqdm import tqdm

_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


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
