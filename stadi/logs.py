"""Structured, quiet-by-default logging: one `key=value` line per record on stderr."""

from __future__ import annotations

import json
import logging
import sys
from typing import ClassVar


class KeyValueFormatter(logging.Formatter):
    """`time level logger msg key=value...`; extra fields passed with `extra={...}` become pairs."""

    _standard: ClassVar[set[str]] = set(vars(logging.makeLogRecord({})))

    def format(self, record: logging.LogRecord) -> str:
        pairs = {k: v for k, v in vars(record).items() if k not in self._standard and not k.startswith("_")}
        head = f"{self.formatTime(record, '%Y-%m-%dT%H:%M:%S')} {record.levelname.lower()} {record.name} " \
               f"msg={json.dumps(record.getMessage())}"
        tail = " ".join(f"{k}={json.dumps(v, default=str)}" for k, v in sorted(pairs.items()))
        text = f"{head} {tail}" if tail else head
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def configure(level: str | int = "WARNING") -> None:
    """Route the `stadi*` loggers to stderr at `level` (WARNING unless asked)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter())
    for name in ("stadi", "stadi_worker", "stadi_operator", "stadi_bench"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level if isinstance(level, int) else level.upper())
        logger.propagate = False
