"""Exports of the audit trail (JSON Lines, CSV) and reading them back for offline verification.

CSV cells are neutralised against formula injection (OWASP "CSV Injection"): a cell that begins with
`=`, `+`, `-`, `@`, tab, carriage return, line feed or NUL gets a leading `'`, so a spreadsheet shows
it as text. A cell that really begins with `'` gets one too; reading back removes exactly one leading
`'` from every cell that has one, which restores every value unambiguously and lets the export be
re-hashed.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Iterator
from typing import Any

CSV_FIELDS = [
    "seq",
    "at",
    "actor",
    "via",
    "action",
    "override_id",
    "before",
    "after",
    "comment",
    "prev_hash",
    "hash",
]
FORMULA_TRIGGERS = ("=", "+", "-", "@", "\t", "\r", "\n", "\0")
ESCAPE = "'"


class ExportFormatError(ValueError):
    """A line of an export that cannot be read as an event (named by its line number)."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"line {line}: {message}")
        self.line = line


_JSONL = json.JSONEncoder(sort_keys=True, ensure_ascii=False)  # as json.dumps(…, sort_keys=True, ensure_ascii=False)


def to_jsonl(event_row: dict[str, Any]) -> str:
    return _JSONL.encode(event_row) + "\n"


def in_chunks(parts: Iterable[str], most: int = 1024) -> Iterator[str]:
    """`parts` joined into chunks: the first part alone (the download begins at once), then twice as many
    each time, up to `most`. A streamed response sends each item on its own, and a sync iterator takes a
    trip to the thread pool for each: one per row would cost more than the row."""
    chunk: list[str] = []
    size = 1
    for part in parts:
        chunk.append(part)
        if len(chunk) == size:
            yield "".join(chunk)
            chunk.clear()
            size = min(2 * size, most)
    if chunk:
        yield "".join(chunk)


def neutralise(cell: str) -> str:
    """A cell no spreadsheet evaluates as a formula; `restore` undoes it exactly."""
    return ESCAPE + cell if cell.startswith((*FORMULA_TRIGGERS, ESCAPE)) else cell


def restore(cell: str) -> str:
    return cell[1:] if cell.startswith(ESCAPE) else cell


def to_csv_rows(events: Iterable[dict[str, Any]]) -> Iterator[str]:
    """CSV with `before`/`after` as JSON text, so an export can be re-hashed offline."""
    buffer = io.StringIO()
    # CRLF (RFC 4180): the writer quotes a cell holding any character of its line terminator, so with
    # "\n" alone a bare CR in a comment would end the row early.
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(CSV_FIELDS)
    yield buffer.getvalue()
    for event_row in events:
        buffer.seek(0)
        buffer.truncate()
        row = dict(event_row)
        for key in ("before", "after"):
            row[key] = None if row[key] is None else json.dumps(row[key], sort_keys=True, ensure_ascii=False)
        writer.writerow([neutralise("" if row[key] is None else str(row[key])) for key in CSV_FIELDS])
        yield buffer.getvalue()


def parse_export(lines: Iterable[str], fmt: str) -> Iterator[dict[str, Any]]:
    """Read a JSON Lines or CSV export back into events; a line that is not one raises ExportFormatError."""
    if fmt == "jsonl":
        yield from _parse_jsonl(lines)
    else:
        yield from _parse_csv(lines)


def decoded_lines(raw: Iterable[bytes]) -> Iterator[str]:
    """Lines of a file opened in binary mode, as text; a line that is not UTF-8 is an error naming it."""
    for number, line in enumerate(raw, 1):
        try:
            yield line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ExportFormatError(number, f"not UTF-8 text (byte {exc.start + 1})") from None


def _parse_jsonl(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            event_row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ExportFormatError(number, f"not JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(event_row, dict):
            raise ExportFormatError(number, "not a JSON object")
        yield event_row


def _parse_csv(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    reader = csv.reader(lines)
    try:
        header = next(reader, None)
        if header != CSV_FIELDS:
            raise ExportFormatError(1, f"the header must be {','.join(CSV_FIELDS)}")
        first_line = reader.line_num + 1
        for cells in reader:  # a row may span lines (a comment with line breaks): name its first
            yield _csv_event(first_line, cells)
            first_line = reader.line_num + 1
    except csv.Error as exc:
        raise ExportFormatError(reader.line_num, f"not CSV ({exc})") from None


def _csv_event(line: int, cells: list[str]) -> dict[str, Any]:
    if len(cells) != len(CSV_FIELDS):
        raise ExportFormatError(line, f"{len(cells)} fields, expected {len(CSV_FIELDS)}")
    event_row: dict[str, Any] = dict(zip(CSV_FIELDS, (restore(cell) for cell in cells), strict=True))
    for key in ("seq", "override_id"):
        value = event_row[key]
        if key == "override_id" and value == "":
            event_row[key] = None
            continue
        try:
            event_row[key] = int(value)
        except ValueError:
            raise ExportFormatError(line, f"{key} is not a number: {value[:40]!r}") from None
    for key in ("via", "comment"):
        event_row[key] = event_row[key] or None
    for key in ("before", "after"):
        if event_row[key]:
            try:
                event_row[key] = json.loads(event_row[key])
            except json.JSONDecodeError as exc:
                raise ExportFormatError(line, f"{key} is not JSON ({exc.msg})") from None
        else:
            event_row[key] = None
    return event_row
