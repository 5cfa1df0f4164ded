"""Logging setup shared by every entry point: one format on stderr, hivemind's lines included.
Configures handlers only; modules log through `logging.getLogger(__name__)` and never print."""

from __future__ import annotations

import logging
import sys

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_HANDLER_NAME = "diloco-p2p"


class BarSafeHandler(logging.StreamHandler):
    """Writes each line through `tqdm.write`: a progress bar on the terminal is cleared, the
    line written whole and the bar drawn again below it (lines from any thread: tqdm's lock)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:
            self.handleError(record)


def setup_logging(level: str = "INFO", progress_bar: bool = False) -> None:
    """Send every log line (ours and hivemind's) to stderr in one format. Safe to call again.

    hivemind stays at WARNING unless `level` is DEBUG: its INFO lines are chatty. With
    `progress_bar` the lines go around the bars of peer/progress.py (same text).
    """
    numeric_level = logging.getLevelName(level.upper())
    if not isinstance(numeric_level, int):
        raise ValueError(f"unknown log level {level!r}: expected DEBUG, INFO, WARNING, ERROR or CRITICAL")

    from hivemind.utils.logging import use_hivemind_log_handler

    # "nowhere": hivemind drops its own colored handler and lets its loggers propagate to root.
    use_hivemind_log_handler("nowhere")
    hivemind_logger = logging.getLogger("hivemind")
    hivemind_logger.propagate = True
    hivemind_logger.setLevel(logging.DEBUG if numeric_level <= logging.DEBUG else logging.WARNING)

    root = logging.getLogger()
    root.setLevel(numeric_level)
    for handler in list(root.handlers):
        if handler.get_name() == _HANDLER_NAME:
            root.removeHandler(handler)
    handler = (BarSafeHandler if progress_bar else logging.StreamHandler)(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root.addHandler(handler)
