"""A GuestRun driver (see guestrun.GuestRun.driver): runs `VMM-COMMAND... --qmp SOCKET`, passes the
VMM's output through, and talks to it with the real QEMU QMP client library (qemu.qmp) while the
guest runs. What it does is chosen by the guest: a console line `swiftvmm-qmp: ACTION` asks for one
action, and the driver prints its results as `driver: KEY=VALUE` lines for the tests to read.

Actions:
  query-guid      query-vm-generation-id → driver: guid=...
  change-guid     set-vm-generation-id {"guid": "auto"} → driver: new-guid=...
  query-ack       query-vm-generation-id → driver: ack={"pending": ..., "acknowledged": ..., ...} (the reply
                  without its guid, as JSON; printed after every event received so far)
  powerdown       system_powerdown
  stop-cont       stop, 1 s paused (query-status → driver: status-while-stopped=...), cont
Every event as it arrives: driver: event NAME {DATA as JSON}.
At the end: driver: events=NAME,NAME,... (every event received, in order) and the VMM's exit status.
"""

import asyncio
import json
import os
import sys
import tempfile

from qemu.qmp import QMPClient


async def main(cmd: list[str]) -> int:
    sock = os.path.join(tempfile.mkdtemp(prefix="swiftvmm-qmp-"), "qmp.sock")
    proc = await asyncio.create_subprocess_exec(*cmd, "--qmp", sock, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    actions: asyncio.Queue[str] = asyncio.Queue()

    async def pump() -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = raw.decode("utf-8", "replace")
            sys.stdout.write(line)
            sys.stdout.flush()
            text = line.strip().replace("\r", "")
            if text.startswith("swiftvmm-qmp: "):
                await actions.put(text[len("swiftvmm-qmp: "):].strip())

    pump_task = asyncio.create_task(pump())
    qmp = QMPClient("swiftvmm-e2e")
    for _ in range(400):
        try:
            await qmp.connect(sock)
            break
        except Exception:  # noqa: BLE001 - the socket appears once swiftvmm is up
            if proc.returncode is not None:
                break
            await asyncio.sleep(0.05)
    else:
        print("driver: error=could not connect to the QMP socket", flush=True)

    events: list[str] = []

    async def listen() -> None:
        async for ev in qmp.events:
            events.append(ev["event"])
            print(f"driver: event {ev['event']} {json.dumps(ev.get('data', {}), sort_keys=True)}", flush=True)

    listener = asyncio.create_task(listen()) if qmp.runstate.name == "RUNNING" else None

    async def serve() -> None:
        while True:
            action = await actions.get()
            try:
                if action == "query-guid":
                    r = await qmp.execute("query-vm-generation-id")
                    print(f"driver: guid={r['guid']}", flush=True)
                elif action == "change-guid":
                    r = await qmp.execute("set-vm-generation-id", {"guid": "auto"})
                    print(f"driver: new-guid={r['guid']}", flush=True)
                elif action == "query-ack":
                    r = await qmp.execute("query-vm-generation-id")
                    await asyncio.sleep(0.1)  # an event sent before the reply has been printed by then
                    ack = {k: v for k, v in r.items() if k != "guid"}
                    print(f"driver: ack={json.dumps(ack, sort_keys=True)}", flush=True)
                elif action == "powerdown":
                    await qmp.execute("system_powerdown")
                    print("driver: powerdown-sent", flush=True)
                elif action == "stop-cont":
                    await qmp.execute("stop")
                    await asyncio.sleep(1.0)
                    st = await qmp.execute("query-status")
                    print(f"driver: status-while-stopped={st['status']},running={st['running']}", flush=True)
                    await qmp.execute("cont")
                    st = await qmp.execute("query-status")
                    print(f"driver: status-after-cont={st['status']}", flush=True)
                else:
                    print(f"driver: error=unknown action {action}", flush=True)
            except Exception as e:  # noqa: BLE001 - reported to the test
                print(f"driver: error={type(e).__name__}: {e}", flush=True)

    server = asyncio.create_task(serve())
    status = await proc.wait()
    await pump_task
    await asyncio.sleep(0.2)  # let the last events arrive
    server.cancel()
    if listener:
        listener.cancel()
    try:
        await qmp.disconnect()
    except Exception:  # noqa: BLE001
        pass
    print(f"driver: events={','.join(events)}", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
