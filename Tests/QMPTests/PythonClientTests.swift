import Glibc
import QMP
import Testing
import TestSupport

/// True when QEMU's Python QMP library can be imported (`python3 -m pip install qemu.qmp`).
let qemuQMPAvailable: Bool = commandExists("python3") && runProcess(["python3", "-c", "import qemu.qmp"], timeoutSeconds: 30).status == 0

@Suite("QEMU's Python client (qemu.qmp) against the server",
       .enabled(if: qemuQMPAvailable, "needs the qemu.qmp Python package (python3 -m pip install qemu.qmp)"))
struct PythonClientTests {
    @Test("qemu.qmp negotiates, lists commands, runs handler commands, passes an fd and gets an event")
    func qemuQMP() throws {
        let handler = TestHandler()
        let server = try QMPServer(path: temporarySocketPath(), handler: handler)
        handler.server.withLock { $0 = server }
        try server.start()
        defer { server.stop() }
        let file = TempFile()
        let scriptPath = temporaryTestDirectory() + "/qmp_client_check.py"
        let fd = open(scriptPath, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        try #require(fd >= 0)
        _ = Array(qmpClientCheckScript.utf8).withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        close(fd)
        defer { unlink(scriptPath) }
        let r = runProcess(["python3", scriptPath, server.path, file.path], timeoutSeconds: 60)
        #expect(r.status == 0, "stdout: \(r.stdout)\nstderr: \(r.stderr)")
        #expect(r.stdout.contains("OK"))
        #expect(handler.log.contains("echo") && handler.log.contains("emit-test-event"))
        #expect(eventually { file.identity.openDescriptorCount == 0 })
    }
}

/// The Python side. It lives in a string rather than a .py file next to the tests because SwiftPM
/// warns about every file in a target directory that is not a declared resource (and the test
/// target declares none). To run it by hand: copy it out, start a server with `TestHandler`, and run
/// `python3 qmp_client_check.py SOCKET FILE`.
let qmpClientCheckScript = #"""
#!/usr/bin/env python3
"""Drives SwiftVMM's QMP server with QEMU's own Python client library (qemu.qmp).

Usage: qmp_client_check.py SOCKET FILE

The server must run the QMPTests' TestHandler (commands echo, fail, emit-test-event). FILE is any
readable file: a descriptor of it is passed with SCM_RIGHTS and added to an fd set. Prints "OK" and
exits 0 when everything matched; exits 77 when qemu.qmp cannot be imported.
"""
import asyncio
import sys

try:
    from qemu.qmp import ExecuteError, QMPClient
except ImportError as e:  # the Swift test skips before running us, but be explicit
    print(f"qemu.qmp not importable: {e}", file=sys.stderr)
    sys.exit(77)


async def check(path: str, file: str) -> None:
    qmp = QMPClient("swiftvmm-check")
    await qmp.connect(path)  # reads the greeting and negotiates capabilities
    greeting = qmp.greeting
    assert greeting is not None
    version = greeting.QMP.version
    assert version["qemu"]["major"] == 8, version
    assert "package" in version, version
    assert list(greeting.QMP.capabilities) == [], greeting

    names = {c["name"] for c in await qmp.execute("query-commands")}
    for expected in ("qmp_capabilities", "query-commands", "add-fd", "remove-fd",
                     "query-fdsets", "echo"):
        assert expected in names, (expected, names)

    assert await qmp.execute("echo", {"text": "hi", "count": 2}) == {"text": "hihi"}

    try:
        await qmp.execute("fail")
        raise AssertionError("fail did not fail")
    except ExecuteError as e:
        assert e.error_class == "GenericError", e.error_class
        assert str(e) == "it failed", str(e)

    try:
        await qmp.execute("no-such-command")
        raise AssertionError("an unknown command succeeded")
    except ExecuteError as e:
        assert e.error_class == "CommandNotFound", e.error_class

    # qemu.qmp sends the descriptor on a single space byte, then the command.
    with open(file, "rb") as f:
        qmp.send_fd_scm(f.fileno())
        added = await qmp.execute("add-fd", {"fdset-id": 4, "opaque": "from-python"})
    assert added["fdset-id"] == 4, added
    sets = await qmp.execute("query-fdsets")
    assert sets == [{"fdset-id": 4, "fds": [{"fd": added["fd"], "opaque": "from-python"}]}], sets
    await qmp.execute("remove-fd", {"fdset-id": 4})
    assert await qmp.execute("query-fdsets") == []

    with qmp.listener("PY_EVENT") as listener:
        await qmp.execute("emit-test-event", {"name": "PY_EVENT"})
        event = await asyncio.wait_for(listener.get(), 5)
    assert event["event"] == "PY_EVENT", event
    assert event["data"] == {"from": "handler"}, event
    assert set(event["timestamp"]) == {"seconds", "microseconds"}, event

    await qmp.disconnect()


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    asyncio.run(asyncio.wait_for(check(sys.argv[1], sys.argv[2]), 30))
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
"""#
