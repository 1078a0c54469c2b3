"""JSON logs (production) or plain lines (dev) on stderr."""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import queue
import sys
import time
from datetime import UTC, datetime
from logging.handlers import QueueHandler, QueueListener
from typing import Any

CHECKPOINT_LOGGER = "app.audit.checkpoint"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)  # structured data: `log.info(..., extra={"fields": {...}})`
        if isinstance(fields, dict):
            entry.update({key: value for key, value in fields.items() if key not in entry})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


ACCESS_LOGGER = "uvicorn.access"


class _Writer(QueueListener):
    """Writes the queued access lines, all that have arrived, every `pause` seconds, in one write. A writer
    blocked on the queue would be woken by every line, and each wake-up takes the GIL from the event loop
    for a moment; so does each write (the GIL is let go for the system call and taken back): under load
    that cost the requests more than formatting the lines did. Stopping writes out the rest."""

    pause = 0.05

    def __init__(self, lines: queue.SimpleQueue[logging.LogRecord], handler: logging.StreamHandler[Any]) -> None:
        super().__init__(lines, handler)
        self.lines = lines
        self.stream_handler = handler
        self.batch: list[str] = []

    def handle(self, record: logging.LogRecord) -> None:
        handler = self.stream_handler
        if handler.filter(record):
            try:
                self.batch.append(handler.format(record) + handler.terminator)
            except Exception:
                handler.handleError(record)

    def dequeue(self, block: bool) -> logging.LogRecord:
        while True:
            try:
                return self.lines.get_nowait()
            except queue.Empty:
                self.write()
                if not block:
                    raise
                time.sleep(self.pause)

    def write(self) -> None:
        """The formatted lines so far, in one write (under the handler's lock, as its own lines are)."""
        if not self.batch:
            return
        text, self.batch = "".join(self.batch), []
        handler = self.stream_handler
        with handler.lock or contextlib.nullcontext():
            try:
                handler.stream.write(text)
                handler.flush()
            except Exception:
                handler.handleError(logging.makeLogRecord({"msg": text}))

    def stop(self) -> None:
        super().stop()
        self.write()


class _AccessLines(QueueHandler):
    """Queues an access line as it is: formatted by the writer thread, not by the request's. (QueueHandler
    formats and copies each record first, for records whose arguments might change later; uvicorn's access
    lines carry only strings and numbers.)"""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record


_access: QueueListener | None = None


def _stop_access_log() -> None:
    """Write out the queued access lines and end their thread (at exit, or before a new set-up)."""
    global _access
    listener, _access = _access, None
    if listener is not None:
        listener.stop()


atexit.register(_stop_access_log)


def configure_logging(level: str = "INFO", as_json: bool = True) -> None:
    global _access
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if as_json else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # The access log (a line per request) is formatted and written by a thread of its own: a request only
    # queues its line. Every other logger writes at once (a line before a crash must not wait in a queue).
    _stop_access_log()
    lines: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    _access = _Writer(lines, handler)
    _access.start()
    access = logging.getLogger(ACCESS_LOGGER)
    access.handlers[:] = [_AccessLines(lines)]
    access.propagate = False
    root.setLevel(level.upper())
    # httpx logs full URLs at INFO; keep it quiet (never leak anything from a request line).
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # Signed audit checkpoints are published in the log: they are written whatever the level.
    logging.getLogger(CHECKPOINT_LOGGER).setLevel(logging.INFO)
