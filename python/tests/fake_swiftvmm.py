#!/usr/bin/env python3
"""A stand-in for swiftvmm in the kit's unit tests: the same command line, a QMP socket that speaks
the protocol (greeting, capabilities, the commands the kit uses, events), a console on stdout that
echoes stdin, and snapshot directories. Behaviour knobs (environment):

  FAKE_KVM       what `host-info` prints (default "hardware: fake")
  FAKE_MODE      "" (normal) | "exit-early" (fails before the socket) | "no-socket" (never makes it)
                 | "exit-after-init" (prints the init line, then exits 3) | "ignore-term" (SIGTERM ignored)
  FAKE_CONSOLE   extra console lines printed after boot, separated by "|" ("@0.5": a pause of 0.5 s;
                 "TEXT\\c": TEXT without a newline)
  FAKE_NO_ACK    set: a generation-ID change is never acknowledged
  FAKE_RESTORE_ACK_AT  seconds after a restore's start at which the guest acknowledges the new ID
                 (default 0.2; 0: before any client can have connected, so the event reaches no one)
  FAKE_ARGV_FILE append this process's argv (one JSON list per line) to that file
  FAKE_TRIPLE_FAULT  a counter file: each VM adds one to it and, while the count is at most
                 FAKE_TRIPLE_FAULTS (default 1), ends 0.5 s after its init line as swiftvmm does after a
                 triple fault in the vCPU's reset state (status 3), first appending the lines of the
                 file FAKE_L1TRACE to $SWIFTVMM_KIT_TRACEFS/trace (the test host's KVM trace)
"""

import asyncio
import json
import os
import signal
import sys
import time
import uuid


def opt(argv, name, default=None):
    if name in argv:
        i = argv.index(name)
        return argv[i + 1] if i + 1 < len(argv) else default
    return default


def out(text):
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


class Fake:
    def __init__(self, argv, guid, restored_from=None):
        self.argv = argv
        self.guid = guid
        self.status = "paused" if "--paused" in argv else "running"
        self.pending = restored_from is not None
        self.triple_fault = self._counts_a_triple_fault()
        self.acked = False
        self.ack_latency = None
        self.writers = []
        self.change_time = time.monotonic()

    @staticmethod
    def _counts_a_triple_fault():
        """FAKE_TRIPLE_FAULT: this VM adds one to the counter file; it faults while the count is at
        most FAKE_TRIPLE_FAULTS."""
        counter = os.environ.get("FAKE_TRIPLE_FAULT")
        if not counter:
            return False
        with open(counter, "a+") as f:
            f.seek(0)
            n = len(f.read()) + 1
            f.write("x")
        return n <= int(os.environ.get("FAKE_TRIPLE_FAULTS", "1"))

    def event(self, name, data=None):
        now = time.time()
        msg = {"event": name, "data": data or {},
               "timestamp": {"seconds": int(now), "microseconds": int(now % 1 * 1e6)}}
        for w in self.writers:
            w.write((json.dumps(msg) + "\r\n").encode())

    def change(self, guid):
        self.guid = guid
        self.pending, self.acked = True, False
        self.change_time = time.monotonic()
        self.event("VM_GENERATION_ID_CHANGED", {"guid": guid})
        if not os.environ.get("FAKE_NO_ACK"):
            asyncio.get_running_loop().call_later(0.05, self.ack)

    def ack(self):
        if self.pending:
            self.pending, self.acked = False, True
            self.ack_latency = round((time.monotonic() - self.change_time) * 1000, 3)
            self.event("VM_GENERATION_ID_ACKNOWLEDGED", {"guid": self.guid, "latency-ms": self.ack_latency})

    async def command(self, name, args):
        if name == "qmp_capabilities":
            return {}
        if name == "query-status":
            return {"status": self.status, "running": self.status == "running"}
        if name == "stop":
            self.status = "paused"
            self.event("STOP")
            return {}
        if name == "cont":
            self.status = "running"
            self.event("RESUME")
            return {}
        if name == "query-vm-generation-id":
            reply = {"guid": self.guid, "pending": self.pending, "acknowledged": self.acked}
            if self.acked:
                reply["ack-latency-ms"] = self.ack_latency
            return reply
        if name == "set-vm-generation-id":
            guid = args.get("guid")
            if not isinstance(guid, str):
                raise QMPFail("GenericError", "Invalid parameter type for 'guid', expected: string")
            self.change(str(uuid.uuid4()) if guid == "auto" else guid)
            return {"guid": self.guid}
        if name == "snapshot-create":
            path = args.get("path")
            if os.path.exists(path):
                raise QMPFail("GenericError", f"{path}: File exists")
            tmp = path + ".tmp"
            os.mkdir(tmp)
            with open(os.path.join(tmp, "state.bin"), "w") as f:
                json.dump({"magic": "FAKE", "guid": self.guid, "status": self.status}, f)
            with open(os.path.join(tmp, "memory.bin"), "wb") as f:
                f.truncate(1 << 20)
            os.rename(tmp, path)
            return {"pause-ms": 1.25, "live": bool(args.get("live", False))}
        if name == "system_powerdown":
            self.event("POWERDOWN")
            out("swiftvmm-guest: powering off")
            asyncio.get_running_loop().call_later(0.05, self.shutdown, "guest-shutdown", 0)
            return {}
        if name == "quit":
            asyncio.get_running_loop().call_later(0.02, self.shutdown, "host-qmp-quit", 0)
            return {}
        raise QMPFail("CommandNotFound", f"The command {name} has not been found")

    def shutdown(self, reason, status):
        self.event("SHUTDOWN", {"guest": reason.startswith("guest"), "reason": reason})
        sys.stdout.flush()
        os._exit(status)


