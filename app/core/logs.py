"""JSON logs (production) or plain lines (dev) on stderr."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

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


def configure_logging(level: str = "INFO", as_json: bool = True) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if as_json else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # httpx logs full URLs at INFO; keep it quiet (never leak anything from a request line).
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # Signed audit checkpoints are published in the log: they are written whatever the level.
    logging.getLogger(CHECKPOINT_LOGGER).setLevel(logging.INFO)
