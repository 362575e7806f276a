"""What the ``rag-grpc`` commands print: text and JSON made safe for a
terminal, hits as JSON, progress, and the usage error shown without a
traceback."""

from __future__ import annotations

import json
import re
import time
from typing import Any

from rag_grpc.documents import Hit


class UsageError(Exception):
    """Bad command-line input; printed without a traceback."""


# What documents.printable escapes (C0 and C1 controls, DEL, bidi controls,
# lone surrogates), less tab and newline where a text keeps its lines. Data
# from a server or a file must not drive the terminal (colours, cursor moves,
# a title) or reorder what a reader sees (Trojan Source).
_UNSAFE_IN_LINE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)
_UNSAFE_IN_TEXT = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)


def shown(text: str, *, keep_lines: bool = False) -> str:
    """text safe to print: each control or bidi character as \\uXXXX (the
    JSON escape, so JSON output stays valid and decodes to the original)."""
    unsafe = _UNSAFE_IN_TEXT if keep_lines else _UNSAFE_IN_LINE
    return unsafe.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def json_line(value: Any) -> str:
    """One line of JSON that prints safely: json escapes C0 controls itself;
    C1, bidi controls and lone surrogates (kept by ensure_ascii=False) are
    escaped by `shown`."""
    return shown(json.dumps(value, ensure_ascii=False))


def hit_json(hit: Hit) -> dict[str, Any]:
    """A hit as the commands print it in JSON."""
    return {
        "document_id": hit.document_id,
        "chunk_id": hit.chunk_id,
        "score": round(hit.score, 6),
        "text": hit.text,
        "metadata": hit.metadata,
    }


def print_table(header: list[str], rows: list[list[str]]) -> None:
    """Columns aligned: the first to the left, the others to the right."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )


class Progress:
    """A rich progress bar on a terminal; plain summary lines otherwise."""

    def __init__(self, total: int, interactive: bool) -> None:
        self.total = total
        self.started = time.monotonic()
        self.last_line = 0.0
        self._bar: Any = None
        if interactive:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as Bar

            self._bar = Bar(
                TextColumn("ingesting"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]:.1f} docs/s"),
                TextColumn("ETA"),
                TimeRemainingColumn(),
            )
            self._task = self._bar.add_task("ingest", total=total, rate=0.0)
            self._bar.start()

    def update(self, done: int) -> None:
        """done documents so far."""
        rate = done / max(time.monotonic() - self.started, 1e-9)
        if self._bar is not None:
            self._bar.update(self._task, completed=done, rate=rate)
        elif time.monotonic() - self.last_line >= 2.0 or done == self.total:
            self.last_line = time.monotonic()
            print(f"progress: {done}/{self.total} documents, {rate:.1f} docs/s", flush=True)

    def close(self) -> None:
        """Take the bar off the terminal."""
        if self._bar is not None:
            self._bar.stop()