class QMPFail(Exception):
    def __init__(self, cls, desc):
        super().__init__(desc)
        self.cls, self.desc = cls, desc


async def serve(fake, sock):
    async def client(reader, writer):
        fake.writers.append(writer)
        writer.write(json.dumps({"QMP": {"version": {"qemu": {"major": 9, "minor": 0, "micro": 0}, "package": "fake"},
                                         "capabilities": []}}).encode() + b"\r\n")
        decoder, buf = json.JSONDecoder(), ""
        while True:
            # QMP is a stream of JSON values, not lines (qemu.qmp sends no newline).
            buf = buf.lstrip()
            try:
                msg, end = decoder.raw_decode(buf)
            except ValueError:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                buf += chunk.decode()
                continue
            buf = buf[end:]
            reply = {"id": msg["id"]} if "id" in msg else {}
            try:
                reply["return"] = await fake.command(msg.get("execute"), msg.get("arguments", {}))
            except QMPFail as e:
                reply["error"] = {"class": e.cls, "desc": e.desc}
            writer.write(json.dumps(reply).encode() + b"\r\n")
            await writer.drain()
        fake.writers.remove(writer)

    tmp = sock + ".tmp"
    server = await asyncio.start_unix_server(client, path=tmp)
    os.rename(tmp, sock)  # the path appears only once it accepts connections
    return server


async def console(fake):
    out("swiftvmm-guest: init reached")
    if fake.triple_fault:
        await asyncio.sleep(0.5)  # the kit is connected to its QMP socket: the VM started, then crashed
        with open(os.environ["FAKE_L1TRACE"]) as src, open(os.path.join(os.environ["SWIFTVMM_KIT_TRACEFS"], "trace"), "a") as t:
            t.write(src.read())
        sys.stderr.write("swiftvmm: guest crashed (triple fault on vCPU 0\nvCPU 0: rip=0x000000000000fff0 "
                         "rsp=0x0000000000000000\n  cs=f000 base=0x00000000ffff0000 l=0 db=0)\n")
        sys.stderr.flush()
        os._exit(3)
    for line in filter(None, os.environ.get("FAKE_CONSOLE", "").split("|")):
        if line.startswith("@"):  # @SECONDS: a pause
            await asyncio.sleep(float(line[1:]))
        elif line.endswith("\\c"):  # TEXT\c: no newline after it
            sys.stdout.write(line[:-2])
            sys.stdout.flush()
        else:
            out(line)
    if os.environ.get("FAKE_MODE") == "exit-after-init":
        sys.stderr.write("swiftvmm: guest crashed (triple fault on vCPU 0)\n")
        os._exit(3)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = await reader.readline()
        if not line:
            await asyncio.sleep(3600)
        out("echo: " + line.decode().rstrip("\n"))


