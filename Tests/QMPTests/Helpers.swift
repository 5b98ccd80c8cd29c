import CLinux
import Glibc
import QMP
import Synchronization
import Testing
import TestSupport
import VMMSys

// MARK: Descriptors

/// The file behind a descriptor.
struct FileIdentity: Equatable {
    let dev: UInt64
    let ino: UInt64

    init(fd: Int32) {
        var st = stat()
        precondition(fstat(fd, &st) == 0, "fstat failed")
        dev = UInt64(st.st_dev)
        ino = UInt64(st.st_ino)
    }

    /// How many descriptors of this process refer to the file (from /proc/self/fd). Counting one
    /// file rather than all descriptors keeps the check exact while other tests run in parallel.
    var openDescriptorCount: Int {
        var count = 0
        guard let dir = opendir("/proc/self/fd") else { return -1 }
        defer { closedir(dir) }
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
            }
            guard let fd = Int32(name) else { continue }
            var st = stat()
            // stat follows the magic link to the open file (fails for the directory's own fd only
            // after it is closed, which cannot happen here).
            if stat("/proc/self/fd/\(fd)", &st) == 0 && UInt64(st.st_dev) == dev && UInt64(st.st_ino) == ino {
                count += 1
            }
        }
        return count
    }
}

/// All descriptors of this process (for a coarse look; the exact checks use `FileIdentity`).
func processDescriptorCount() -> Int {
    guard let dir = opendir("/proc/self/fd") else { return -1 }
    defer { closedir(dir) }
    var n = 0
    while readdir(dir) != nil { n += 1 }
    return n - 2 // . and ..
}

/// How many descriptors of this process are Unix sockets bound to `path`: a listening socket and
/// the connections it accepted (which carry its address), but not the clients' sockets. A
/// `QMPServer`'s address is the temporary name it bound before renaming the file into place: get
/// it with `TestClient.peerAddress`.
func serverSocketDescriptorCount(path: String) -> Int {
    // /proc/net/unix: "Num RefCount Protocol Flags Type St Inode Path".
    let fd = open("/proc/net/unix", O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return -1 }
    var text: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 65536)
    while true {
        let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        if n <= 0 { break }
        text += chunk[..<n]
    }
    close(fd)
    var inodes = Set<String>()
    for line in text.split(separator: 0x0A).dropFirst() {
        let fields = line.split(separator: 0x20)
        if fields.count >= 8 && String(decoding: fields[7], as: UTF8.self) == path {
            inodes.insert(String(decoding: fields[6], as: UTF8.self))
        }
    }
    guard let dir = opendir("/proc/self/fd") else { return -1 }
    defer { closedir(dir) }
    var count = 0
    while let entry = readdir(dir) {
        let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self) }
        guard Int32(name) != nil else { continue }
        var buf = [CChar](repeating: 0, count: 256)
        let n = readlink("/proc/self/fd/\(name)", &buf, buf.count - 1)
        guard n > 0 else { continue }
        let target = String(decoding: buf[..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        if target.hasPrefix("socket:["), inodes.contains(String(target.dropFirst(8).dropLast())) { count += 1 }
    }
    return count
}

