import CLinux
import Glibc
import QMP
import Synchronization
import Testing
import TestSupport
import VMMSys

/// How the server's socket file comes into being: only once it is listening, under a temporary
/// name first, which is never left behind.
@Suite("QMP socket creation")
struct SocketCreationTests {
    static let temporaryPrefix = ".swiftvmm-qmp-"

    /// Names in `dir` (without . and ..).
    func entries(_ dir: String) -> [String] {
        guard let d = opendir(dir) else { return [] }
        defer { closedir(d) }
        var names: [String] = []
        while let e = readdir(d) {
            let name = withUnsafeBytes(of: e.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            if name != "." && name != ".." { names.append(name) }
        }
        return names.sorted()
    }

    func temporaries(_ dir: String) -> [String] {
        entries(dir).filter { $0.hasPrefix(Self.temporaryPrefix) }
    }

    /// A socket file at `path` that nobody listens on (what a killed process leaves).
    func deadSocket(_ path: String) {
        let s = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        precondition(clinux_unix_bind(s, path) == 0, "bind \(path)")
        close(s)
    }

    /// A pid no process has right now.
    func deadPID() -> pid_t {
        var pid: pid_t = 4_000_000
        while pid > 1 {
            if kill(pid, 0) != 0 && errno == ESRCH { return pid }
            pid -= 1
        }
        preconditionFailure("no free pid")
    }

    /// Connects to `path`: 0, or the errno.
    func connectErrno(_ path: String) -> Int32 {
        let s = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        defer { close(s) }
        return clinux_unix_connect(s, path) == 0 ? 0 : errno
    }

    @Test("a client that connects as soon as the path appears is never refused")
    func noConnectionRefusedWindow() throws {
        // Several racers at once: on a loaded machine the window between bind and listen, if there
        // is one, is hit far more often.
        let racers = 4
        let rounds = 200
        let failures = Mutex<[String]>([])
        var threads: [OSThread] = []
        for r in 0..<racers {
            threads.append(try OSThread(name: "race\(r)", role: .io) {
                let dir = makeTemporaryDirectory("swiftvmm-qmp-race")
                defer { removeTemporaryDirectory(dir) }
                let path = dir + "/qmp.sock"
                for round in 0..<rounds {
                    let outcome = Mutex<Int32?>(nil)
                    let give_up = Atomic<Bool>(false)
                    let poller: OSThread
                    do {
                        poller = try OSThread(name: "poll\(r)", role: .io) {
                            var st = stat()
                            while lstat(path, &st) != 0 {
                                if give_up.load(ordering: .relaxed) { return }
                            }
                            let e = connectErrno(path)
                            outcome.withLock { $0 = e }
                        }
                    } catch {
                        failures.withLock { $0.append("thread: \(error)") }
                        return
                    }
                    do {
                        let server = try QMPServer(path: path, handler: nil)
                        poller.join()
                        server.stop()
                    } catch {
                        give_up.store(true, ordering: .relaxed)
                        poller.join()
                        failures.withLock { $0.append("round \(round): \(error)") }
                        continue
                    }
                    if let e = outcome.withLock({ $0 }), e != 0 {
                        failures.withLock { $0.append("racer \(r) round \(round): connect failed: \(String(cString: strerror(e)))") }
                    }
                }
            })
        }
        for t in threads { t.join() }
        let f = failures.withLock { $0 }
        #expect(f.isEmpty, "\(f.count) of \(racers * rounds) connections failed: \(f.prefix(5))")
    }

    @Test("no temporary name is left behind: after init, after a failed init, after stop")
    func noTemporaryLeft() throws {
        let dir = makeTemporaryDirectory("swiftvmm-qmp-tmp")
        defer { removeTemporaryDirectory(dir) }
        let path = dir + "/qmp.sock"
        let server = try QMPServer(path: path, handler: nil)
        #expect(temporaries(dir).isEmpty)
        #expect(entries(dir) == ["qmp.sock"])
        var st = stat()
        #expect(lstat(path, &st) == 0 && st.st_mode & S_IFMT == S_IFSOCK && st.st_mode & 0o7777 == 0o600)
        #expect(connectErrno(path) == 0)

        // A live server's path: refused, nothing left.
        #expect(throws: SysError("create the QMP socket \(path) (another server is listening on it)", errno: EADDRINUSE)) {
            _ = try QMPServer(path: path, handler: nil)
        }
        #expect(entries(dir) == ["qmp.sock"])
        server.stop()
        #expect(entries(dir).isEmpty)

        // A regular file in the way: refused, left alone, nothing else left.
        let file = dir + "/file"
        let fd = clinux_open(file, O_CREAT | O_WRONLY | O_CLOEXEC, 0o644)
        close(fd)
        #expect(throws: SysError("create the QMP socket \(file) (a file that is not a socket is in the way)", errno: EEXIST)) {
            _ = try QMPServer(path: file, handler: nil)
        }
        #expect(lstat(file, &st) == 0 && st.st_mode & S_IFMT == S_IFREG)
        #expect(entries(dir) == ["file"])

