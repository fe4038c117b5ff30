"""The one object that writes to the terminal, so tests can capture everything the CLI says."""
from __future__ import annotations

import os
import sys


class Console:
    def __init__(self, out=None, err=None, inp=None):
        self.out = out if out is not None else _Discarding(sys.stdout)
        self.err = err if err is not None else _Discarding(sys.stderr)
        self.inp = inp  # None: sys.stdin, looked up when read

    def flush(self) -> None:
        """What is still buffered, written (the command's end: a closed pipe is found here, not at exit)."""
        for stream in (self.out, self.err):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass

    def read_input(self) -> bytes:
        """All of standard input, as bytes (recipes are decoded as UTF-8 whatever the locale says)."""
        stream = self.inp if self.inp is not None else sys.stdin
        if stream is None:
            return b""
        buffer = getattr(stream, "buffer", None)
        data = buffer.read() if buffer is not None else stream.read()
        return data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data

    def print(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def error(self, text: str) -> None:
        self.err.write(text + "\n")
        self.err.flush()

    def table(self, columns: list[str], rows: list[list[str]], title: str | None = None,
              right: tuple[str, ...] = ()) -> None:
        """A table drawn by rich (imported here only: check and fmt never draw tables)."""
        from rich import box
        from rich.console import Console as RichConsole
        from rich.table import Table

        table = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, title_justify="left")
        for col in columns:
            table.add_column(col, justify="right" if col in right else "left", overflow="fold")
        for row in rows:
            table.add_row(*row)
        RichConsole(file=self.out, width=max(100, _terminal_width()), highlight=False,
                    soft_wrap=False).print(table)


class _Discarding:
    """A standard stream whose reader may go away (``modelxform plan … | head -1``): what is written after
    that is discarded, and the command goes on to its end and its exit status (an output being saved is
    finished, not left half-made by a BrokenPipeError; and no traceback). The stream's descriptor is
    pointed at the null device then, so that nothing fails when the interpreter flushes it at exit."""

    def __init__(self, stream):
        self._stream = stream
        self.closed_by_reader = False

    def write(self, text):
        if not self.closed_by_reader:
            try:
                return self._stream.write(text)
            except BrokenPipeError:
                self._reader_gone()
        return len(text)

    def flush(self):
        if not self.closed_by_reader:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._reader_gone()

    def _reader_gone(self):
        self.closed_by_reader = True
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(null, self._stream.fileno())
            finally:
                os.close(null)
        except (OSError, ValueError, AttributeError):
            pass

    def __getattr__(self, name):  # (isatty, fileno, encoding… for rich)
        return getattr(self._stream, name)


def _terminal_width() -> int:
    import shutil
    return shutil.get_terminal_size((120, 20)).columns
