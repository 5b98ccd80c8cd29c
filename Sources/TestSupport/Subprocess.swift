import Glibc
import VMMSys

/// What a finished child process left behind.
public struct ProcessOutput: Sendable {
    /// The exit status, 128 + N when killed by signal N, -1 if it could not be started.
    public var status: Int32 = -1
    public var stdout = ""
    public var stderr = ""
}

/// Runs `argv` (looked up in PATH) under `timeout`, stdin from /dev/null, and collects its output.
/// Exit status 124 means the timeout killed it.
///
/// `inheriting`: descriptors the child gets under the same numbers (open them close-on-exec: a
/// descriptor left inheritable goes to every child any test starts meanwhile, and a child that
/// lives on keeps it open, with its lock, or the write end of another test's output pipe).
public func runProcess(_ argv: [String], timeoutSeconds: Int = 60, inheriting: [Int32] = []) -> ProcessOutput {
    var result = ProcessOutput()
    // Close-on-exec, so that no other test's child holds a write end and delays the end of output.
    guard let o = closeOnExecPipe() else { result.stderr = "pipe failed"; return result }
    guard let e = closeOnExecPipe() else { close(o.read); close(o.write); result.stderr = "pipe failed"; return result }
    let outPipe = [o.read, o.write], errPipe = [e.read, e.write]
    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
    posix_spawn_file_actions_adddup2(&actions, outPipe[1], 1)
    posix_spawn_file_actions_adddup2(&actions, errPipe[1], 2)
    // dup2 onto itself clears close-on-exec in the child only (glibc 2.29 and later).
    for fd in inheriting { posix_spawn_file_actions_adddup2(&actions, fd, fd) }
    let args = (["timeout", "\(timeoutSeconds)"] + argv).map { strdup($0) } + [nil]
    var attributes = shellLikeSpawnAttributes()
    var pid: pid_t = 0
    let rc = posix_spawnp(&pid, "timeout", &actions, &attributes, args, environ)
    for p in args { free(p) }
    posix_spawn_file_actions_destroy(&actions)
    posix_spawnattr_destroy(&attributes)
    close(outPipe[1]); close(errPipe[1])
    guard rc == 0 else {
        close(outPipe[0]); close(errPipe[0])
        result.stderr = "posix_spawn failed: \(rc)"
        return result
    }
    // Drain stderr on another thread so a child that fills one pipe cannot block on the other.
    final class Text: @unchecked Sendable { var value = "" }
    let errFD = errPipe[0]
    let errText = Text()
    let errThread = try? OSThread(name: "test-stderr", role: .io) { errText.value = drain(errFD) }
    result.stdout = drain(outPipe[0])
    if let errThread { errThread.join() } else { errText.value = drain(errFD) }
    result.stderr = errText.value
    var st: Int32 = 0
    while waitpid(pid, &st, 0) < 0 && errno == EINTR {}
    result.status = (st & 0x7F) == 0 ? (st >> 8) & 0xFF : 128 + (st & 0x7F)
    return result
}

/// Spawn attributes that start a child as from a shell: no signal blocked, default actions (the
/// test runner blocks signals, and a spawned process would inherit that: a SIGTERM would not stop
/// it). Destroy with posix_spawnattr_destroy.
public func shellLikeSpawnAttributes() -> posix_spawnattr_t {
    var attributes = posix_spawnattr_t()
    posix_spawnattr_init(&attributes)
    var none = sigset_t(), all = sigset_t()
    sigemptyset(&none)
    sigfillset(&all)
    posix_spawnattr_setsigmask(&attributes, &none)
    posix_spawnattr_setsigdefault(&attributes, &all)
    posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))
    return attributes
}

private func drain(_ fd: Int32) -> String {
    var data: [UInt8] = []
    var buf = [UInt8](repeating: 0, count: 65536)
    while true {
        let n = read(fd, &buf, buf.count)
        if n < 0 && errno == EINTR { continue }
        if n <= 0 { break }
        data += buf[0..<n]
    }
    close(fd)
    return String(decoding: data, as: UTF8.self)
}

/// Runs `body` on a new OS thread after `milliseconds`. For tests that must act on a machine while
/// `Machine.run()` blocks: a Swift concurrency task could starve, because blocking test bodies can
/// occupy every thread of the cooperative pool (two on a 2-core machine).
public func afterDelay(milliseconds: Int, _ body: @escaping @Sendable () -> Void) {
    _ = try? OSThread(name: "test-delay", role: .io) {
        usleep(UInt32(milliseconds) * 1000)
        body()
    }
}

/// A fresh empty directory under `parent` (default /tmp).
public func makeTemporaryDirectory(_ prefix: String = "swiftvmm-test", in parent: String = "/tmp") -> String {
    var template = Array("\(parent)/\(prefix)-XXXXXX".utf8CString)
    let path = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
    return path.map { String(cString: $0) } ?? "/tmp"
}

/// Removes the directory `path` and everything in it, subdirectories included, without following
/// symbolic links (an entry that `unlink` refuses is taken for a directory). Best effort. It refuses
/// "/" and "/tmp" (what `makeTemporaryDirectory` returns when it could not make one).
public func removeTemporaryDirectory(_ path: String) {
    guard !path.isEmpty, path != "/", path != "/tmp" else { return }
    if let dir = opendir(path) {
        var names: [String] = []
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            if name != "." && name != ".." { names.append(name) }
        }
        closedir(dir)
        for name in names where unlink(path + "/" + name) != 0 { removeTemporaryDirectory(path + "/" + name) }
    }
    rmdir(path)
}

/// True when `name` is an executable in PATH.
public func commandExists(_ name: String) -> Bool {
    let path = (getenv("PATH").map { String(cString: $0) } ?? "/usr/bin:/bin").split(separator: ":")
    return path.contains { access("\($0)/\(name)", X_OK) == 0 }
}
