"""Logging: the access log is written by a thread of its own (a request only queues its line; the lines
that arrived together go out in one write), every other line at once, both through the one configured
handler."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator

import pytest

from app.core import logs


@pytest.fixture
def configured() -> Iterator[None]:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    access = logging.getLogger(logs.ACCESS_LOGGER)
    saved_access = (access.handlers[:], access.propagate, access.level, access.disabled)
    access.setLevel(logging.NOTSET)  # as a process that only ran configure_logging has it (other tests
    access.disabled = False  # start uvicorn servers, which set their own levels)
    yield
    logs._stop_access_log()
    root.handlers[:], level = saved
    root.setLevel(level)
    access.handlers[:], access.propagate, access.level, access.disabled = saved_access


def test_access_lines_are_written_by_their_own_thread(configured: None, capsys: pytest.CaptureFixture[str]) -> None:
    writers: list[str] = []  # the thread that formats each line
    logs.configure_logging("INFO", as_json=True)
    handler = logging.getLogger().handlers[0]
    format_line = handler.format

    def recording(record: logging.LogRecord) -> str:
        writers.append(threading.current_thread().name)
        return format_line(record)

    handler.format = recording  # type: ignore[method-assign]
    logging.getLogger(logs.ACCESS_LOGGER).info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:1", "GET", "/healthz", "1.1", 200)
    logging.getLogger("tests.core.logs").warning("at once")
    assert writers == [threading.current_thread().name]  # the app's line was written right here
    logs._stop_access_log()  # as at exit: the queued lines are written out
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [(line["logger"], line["message"]) for line in lines] == [
        ("tests.core.logs", "at once"),
        ("uvicorn.access", '127.0.0.1:1 - "GET /healthz HTTP/1.1" 200'),
    ]
    assert len(writers) == 2 and writers[1] != threading.current_thread().name


def test_access_lines_that_arrive_together_go_out_in_one_write(
    configured: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each write lets go of the GIL and takes it back from the event loop: one per batch, not per line."""
    monkeypatch.setattr(logs._Writer, "pause", 0.5)  # the lines below arrive while the writer sleeps
    logs.configure_logging("INFO", as_json=True)
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    writes: list[str] = []
    stream = handler.stream

    class Counting:
        def write(self, text: str) -> None:
            writes.append(text)
            stream.write(text)

        def flush(self) -> None:
            stream.flush()

    handler.setStream(Counting())
    for status in (200, 201, 404):
        logging.getLogger(logs.ACCESS_LOGGER).info(
            '%s - "%s %s HTTP/%s" %d', "127.0.0.1:1", "GET", "/healthz", "1.1", status
        )
    logs._stop_access_log()
    assert len(writes) == 1, writes
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [line["message"][-3:] for line in lines] == ["200", "201", "404"]