/// A temporary regular file, removed on deinit.
final class TempFile {
    let path: String
    init(_ contents: String = "fdset test data\n") {
        var template = Array("/tmp/swiftvmm-qmp-XXXXXX".utf8CString)
        let fd = mkstemp(&template)
        precondition(fd >= 0)
        _ = contents.utf8CString.withUnsafeBytes { write(fd, $0.baseAddress, $0.count - 1) }
        close(fd)
        path = String(decoding: template.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
    deinit { unlink(path) }

    /// Opens the file with `flags` (close-on-exec); the caller closes the result.
    func open(_ flags: Int32) -> Int32 {
        let fd = clinux_open(path, flags | O_CLOEXEC, 0)
        precondition(fd >= 0, "open \(path) failed")
        return fd
    }

    var identity: FileIdentity {
        let fd = open(O_RDONLY)
        defer { close(fd) }
        return FileIdentity(fd: fd)
    }
}

func accessMode(_ fd: Int32) -> Int32 { fcntl(fd, F_GETFL) & O_ACCMODE }

/// Waits until `condition` holds, up to `timeoutMilliseconds`; returns whether it did.
func eventually(timeoutMilliseconds: Int = 5000, _ condition: () -> Bool) -> Bool {
    var waited = 0
    while !condition() {
        if waited >= timeoutMilliseconds { return false }
        usleep(10_000)
        waited += 10
    }
    return true
}

// MARK: JSON shorthands

func json(_ text: String, sourceLocation: SourceLocation = #_sourceLocation) -> JSONValue {
    switch JSONValue.parse(text) {
    case .success(let v): return v
    case .failure(let e):
        Issue.record("bad JSON in the test: \(e) in \(text)", sourceLocation: sourceLocation)
        return .null
    }
}

func errorOf(_ reply: JSONValue) -> (cls: String, desc: String)? {
    guard let e = reply["error"], let c = e["class"]?.stringValue, let d = e["desc"]?.stringValue else { return nil }
    return (c, d)
}

// MARK: A machine stand-in

/// A handler with a few machine-like commands, recording what it ran.
final class TestHandler: QMPCommandHandler {
    private let state = Mutex<(running: Bool, log: [String])>((true, []))
    /// Set by tests that want the handler to emit events through a server.
    let server = Mutex<QMPServer?>(nil)
    let afterReplyRan = Mutex(0)

    var commandNames: [String] {
        ["stop", "cont", "query-status", "echo", "take-fd", "emit-test-event", "quit", "fail", "no-such-device"]
    }

    var log: [String] { state.withLock { $0.log } }

    func execute(_ command: String, arguments: JSONObject, context: QMPContext) -> QMPCommandResult {
        state.withLock { $0.log.append(command) }
        do throws(QMPError) {
            var args = QMPArguments(arguments)
            switch command {
            case "stop":
                try args.finish()
                state.withLock { $0.running = false }
                server.withLock { $0 }?.emit(event: "STOP")
                return .success([:])
            case "cont":
                try args.finish()
                state.withLock { $0.running = true }
                server.withLock { $0 }?.emit(event: "RESUME")
                return .success([:])
            case "query-status":
                try args.finish()
                let running = state.withLock { $0.running }
                return .success(["running": .bool(running), "status": .string(running ? "running" : "paused")])
            case "echo":
                let text = try args.string("text")
                let count = try args.optionalInt("count") ?? 1
                try args.finish()
                return .success(["text": .string(String(repeating: text, count: Int(max(0, min(count, 100)))))])
            case "take-fd":
                try args.finish()
                guard let fd = context.takeReceivedFD() else { throw .generic("No file descriptor supplied via SCM_RIGHTS") }
                return .success(["access-mode": .int(Int64(accessMode(fd.rawValue)))])
            case "emit-test-event":
                let name = try args.string("name")
                try args.finish()
                server.withLock { $0 }?.emit(event: name, data: ["from": "handler"])
                return .success([:])
            case "quit":
                try args.finish()
                context.afterReply { [self] in afterReplyRan.withLock { $0 += 1 } }
                return .success([:])
            case "fail":
                return .failure(.generic("it failed"))
            case "no-such-device":
                return .failure(.deviceNotFound("nic9"))
            default:
                return .failure(.commandNotFound(command))
            }
        } catch {
            return .failure(error)
        }
    }
}

// MARK: A tiny QMP client over the Unix socket

final class TestClient {
    let fd: Int32
    private var buffer: [UInt8] = []

    init(path: String) throws(SysError) {
        let s = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard s >= 0 else { throw SysError.last("socket") }
        guard clinux_unix_connect(s, path) == 0 else {
            let e = SysError.last("connect \(path)")
            close(s)
            throw e
        }
        fd = s
    }

    deinit { close(fd) }

    /// The address the server's socket was bound to, as getpeername reports it.
    var peerAddress: String {
        var addr = sockaddr_un()
        var len = socklen_t(MemoryLayout<sockaddr_un>.size)
        let rc = withUnsafeMutablePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getpeername(fd, $0, &len) } }
        guard rc == 0 else { return "" }
        return withUnsafeBytes(of: addr.sun_path) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
    }

