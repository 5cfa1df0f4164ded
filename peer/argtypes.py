"""argparse `type=` checks shared by the commands that parse their own flags (`bootstrap`,
`peer status`): each raises argparse.ArgumentTypeError naming the value and what is allowed.
Light: nothing heavy is imported, so a bad flag is refused at once."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from peer.config import RUN_ID, RUN_ID_RULE


def run_id(value: str) -> str:
    if RUN_ID.fullmatch(value) is None:
        raise argparse.ArgumentTypeError(f"{value!r} is not a run id: {RUN_ID_RULE}")
    return value


def port(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = -1
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port (0 to 65535)")
    return number


def seconds(most: float = math.inf) -> Callable[[str], float]:
    """A positive number of seconds, at most `most`."""
    allowed = "a positive number of seconds" if math.isinf(most) else f"a number of seconds between 0 and {most:g}"

    def parse(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            number = -1.0
        if not 0 < number <= most:
            raise argparse.ArgumentTypeError(f"{value!r} is not {allowed}")
        return number

    return parse