        // A missing directory: nothing to leave, a plain error.
        #expect(throws: SysError.self) { _ = try QMPServer(path: dir + "/missing/qmp.sock", handler: nil) }
        #expect(entries(dir) == ["file"])

        // A stale socket is replaced by a working one; stop removes it.
        deadSocket(path)
        let second = try QMPServer(path: path, handler: nil)
        #expect(entries(dir) == ["file", "qmp.sock"])
        #expect(connectErrno(path) == 0)
        second.stop()
        #expect(entries(dir) == ["file"])
    }

    @Test("temporaries of killed servers are removed; live ones and anything else are not")
    func staleTemporaries() throws {
        let dir = makeTemporaryDirectory("swiftvmm-qmp-stale")
        defer { removeTemporaryDirectory(dir) }
        let dead = deadPID()
        let p = Self.temporaryPrefix
        // Removed: a socket nobody listens on, named by a pid that is gone.
        deadSocket(dir + "/\(p)\(dead)-0123456789abcdef")
        deadSocket(dir + "/\(p)\(dead)-1")
        // Kept: the pid is alive (ours)...
        deadSocket(dir + "/\(p)\(getpid())-feedface")
        // ...someone listens on it...
        let listening = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        defer { close(listening) }
        #expect(clinux_unix_bind(listening, dir + "/\(p)\(dead)-abc") == 0)
        #expect(listen(listening, 1) == 0)
        // ...not a socket, or not our name pattern.
        close(clinux_open(dir + "/\(p)\(dead)-def", O_CREAT | O_WRONLY | O_CLOEXEC, 0o600))
        mkdir(dir + "/\(p)\(dead)-0", 0o700)
        deadSocket(dir + "/\(p)x\(dead)-1")
        deadSocket(dir + "/\(p)\(dead)")
        deadSocket(dir + "/other-\(dead)-1")
        deadSocket(dir + "/\(p)-1")

        let before = entries(dir)
        let server = try QMPServer(path: dir + "/qmp.sock", handler: nil)
        let removed = Set(before).subtracting(entries(dir))
        #expect(removed == ["\(p)\(dead)-0123456789abcdef", "\(p)\(dead)-1"])
        #expect(Set(entries(dir)).subtracting(before) == ["qmp.sock"])
        server.stop()
        #expect(Set(before).subtracting(entries(dir)) == removed)
    }

    @Test("an empty path and one longer than a Unix socket address are refused with a clear error")
    func pathLength() throws {
        #expect(throws: SysError("create the QMP socket (the QMP socket path is empty)", errno: EINVAL)) {
            _ = try QMPServer(path: "", handler: nil)
        }
        let dir = makeTemporaryDirectory("swiftvmm-qmp-len")
        defer { removeTemporaryDirectory(dir) }
        // A directory whose name leaves room for a one-byte file name only: the temporary name
        // (longer) cannot be bound by its full path.
        let sub = dir + "/" + String(repeating: "d", count: 104 - dir.utf8.count)
        #expect(mkdir(sub, 0o700) == 0)
        for (path, expected) in [(sub + "/q", 107), (dir + "/" + String(repeating: "s", count: 106 - dir.utf8.count), 107)] {
            #expect(path.utf8.count == expected)
            let server = try QMPServer(path: path, handler: nil)
            #expect(connectErrno(path) == 0, "\(path)")
            server.stop()
            #expect(access(path, F_OK) != 0)
        }
        for extra in [108, 109, 200] {
            let path = sub + "/" + String(repeating: "x", count: extra - sub.utf8.count - 1)
            #expect(path.utf8.count == extra)
            #expect(throws: SysError("create the QMP socket \(path) (the QMP socket path is longer than 107 bytes, the limit of Unix socket addresses)", errno: ENAMETOOLONG)) {
                _ = try QMPServer(path: path, handler: nil)
            }
        }
        #expect(entries(sub) == [])
        #expect(temporaries(dir).isEmpty)
    }
}
