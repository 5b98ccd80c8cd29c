"""The guest's serial console: swiftvmm's standard output, followed by a thread, kept in full."""

from __future__ import annotations

import codecs
import re
import threading
import time
from typing import IO, Callable, Optional, Pattern, TypeVar, Union

from .errors import ExpectTimeout, VMExited

TAIL_LINES = 40
T = TypeVar("T")
QUIET = 1.0  # seconds without output after which an unfinished line counts as complete (a prompt)


class Console:
    """What the guest wrote to its console, and a way to type into it.

    `expect` searches from where the previous match ended, so a test reads the console in order:
    each line is matched at most once. `text` is everything so far (CR removed)."""

    def __init__(self, name: str, stdout: IO[bytes], stdin: Optional[IO[bytes]], log: Optional[IO[bytes]],
                 exit_status: Callable[[], Optional[int]], stderr_tail: Callable[[], str],
                 echo: Optional[IO[bytes]] = None) -> None:
        self.name = name
        self._echo = echo
        self._echo_pending = b""
        self._stdin = stdin
        self._log = log
        self._exit_status = exit_status
        self._stderr_tail = stderr_tail
        self._cond = threading.Condition()
        self._raw = bytearray()
        self._text = ""
        self._cursor = 0
        self._closed = False
        self._arrivals: list[tuple[int, float]] = []
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._thread = threading.Thread(target=self._pump, args=(stdout,), name=f"console-{name}", daemon=True)
        self._thread.start()

    # -- reading ---------------------------------------------------------------------------------
    def _pump(self, stdout: IO[bytes]) -> None:
        try:
            while True:
                chunk = stdout.read1(65536) if hasattr(stdout, "read1") else stdout.read(4096)  # type: ignore[attr-defined]
                if not chunk:
                    break
                now = time.time()
                self._echo_lines(chunk)
                if self._log is not None:
                    try:
                        self._log.write(chunk)
                        self._log.flush()
                    except (OSError, ValueError):
                        self._log = None
                with self._cond:
                    self._raw += chunk
                    self._text += self._decoder.decode(chunk).replace("\r", "")
                    self._arrivals.append((len(self._text), now))
                    self._cond.notify_all()
        except (OSError, ValueError):
            pass
        finally:
            self._echo_lines(b"", final=True)
            with self._cond:
                self._text += self._decoder.decode(b"", final=True)
                self._closed = True
                self._cond.notify_all()

    def _echo_lines(self, chunk: bytes, final: bool = False) -> None:
        """Copies the console to the echo stream in whole lines (the last one when it ends), so that
        other writers to that stream never split a guest line."""
        if self._echo is None:
            return
        data = self._echo_pending + chunk
        cut = len(data) if final else data.rfind(b"\n") + 1
        self._echo_pending = data[cut:]
        if cut:
            try:
                self._echo.write(data[:cut])
                self._echo.flush()
            except (OSError, ValueError):
                self._echo = None

    @property
    def text(self) -> str:
        """Everything the guest printed so far (decoded as UTF-8, CR removed)."""
        with self._cond:
            return self._text

    @property
    def raw(self) -> bytes:
        """Everything the guest printed so far, as received."""
        with self._cond:
            return bytes(self._raw)

    @property
    def lines(self) -> list[str]:
        return self.text.splitlines()

    @property
    def closed(self) -> bool:
        """True once swiftvmm's standard output ended (the process exited)."""
        with self._cond:
            return self._closed

    def tail(self, n: int = TAIL_LINES) -> str:
        """The last `n` lines, for error messages and reports."""
        with self._cond:
            return self._tail_locked(n)

    def arrival_time(self, position: int) -> Optional[float]:
        """The host's time.time() when the text at `position` (an index into `text`) arrived."""
        with self._cond:
            for end, when in self._arrivals:
                if end > position:
                    return when
        return None

    def expect(self, pattern: Union[str, Pattern[str]], timeout: float = 60.0) -> "re.Match[str]":
        """Waits until `pattern` (a regular expression, searched with re.MULTILINE) matches the
        console after the previous match, and returns the match; the next expect starts after it.

        Raises ExpectTimeout (naming the pattern and the timeout, with the console's tail) when it
        does not match within `timeout` seconds, and VMExited at once when the VM's output ends
        without a match."""
        regex = pattern if isinstance(pattern, re.Pattern) else re.compile(pattern, re.MULTILINE)

        def found() -> "Optional[re.Match[str]]":
            m = self._search(regex)
            if m is not None:
                self._cursor = m.end()
            return m
        return self._wait(found, timeout, f"while waiting for {regex.pattern!r}",
                          f"no console output matched {regex.pattern!r}")

    def wait_until(self, predicate: Callable[[str], bool], timeout: float = 60.0, what: str = "the condition") -> None:
        """Waits until predicate(text) is true for the console's text so far (for conditions a
        regular expression cannot say, e.g. "20 ticks after the restore"). ExpectTimeout and
        VMExited as for expect, naming `what`."""
        self._wait(lambda: True if predicate(self._text) else None, timeout, f"before {what}", f"no {what}")

    def _wait(self, found: Callable[[], Optional[T]], timeout: float, ended: str, missing: str) -> T:
        """Calls found() (under the lock) as output arrives until it returns something. VMExited at
        once when the output ends first ("... ended ... `ended`"), ExpectTimeout after `timeout`
        ("`missing` within T s")."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                result = found()
                if result is not None:
                    return result
                if self._closed:
                    status = self._exit_status()
                    raise VMExited(f"{self.name}: the VM's console ended (swiftvmm exited with status {status}) "
                                   f"{ended}", status, self._tail_locked(), self._stderr_tail())
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ExpectTimeout(f"{self.name}: {missing} within {timeout:g} s", self._tail_locked(),
                                        self._stderr_tail())
                self._cond.wait(min(left, 0.25))

    def _search(self, regex: Pattern[str]) -> "Optional[re.Match[str]]":
        """A match in the complete lines after the cursor; in the unfinished last line only if the
        match ends before the text does, or nothing has arrived for QUIET seconds (a prompt). So
        `^answer: (.*)$` never matches a line whose second half is still on its way."""
        text = self._text
        end = text.rfind("\n") + 1
        if end > self._cursor:
            m = regex.search(text, self._cursor, end)
            if m is not None:
                return m
        m = regex.search(text, self._cursor)
        if m is None:
            return None
        if m.end() < len(text) or self._closed:
            return m
        last = self._arrivals[-1][1] if self._arrivals else 0.0
        if time.time() - last >= QUIET:
            return m
        return None

    def _tail_locked(self, n: int = TAIL_LINES) -> str:
        lines = self._text.splitlines()
        return "\n".join(lines[-n:]) if lines else "(the console is empty)"

    def skip(self) -> None:
        """Moves the expect position to the end of what has arrived (ignore everything so far)."""
        with self._cond:
            self._cursor = len(self._text)

    # -- writing ---------------------------------------------------------------------------------
    def send(self, text: Union[str, bytes]) -> None:
        """Types `text` into the guest's console (swiftvmm forwards its standard input to it)."""
        if self._stdin is None:
            raise VMExited(f"{self.name}: the console's input is closed", self._exit_status())
        data = text.encode() if isinstance(text, str) else text
        try:
            self._stdin.write(data)
            self._stdin.flush()
        except (BrokenPipeError, OSError, ValueError) as e:
            raise VMExited(f"{self.name}: cannot write to the console ({e}): the VM has exited",
                           self._exit_status(), self.tail(), self._stderr_tail()) from None

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
