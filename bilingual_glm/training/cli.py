"""The scripts' entry point: bad input or a diverged run is one clear line, not a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable


def run_cli(main: Callable[[list[str] | None], int], prog: str, argv: list[str] | None = None) -> int:
    """``main(argv)``; a ``ValueError`` (bad flag, file or data) or ``FloatingPointError`` (a diverged run)
    ends in ``{prog}: error: ...`` on stderr and exit status 2, argparse's convention for usage errors."""
    try:
        return main(argv)
    except (ValueError, FloatingPointError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
