"""The `mt` command (`python -m mt` too). The command line and torch load with SIGINT/SIGTERM held
back: a Ctrl-C inside a library's import can be swallowed there and leave a half-loaded module."""

import sys


def main() -> None:
    from mt.signals import deferred_signals

    try:
        with deferred_signals():
            import torch  # noqa: F401

            from mt.cli import main as cli_main
    except KeyboardInterrupt:  # the held Ctrl-C, delivered once the imports are complete
        sys.stderr.write("mt: interrupted\n")
        sys.exit(130)
    cli_main()


if __name__ == "__main__":
    main()