    /// Sends `text` in one sendmsg, with `fds` attached.
    func send(_ text: String, fds: [Int32] = []) {
        let bytes = Array(text.utf8)
        let n = bytes.withUnsafeBytes { raw in
            fds.withUnsafeBufferPointer { clinux_send_fds(fd, raw.baseAddress, raw.count, $0.baseAddress, Int32(fds.count)) }
        }
        precondition(n == bytes.count, "short send")
    }

    /// Sends raw bytes (not necessarily UTF-8) in one sendmsg.
    func send(bytes: [UInt8]) {
        let n = bytes.withUnsafeBytes { raw in clinux_send_fds(fd, raw.baseAddress, raw.count, nil, 0) }
        precondition(n == bytes.count, "short send")
    }

    /// Sends a request and returns the next message (replies only come after their events).
    func execute(_ text: String, fds: [Int32] = []) -> JSONValue? {
        send(text + "\n", fds: fds)
        return readMessage()
    }

    /// Reads one line and parses it; nil on timeout or end of stream.
    func readMessage(timeoutMilliseconds: Int32 = 5000) -> JSONValue? {
        guard let line = readLine(timeoutMilliseconds: timeoutMilliseconds) else { return nil }
        // Replies can be larger than what the server accepts from clients.
        switch JSONValue.parse(line, limits: JSONLimits(maxBytes: 16 << 20, maxDepth: 64)) {
        case .success(let v): return v
        case .failure(let e):
            Issue.record("server sent invalid JSON: \(e): \(String(decoding: line.prefix(200), as: UTF8.self))")
            return nil
        }
    }

    func readLine(timeoutMilliseconds: Int32 = 5000) -> [UInt8]? {
        let deadline = monotonicMs() + Int64(timeoutMilliseconds)
        var searched = 0
        while true {
            if let nl = buffer[searched...].firstIndex(of: 0x0A) {
                let line = Array(buffer[..<nl])
                buffer.removeFirst(nl + 1)
                return line
            }
            searched = buffer.count
            let left = deadline - monotonicMs()
            if left <= 0 { return nil }
            var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            if poll(&p, 1, Int32(left)) <= 0 { continue }
            var chunk = [UInt8](repeating: 0, count: 65536)
            let n = chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if n <= 0 { return nil }
            buffer += chunk[..<n]
        }
    }

    /// True when the server closed the connection (EOF within the timeout, nothing else pending).
    func seesEOF(timeoutMilliseconds: Int32 = 5000) -> Bool {
        var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        guard poll(&p, 1, timeoutMilliseconds) > 0 else { return false }
        var b: UInt8 = 0
        return recv(fd, &b, 1, 0) == 0
    }

    /// Reads the greeting and negotiates.
    func handshake() -> JSONValue? {
        guard let greeting = readMessage(), greeting["QMP"] != nil else { return nil }
        guard execute(#"{"execute": "qmp_capabilities"}"#) == json(#"{"return": {}}"#) else { return nil }
        return greeting
    }
}

func monotonicMs() -> Int64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Int64(ts.tv_sec) * 1000 + Int64(ts.tv_nsec) / 1_000_000
}

/// A fresh socket path in a new directory. The directories are all in one directory of this test
/// process, removed with what is left in it when the process exits (they used to stay in /tmp, one
/// per test).
func temporarySocketPath() -> String {
    temporaryTestDirectory() + "/qmp.sock"
}

/// A fresh directory in this process's directory of test files (removed at exit).
func temporaryTestDirectory() -> String {
    makeTemporaryDirectory("s", in: socketDirectory)
}

/// This process's directory of test sockets and files (created on first use, removed at exit).
private let socketDirectory: String = {
    let dir = makeTemporaryDirectory("swiftvmm-qmp")
    atexit { removeTemporaryDirectory(socketDirectory) }
    return dir
}()