async def vm(argv, guid, restored_from=None):
    mode = os.environ.get("FAKE_MODE", "")
    if mode == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if mode == "exit-early":
        sys.stderr.write(f"swiftvmm: {opt(argv, '--kernel')}: not a bzImage\n")
        sys.exit(1)
    fake = Fake(argv, guid, restored_from)
    ack_at = float(os.environ.get("FAKE_RESTORE_ACK_AT", "0.2"))
    if restored_from and ack_at == 0 and not os.environ.get("FAKE_NO_ACK"):
        fake.ack()
    sock = opt(argv, "--qmp")
    if mode != "no-socket" and sock:
        await serve(fake, sock)
    if restored_from:
        out(f"fake: restored from {restored_from}")
        if fake.pending and not os.environ.get("FAKE_NO_ACK"):
            asyncio.get_running_loop().call_later(ack_at, fake.ack)
    await console(fake)


def main(argv):
    if os.environ.get("FAKE_ARGV_FILE"):
        with open(os.environ["FAKE_ARGV_FILE"], "a") as f:
            f.write(json.dumps(argv) + "\n")
    if argv[:1] == ["host-info"]:
        print(os.environ.get("FAKE_KVM", "hardware: fake"))
        return 0
    if argv[:1] == ["run"]:
        g = opt(argv, "--vmgenid", "auto")
        asyncio.run(vm(argv, str(uuid.uuid4()) if g == "auto" else g))
        return 0
    if argv[:1] == ["restore"]:
        d = argv[1]
        try:
            with open(os.path.join(d, "state.bin")) as f:
                state = json.load(f)
        except (OSError, ValueError) as e:
            sys.stderr.write(f"swiftvmm: {d}: cannot read the snapshot: {e}\n")
            return 1
        g = opt(argv, "--vmgenid", "auto")
        guid = state["guid"] if g == "keep" else (str(uuid.uuid4()) if g == "auto" else g)
        asyncio.run(vm(argv, guid, restored_from=d))
        return 0
    if argv[:2] == ["snapshot", "verify"]:
        try:
            with open(os.path.join(argv[2], "state.bin")) as f:
                ok = json.load(f).get("magic") == "FAKE"
        except (OSError, ValueError):
            ok = False
        print("state.bin: ok" if ok else "state.bin: CRC32C mismatch in the header")
        return 0 if ok else 1
    if argv[:2] == ["snapshot", "inspect"]:
        print(f"snapshot {argv[2]}")
        for label, value in (("state.bin", "1234 bytes"), ("magic", '"SWVMSNAP"'), ("format", "1.3"),
                             ("writer", "swiftvmm fake"), ("guest memory", "268435456 bytes (256 MiB)"),
                             ("vCPUs", "1"), ("memory.bin CRC32C", "0x12345678")):
            print(label + " " * max(1, 19 - len(label)) + value)
        print("sections (2):")
        print("  NAME              VERSION  MINIMUM  FLAGS         OFFSET      LENGTH  CRC32C")
        print("  vcpu.0                  3        1  required         512         900  0x0badf00d")
        print("  vmgenid                 1        1  optional        1412          16  0x00c0ffee")
        return 0
    sys.stderr.write(f"fake swiftvmm: unknown command {argv}\n")
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
