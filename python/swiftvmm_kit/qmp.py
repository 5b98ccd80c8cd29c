"""The VM's QMP connection: qemu.qmp's QMPClient on an event loop of its own (a thread), behind
blocking calls, with every command, reply and event kept in a transcript and the events in a log."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any, AsyncIterator, Callable, Mapping, Optional

from qemu.qmp import ExecuteError, QMPClient, Runstate

from .errors import ExpectTimeout, QMPError

Event = dict[str, Any]


class EventLog:
    """Every QMP event the VM sent, in order. `expect` returns each event at most once."""

    def __init__(self, name: str, console_tail: Callable[[], str]) -> None:
        self.name = name
        self._console_tail = console_tail
        self._cond = threading.Condition()
        self._events: list[Event] = []
        self._taken: set[int] = set()
        self._ended = False

    def _add(self, event: Event) -> None:
        with self._cond:
            self._events.append(event)
            self._cond.notify_all()

    def _end(self) -> None:
        with self._cond:
            self._ended = True
            self._cond.notify_all()

    @property
    def all(self) -> list[Event]:
        """Every event so far: dicts with "event", "data" and "timestamp", as QMP sends them."""
        with self._cond:
            return list(self._events)

    def names(self) -> list[str]:
        return [e["event"] for e in self.all]

    def expect(self, name: str, timeout: float = 30.0, **data: Any) -> Event:
        """Waits for an event called `name` whose data has the given items (e.g. guid=...), not
        returned by an earlier expect, and returns it. ExpectTimeout names the event, what arrived
        instead and the console's tail."""
        want = {k.replace("_", "-"): v for k, v in data.items()}
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for i, ev in enumerate(self._events):
                    if i in self._taken or ev.get("event") != name:
                        continue
                    d = ev.get("data") or {}
                    if all(d.get(k) == v for k, v in want.items()):
                        self._taken.add(i)
                        return ev
                left = deadline - time.monotonic()
                if left <= 0 or self._ended:
                    seen = ", ".join(e["event"] for e in self._events) or "none"
                    what = f"{name}" + (f" with {json.dumps(want, sort_keys=True)}" if want else "")
                    why = "the QMP connection ended" if self._ended else f"within {timeout:g} s"
                    raise ExpectTimeout(f"{self.name}: no QMP event {what} {why} (events so far: {seen})",
                                        self._console_tail())
                self._cond.wait(min(left, 0.5))

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Event]:
        """`async for event in vm.events`: every event from the first, as they arrive; ends when
        the VM's QMP connection ends."""
        i = 0
        while True:
            with self._cond:
                if i < len(self._events):
                    ev = self._events[i]
                    i += 1
                else:
                    ev = None
                    ended = self._ended
            if ev is not None:
                yield ev
                continue
            if ended:
                return
            await asyncio.get_running_loop().run_in_executor(None, self._wait_beyond, i, 0.5)

    def _wait_beyond(self, count: int, timeout: float) -> None:
        with self._cond:
            if len(self._events) <= count and not self._ended:
                self._cond.wait(timeout)


class QMPConnection:
    """A connected QMP client; `execute` blocks the caller until the reply (or its timeout)."""

    def __init__(self, name: str, events: EventLog) -> None:
        self.name = name
        self.events = events
        self.transcript: list[tuple[float, str, str]] = []  # (time.time(), "->"/"<-"/"event", JSON text)
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"qmp-{name}", daemon=True)
        self._thread.start()
        self._client: Optional[QMPClient] = None
        self._listener: Optional[asyncio.Future[None]] = None
        self._closed = False

    def _note(self, direction: str, obj: Any) -> None:
        with self._lock:
            self.transcript.append((time.time(), direction, json.dumps(obj, sort_keys=True, default=str)))

    def _run(self, coro: Any, timeout: Optional[float]) -> Any:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    def connect(self, path: str, timeout: float) -> None:
        async def go() -> None:
            client = QMPClient(self.name)
            await client.connect(path)
            self._client = client
            self._listener = asyncio.ensure_future(self._listen(client))
        self._run(asyncio.wait_for(go(), timeout), timeout + 5)

    async def _listen(self, client: QMPClient) -> None:
        async def receive() -> None:
            async for ev in client.events:
                event = {"event": ev["event"], "data": dict(ev.get("data", {})),
                         "timestamp": dict(ev.get("timestamp", {}))}
                self._note("event", event)
                self.events._add(event)

        receiver = asyncio.ensure_future(receive())
        try:
            # The listener's iteration does not end with the connection: watch the client's state,
            # and once it left RUNNING (the VM closed the socket), take what is queued and stop.
            while client.runstate == Runstate.RUNNING:
                await client.runstate_changed()
            while not client.events.empty():
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.01)
        finally:
            receiver.cancel()
            self.events._end()

    def execute(self, command: str, arguments: Optional[Mapping[str, Any]] = None, timeout: float = 60.0) -> Any:
        """Sends one command and returns its "return" value; QMPError on an error reply, a broken
        connection or no reply within `timeout` seconds."""
        if self._client is None or self._closed:
            raise QMPError(command, "not connected")
        args = dict(arguments or {})
        self._note("->", {"execute": command, **({"arguments": args} if args else {})})
        try:
            result = self._run(asyncio.wait_for(self._client.execute(command, args or None), timeout), timeout + 5)
        except ExecuteError as e:
            self._note("<-", {"error": {"class": e.error_class, "desc": str(e)}})
            raise QMPError(command, str(e), e.error_class) from None
        except (asyncio.TimeoutError, TimeoutError):
            self._note("<-", {"kit": f"no reply within {timeout:g} s"})
            raise QMPError(command, f"no reply within {timeout:g} s") from None
        except Exception as e:  # noqa: BLE001 - qemu.qmp's connection errors
            self._note("<-", {"kit": f"{type(e).__name__}: {e}"})
            raise QMPError(command, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__) from None
        self._note("<-", {"return": result})
        return result

    def transcript_text(self) -> str:
        with self._lock:
            entries = list(self.transcript)
        if not entries:
            return "(no QMP traffic)"
        t0 = entries[0][0]
        return "\n".join(f"{t - t0:8.3f} {d:>5} {text}" for t, d, text in entries)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True

        async def go() -> None:
            if self._client is not None:
                try:
                    await asyncio.wait_for(self._client.disconnect(), 3)
                except Exception:  # noqa: BLE001 - closing a connection the VM may have dropped
                    pass
            if self._listener is not None:
                self._listener.cancel()
        if self._thread.is_alive():
            try:
                self._run(go(), 5)
            except Exception:  # noqa: BLE001
                pass
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        self.events._end()
        if not self._loop.is_running():
            self._loop.close()
