import Glibc
import Testing
import VMMSys

private func isOpen(_ fd: Int32) -> Bool { fcntl(fd, F_GETFD) >= 0 }

@Suite("VMMSys Unix sockets, poll and descriptors")
struct UnixSocketTests {
    @Test("a listener's file appears listening, refuses a second listener, and is removed")
    func listener() throws {
        let tmp = TempDir()
        defer { withExtendedLifetime(tmp) {} }  // Swift may end a value's life at its last use
        let dir = tmp.path
        let path = dir + "/s.sock"
        let listener = try UnixListener(path: path, description: "test socket", temporaryPrefix: ".t-")
        var st = stat()
        #expect(lstat(path, &st) == 0 && st.st_mode & S_IFMT == S_IFSOCK && st.st_mode & 0o777 == 0o600)
        #expect(throws: SysError("create the test socket \(path) (another server is listening on it)", errno: EADDRINUSE)) {
            _ = try UnixListener(path: path, description: "test socket", temporaryPrefix: ".t-")
        }
        #expect(throws: SysError("create the test socket (the test socket path is empty)", errno: EINVAL)) {
            _ = try UnixListener(path: "", description: "test socket", temporaryPrefix: ".t-")
        }
        #expect(UnixListener.temporaryOwner(".t-123-abc", prefix: ".t-") == 123)
        #expect(UnixListener.temporaryOwner(".t-123-xyz", prefix: ".t-") == nil)
        // The second listener's probe connected (then closed): its connection waits in the backlog.
        _ = try listener.accept()
        // Nobody else waits: accept says EAGAIN.
        #expect(throws: SysError("accept", errno: EAGAIN)) { _ = try listener.accept() }
        listener.removeSocketFile()
        #expect(lstat(path, &st) != 0 && errno == ENOENT)
    }

    @Test("streams carry bytes and descriptors both ways, report a full buffer and the end of the stream")
    func streams() throws {
        let tmp = TempDir()
        defer { withExtendedLifetime(tmp) {} }  // Swift may end a value's life at its last use
        let dir = tmp.path
        let listener = try UnixListener(path: dir + "/s.sock", description: "test socket", temporaryPrefix: ".t-")
        let client = try UnixStream.connect(to: dir + "/s.sock")
        var polls = PollSet()
        polls.add(listener.fd, .readable)
        #expect(try polls.wait(timeoutMilliseconds: 5000) == [.readable])
        let server = try listener.accept()

        // Bytes and a descriptor from the client.
        let passed = try OwnedFD.open("/dev/null", flags: O_WRONLY)
        let hello = Array("hello".utf8)
        #expect(try hello.withUnsafeBytes { try client.send($0, passing: [passed.rawValue]) } == 5)
        var buffer = [UInt8](repeating: 0, count: 64)
        let got = try buffer.withUnsafeMutableBytes { try server.receive(into: $0) }
        guard case .data(let n, let fds) = got else {
            Issue.record("expected data, got \(got)")
            return
        }
        #expect(n == 5 && Array(buffer.prefix(5)) == hello && fds.count == 1)
        for fd in fds {
            #expect(try descriptorStatusFlags(fd) & O_ACCMODE == O_WRONLY)
            #expect(fcntl(fd, F_GETFD) & FD_CLOEXEC != 0)
            closeDescriptor(fd)
            #expect(!isOpen(fd))
        }
        #expect(try buffer.withUnsafeMutableBytes { try server.receive(into: $0) } == .wouldBlock)

        // The server writes until the socket is full: send reports 0, not an error.
        let chunk = [UInt8](repeating: 0x41, count: 64 * 1024)
        var total = 0
        while true {
            let n = try chunk.withUnsafeBytes { try server.send($0) }
            if n == 0 { break }
            total += n
        }
        #expect(total > 0)
        let writable = server.waitWritable(timeoutMilliseconds: 10)
        #expect(!writable)

        // The client ends its side: the server reads the end of the stream.
        try client.shutdown(.writing)
        #expect(try buffer.withUnsafeMutableBytes { try server.receive(into: $0) } == .endOfStream)
    }

    @Test("a poll set reports each descriptor's readiness in order; an eventfd is consumed")
    func poll() throws {
        let event = try EventFD()
        let other = try EventFD()
        var polls = PollSet()
        polls.add(event.fd, .readable)
        polls.add(other.fd, .readable)
        #expect(try polls.wait(timeoutMilliseconds: 0) == [[], []])
        event.signal()
        event.signal()
        #expect(try polls.wait(timeoutMilliseconds: 1000) == [.readable, []])
        #expect(event.consume() == 2)
        #expect(try polls.wait(timeoutMilliseconds: 0) == [[], []])
    }

    @Test("descriptors: duplicates are close-on-exec and share the access mode; released numbers stay open")
    func descriptors() throws {
        let file = try OwnedFD.open("/dev/null", flags: O_RDWR)
        let dup = try file.duplicate()
        #expect(dup.rawValue != file.rawValue)
        #expect(fcntl(dup.rawValue, F_GETFD) & FD_CLOEXEC != 0)
        #expect(try descriptorStatusFlags(dup.rawValue) & O_ACCMODE == O_RDWR)
        let raw = dup.releaseRawValue()
        #expect(isOpen(raw))
        let second = try duplicateDescriptor(raw)
        closeDescriptors([raw, second])
        #expect(!isOpen(raw) && !isOpen(second))
        #expect(throws: SysError("fcntl F_GETFL", errno: EBADF)) { _ = try descriptorStatusFlags(raw) }
        #expect(ThreadIdentity.current == ThreadIdentity.current)
        #expect(realtimeNow().seconds > 1_600_000_000)
    }
}
