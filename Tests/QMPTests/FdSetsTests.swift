import Glibc
import QMP
import Testing
import VMMSys

/// fd sets with real descriptors: a temporary file opened read-only, write-only and read-write.
/// Leaks are checked by counting the descriptors of this process that refer to the test's file.
@Suite("fd sets")
struct FdSetsTests {
    let file = TempFile()
    let fdSets = FdSets()

    func negotiatedSession() -> QMPSession {
        let s = QMPSession(handler: TestHandler(), fdSets: fdSets)
        _ = s.receive(Array(#"{"execute": "qmp_capabilities"}"#.utf8))
        return s
    }

    /// Sends `request` with a descriptor of the test file opened with `flags` (ownership passes to
    /// the session, as with recvmsg).
    func send(_ s: QMPSession, _ request: String, flags: Int32?) -> JSONValue? {
        let fds = flags.map { [file.open($0)] } ?? []
        let replies = s.receive(Array(request.utf8), fds: fds)
        #expect(replies.count == 1)
        return replies.first
    }

    func addFd(_ s: QMPSession, flags: Int32, arguments: String = "{}") -> (set: Int64, fd: Int32)? {
        let r = send(s, #"{"execute": "add-fd", "arguments": \#(arguments)}"#, flags: flags)
        guard let set = r?["return"]?["fdset-id"]?.intValue, let fd = r?["return"]?["fd"]?.intValue else {
            Issue.record("add-fd failed: \(r?.serialized ?? "no reply")")
            return nil
        }
        return (set, Int32(fd))
    }

    /// Descriptors of this process open on the test's file (other tests' descriptors do not count).
    func openOnFile() -> Int {
        guard let dir = try? OwnedFD.openDirectory("/proc/self/fd") else { return -1 }
        return dir.directoryEntries().filter { name in
            var buf = [CChar](repeating: 0, count: 4096)
            let n = readlink("/proc/self/fd/" + name, &buf, buf.count - 1)
            return n > 0 && String(decoding: buf.prefix(n).map { UInt8(bitPattern: $0) }, as: UTF8.self) == file.path
        }.count
    }

    @Test("10,000 add-fd/remove-fd cycles leave no descriptor behind")
    func tenThousandCycles() {
        let s = negotiatedSession()
        let before = openOnFile()
        // The count sees a descriptor the set holds.
        if let probe = addFd(s, flags: O_RDONLY, arguments: #"{"fdset-id": 6}"#) {
            #expect(openOnFile() == before + 1)
            _ = send(s, #"{"execute": "remove-fd", "arguments": {"fdset-id": \#(probe.set)}}"#, flags: nil)
        }
        for _ in 0..<10_000 {
            guard let added = addFd(s, flags: O_RDONLY, arguments: #"{"fdset-id": 5}"#) else { return }
            let r = send(s, #"{"execute": "remove-fd", "arguments": {"fdset-id": \#(added.set)}}"#, flags: nil)
            #expect(r?["return"] != nil)
        }
        #expect(openOnFile() == before)
        #expect(before == 0)
    }

    @Test("add-fd, query-fdsets, remove-fd through the session")
    func addQueryRemove() throws {
        let id = file.identity
        do {
            let s = negotiatedSession()
            let a = try #require(addFd(s, flags: O_RDONLY))
            #expect(a.set == 0)
            #expect(accessMode(a.fd) == O_RDONLY)
            #expect(FileIdentity(fd: a.fd) == id)
            let b = try #require(addFd(s, flags: O_WRONLY, arguments: #"{"fdset-id": 0, "opaque": "wronly"}"#))
            #expect(b.set == 0)
            let c = try #require(addFd(s, flags: O_RDWR))
            #expect(c.set == 1) // lowest free id
            let d = try #require(addFd(s, flags: O_RDWR, arguments: #"{"fdset-id": 7}"#))
            #expect(d.set == 7)
            let e = try #require(addFd(s, flags: O_RDWR))
            #expect(e.set == 2)
            #expect(id.openDescriptorCount == 5)

            let q = send(s, #"{"execute": "query-fdsets"}"#, flags: nil)
            #expect(q == json("""
                {"return": [
                  {"fdset-id": 7, "fds": [{"fd": \(d.fd)}]},
                  {"fdset-id": 2, "fds": [{"fd": \(e.fd)}]},
                  {"fdset-id": 1, "fds": [{"fd": \(c.fd)}]},
                  {"fdset-id": 0, "fds": [{"fd": \(a.fd)}, {"fd": \(b.fd), "opaque": "wronly"}]}]}
                """))

            #expect(send(s, #"{"execute": "remove-fd", "arguments": {"fdset-id": 0, "fd": \#(a.fd)}}"#, flags: nil) == json(#"{"return": {}}"#))
            #expect(id.openDescriptorCount == 4) // not in use: closed at once
            #expect(send(s, #"{"execute": "remove-fd", "arguments": {"fdset-id": 1}}"#, flags: nil) == json(#"{"return": {}}"#))
            #expect(id.openDescriptorCount == 3)
            #expect(fdSets.query().map(\.fdSetID) == [7, 2, 0])
            // Freed ids are reused, lowest first.
            let f = try #require(addFd(s, flags: O_RDONLY))
            #expect(f.set == 1)

            #expect(errorOf(send(s, #"{"execute": "remove-fd", "arguments": {"fdset-id": 0, "fd": \#(a.fd)}}"#, flags: nil)!)?.desc ==
                    "File descriptor named 'fdset-id:0, fd:\(a.fd)' not found")
            #expect(errorOf(send(s, #"{"execute": "remove-fd", "arguments": {"fdset-id": 42}}"#, flags: nil)!)?.desc ==
                    "File descriptor named 'fdset-id:42' not found")
            #expect(errorOf(send(s, #"{"execute": "remove-fd", "arguments": {}}"#, flags: nil)!)?.desc ==
                    "Parameter 'fdset-id' is missing")
            s.close()
        }
        // The monitor disconnected and nothing used the sets: all closed.
        #expect(id.openDescriptorCount == 0)
        #expect(fdSets.query().isEmpty)
    }

    @Test("add-fd errors: no descriptor, bad fdset-id, bad arguments (the descriptor is closed)")
    func addErrors() {
        let id = file.identity
        let s = negotiatedSession()
        #expect(errorOf(send(s, #"{"execute": "add-fd"}"#, flags: nil)!)?.desc == "No file descriptor supplied via SCM_RIGHTS")
        #expect(errorOf(send(s, #"{"execute": "add-fd", "arguments": {"fdset-id": -1}}"#, flags: O_RDONLY)!)?.desc ==
                "Parameter 'fdset-id' expects a non-negative value")
        #expect(id.openDescriptorCount == 0)
        #expect(errorOf(send(s, #"{"execute": "add-fd", "arguments": {"fdset-id": "1"}}"#, flags: O_RDONLY)!)?.desc ==
                "Invalid parameter type for 'fdset-id', expected: integer")
        // Argument errors leave the descriptor pending (as in QEMU); the next batch replaces it.
        #expect(id.openDescriptorCount == 1)
        #expect(errorOf(send(s, #"{"execute": "add-fd", "arguments": {"bogus": 1}}"#, flags: O_RDONLY)!)?.desc ==
                "Parameter 'bogus' is unexpected")
        #expect(id.openDescriptorCount == 1)
        s.close()
        #expect(id.openDescriptorCount == 0)
    }

    @Test("a descriptor sent on its own (as qemu.qmp does, on a single space) waits for the command")
    func descriptorBeforeCommand() throws {
        let id = file.identity
        let s = negotiatedSession()
        #expect(s.receive([0x20], fds: [file.open(O_RDWR)]).isEmpty)
        #expect(id.openDescriptorCount == 1)
        // A command that takes no descriptor leaves it waiting.
        #expect(s.receive(Array(#"{"execute": "query-fdsets"}"#.utf8)) == [json(#"{"return": []}"#)])
        let added = try #require(s.receive(Array(#"{"execute": "add-fd"}"#.utf8)).first?["return"])
        #expect(added["fdset-id"] == 0)
        #expect(id.openDescriptorCount == 1)
        // A newer batch replaces an unused one; extra descriptors of a batch are closed on use.
        _ = s.receive([0x20], fds: [file.open(O_RDONLY)])
        _ = s.receive([0x20], fds: [file.open(O_WRONLY), file.open(O_RDONLY), file.open(O_RDONLY)])
        #expect(id.openDescriptorCount == 4)
        let r = s.receive(Array(#"{"execute": "take-fd"}"#.utf8)).first
        #expect(r?["return"]?["access-mode"] == .int(Int64(O_WRONLY)))
        #expect(id.openDescriptorCount == 1)
        // Unused ones are closed with the session.
        _ = s.receive([0x20], fds: [file.open(O_RDONLY)])
        s.close()
        #expect(id.openDescriptorCount == 0)
        // After close, descriptors fed are closed at once.
        s.feed([0x20], fds: [file.open(O_RDONLY)])
        #expect(id.openDescriptorCount == 0)
    }

    @Test("/dev/fdset/N opens the descriptor with the matching access mode")
    func accessModeMatching() throws {
        let id = file.identity
        let s = negotiatedSession()
        let ro = try #require(addFd(s, flags: O_RDONLY, arguments: #"{"fdset-id": 3}"#))
        let wo = try #require(addFd(s, flags: O_WRONLY, arguments: #"{"fdset-id": 3}"#))
        let rw = try #require(addFd(s, flags: O_RDWR, arguments: #"{"fdset-id": 3}"#))
        _ = (ro, wo, rw)
        for mode in [O_RDONLY, O_WRONLY, O_RDWR] {
            let f = try fdSets.openFdSet(path: "/dev/fdset/3", flags: mode | O_CREAT | O_NONBLOCK)
            #expect(accessMode(f.rawValue) == mode)
            #expect(FileIdentity(fd: f.rawValue) == id)
            #expect(f.fdSetID == 3)
            #expect(fdSets.users(of: 3) == 1)
            #expect(fcntl(f.rawValue, F_GETFD) & FD_CLOEXEC != 0) // (keeps f alive past the check above)
        }
        #expect(fdSets.users(of: 3) == 0)
        // A set without a read-write descriptor cannot be opened read-write.
        let other = try #require(addFd(s, flags: O_RDONLY))
        #expect(throws: SysError("open /dev/fdset/\(other.set)", errno: EACCES)) { _ = try fdSets.openFdSet(path: "/dev/fdset/\(other.set)", flags: O_RDWR) }
        #expect(throws: SysError("open /dev/fdset/99", errno: ENOENT)) { _ = try fdSets.openFdSet(path: "/dev/fdset/99", flags: O_RDONLY) }
        for bad in ["/dev/fdset/", "/dev/fdset/x", "/dev/fdset/1/2", "/dev/fdset/-1", "/dev/fdset/ 1"] {
            #expect(throws: SysError("open \(bad)", errno: EINVAL)) { _ = try fdSets.openHostFile(path: bad, flags: O_RDONLY) }
        }
        // Any other path is opened.
        let plain = try fdSets.openHostFile(path: file.path, flags: O_RDONLY)
        #expect(plain.fdSetID == nil && FileIdentity(fd: plain.rawValue) == id)
        #expect(throws: SysError.self) { _ = try fdSets.openHostFile(path: "/nonexistent/x", flags: O_RDONLY) }
        _ = consume plain
        s.close()
        #expect(id.openDescriptorCount == 0)
    }

    @Test("a set in use keeps its descriptors across remove-fd and disconnect until the last user closes")
    func refcount() throws {
        let id = file.identity
        let dup: HostFile
        do {
            let s = negotiatedSession()
            let a = try #require(addFd(s, flags: O_RDWR))
            dup = try fdSets.openFdSet(path: "/dev/fdset/\(a.set)", flags: O_RDWR)
            #expect(id.openDescriptorCount == 2)
            #expect(send(s, #"{"execute": "remove-fd", "arguments": {"fdset-id": \#(a.set)}}"#, flags: nil) == json(#"{"return": {}}"#))
            // Removed: hidden and not matched any more, but not closed while the set is in use.
            #expect(id.openDescriptorCount == 2)
            #expect(fdSets.query() == [FdSetInfo(fdSetID: a.set, fds: [])])
            #expect(throws: SysError.self) { _ = try fdSets.openFdSet(path: "/dev/fdset/\(a.set)", flags: O_RDWR) }
            s.close()
            #expect(id.openDescriptorCount == 2)
        }
        // The duplicate still works.
        var byte: UInt8 = 0
        #expect(pread(dup.rawValue, &byte, 1, 0) == 1 && byte == UInt8(ascii: "f"))
        _ = consume dup
        #expect(id.openDescriptorCount == 0)
        #expect(fdSets.query().isEmpty)
    }

    @Test("disconnect closes descriptors of sets not in use; those in use stay until released")
    func disconnect() throws {
        let id = file.identity
        let s = negotiatedSession()
        let idle = try #require(addFd(s, flags: O_RDONLY))
        let busy = try #require(addFd(s, flags: O_RDONLY))
        #expect(idle.set != busy.set)
        let user = try fdSets.openFdSet(path: "/dev/fdset/\(busy.set)", flags: O_RDONLY)
        #expect(id.openDescriptorCount == 3)
        s.close()
        #expect(id.openDescriptorCount == 2) // the idle set's descriptor is gone
        #expect(fdSets.query().map(\.fdSetID) == [busy.set])

        // A new monitor connects before the user closes: the descriptor stays (a monitor is there
        // to manage it), and goes when that monitor disconnects.
        let s2 = negotiatedSession()
        _ = consume user
        #expect(id.openDescriptorCount == 1)
        #expect(fdSets.query() == [FdSetInfo(fdSetID: busy.set, fds: [FdSetFDInfo(fd: busy.fd, opaque: nil)])])
        s2.close()
        #expect(id.openDescriptorCount == 0)
    }

    @Test("getfd and closefd")
    func namedDescriptors() {
        let id = file.identity
        let named = QMPNamedFDs()
        let s = QMPSession(handler: nil, fdSets: fdSets, namedFDs: named)
        _ = s.receive(Array(#"{"execute": "qmp_capabilities"}"#.utf8))
        func desc(_ request: String, fd: Int32? = nil) -> String? {
            s.receive(Array(request.utf8), fds: fd.map { [file.open($0)] } ?? []).first.flatMap(errorOf)?.desc
        }
        #expect(desc(#"{"execute": "getfd", "arguments": {"fdname": "disk"}}"#) == "No file descriptor supplied via SCM_RIGHTS")
        #expect(desc(#"{"execute": "getfd", "arguments": {"fdname": "disk"}}"#, fd: O_RDONLY) == nil)
        #expect(desc(#"{"execute": "getfd", "arguments": {"fdname": "disk"}}"#, fd: O_RDWR) == nil) // replaces, closing the first
        #expect(id.openDescriptorCount == 1)
        #expect(desc(#"{"execute": "getfd", "arguments": {"fdname": "9lives"}}"#, fd: O_RDONLY) ==
                "Parameter 'fdname' expects a name not starting with a digit")
        #expect(id.openDescriptorCount == 1)
        #expect(named.names == ["disk"])
        #expect(desc(#"{"execute": "closefd", "arguments": {"fdname": "tap"}}"#) == "File descriptor named 'tap' not found")
        #expect(desc(#"{"execute": "closefd", "arguments": {"fdname": "disk"}}"#) == nil)
        #expect(id.openDescriptorCount == 0)
        #expect(desc(#"{"execute": "getfd", "arguments": {"fdname": "tap"}}"#, fd: O_WRONLY) == nil)
        switch named.take("tap") {
        case .some(let taken): #expect(accessMode(taken.rawValue) == O_WRONLY)
        case .none: Issue.record("tap was not stored")
        }
        #expect(named.names.isEmpty)
        #expect(id.openDescriptorCount == 0)
        s.close()
    }

    @Test("the number of descriptors in sets is bounded")
    func bounded() throws {
        let id = file.identity
        let small = FdSets(maxDescriptors: 2)
        let s = QMPSession(handler: nil, fdSets: small)
        _ = s.receive(Array(#"{"execute": "qmp_capabilities"}"#.utf8))
        for _ in 0..<2 {
            #expect(s.receive(Array(#"{"execute": "add-fd"}"#.utf8), fds: [file.open(O_RDONLY)]).first?["return"] != nil)
        }
        let r = s.receive(Array(#"{"execute": "add-fd"}"#.utf8), fds: [file.open(O_RDONLY)]).first
        #expect(errorOf(r!)?.desc.contains("Too many") == true)
        #expect(id.openDescriptorCount == 2)
        s.close()
        #expect(id.openDescriptorCount == 0)
    }

    @Test("fd sets are usable from many threads at once")
    func concurrentOpens() async throws {
        let id = file.identity
        let s = negotiatedSession()
        let a = try #require(addFd(s, flags: O_RDONLY))
        let sets = fdSets
        let failures = await withTaskGroup(of: Int.self) { group in
            for _ in 0..<8 {
                group.addTask {
                    var failed = 0
                    for _ in 0..<200 {
                        do {
                            let f = try sets.openFdSet(path: "/dev/fdset/\(a.set)", flags: O_RDONLY)
                            if accessMode(f.rawValue) != O_RDONLY { failed += 1 }
                        } catch {
                            failed += 1
                        }
                    }
                    return failed
                }
            }
            return await group.reduce(0, +)
        }
        #expect(failures == 0)
        #expect(fdSets.users(of: a.set) == 0)
        #expect(id.openDescriptorCount == 1)
        s.close()
        #expect(id.openDescriptorCount == 0)
    }

    @Test("descriptors held by an FdSets object are closed with it")
    func deinitCloses() {
        let id = file.identity
        do {
            let sets = FdSets()
            sets.monitorConnected()
            _ = try? sets.add(takingOwnershipOf: file.open(O_RDONLY), fdSetID: nil, opaque: "x")
            #expect(id.openDescriptorCount == 1)
        }
        #expect(id.openDescriptorCount == 0)
    }
}
