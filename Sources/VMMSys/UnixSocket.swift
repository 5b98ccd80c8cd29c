import CLinux
import Glibc

/// Linux's O_PATH (the same on x86-64 and arm64), which Swift's Glibc module leaves out.
private let openPathOnly: Int32 = 0o10000000

private let streamFlags = Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue) | Int32(SOCK_NONBLOCK.rawValue)

/// One end of a connected Unix stream socket, nonblocking and close-on-exec; closed in `deinit`.
public struct UnixStream: ~Copyable, @unchecked Sendable {
    public let fd: OwnedFD

    /// Most descriptors passed with one message, either way; more that arrive are closed.
    public static let maxPassedDescriptors = Int(CLINUX_MAX_PASSED_FDS)

    init(adopting raw: Int32) {
        fd = OwnedFD(adopting: raw)
    }

    /// Connects to the socket at `path`. Nonblocking: a listener whose backlog is full fails with
    /// EAGAIN rather than waiting. Throws SysError("socket") or SysError("connect PATH").
    public static func connect(to path: String) throws(SysError) -> UnixStream {
        let raw = try retryingEINTR("socket") { socket(AF_UNIX, streamFlags, 0) }
        let stream = UnixStream(adopting: raw)
        guard clinux_unix_connect(raw, path) == 0 else { throw SysError.last("connect \(path)") }
        return stream
    }

    /// Sends what the socket takes now (never waits; MSG_NOSIGNAL: a peer that went away is an
    /// EPIPE error, not a signal). Returns the bytes sent, 0 when the socket buffer is full.
    public func send(_ bytes: UnsafeRawBufferPointer) throws(SysError) -> Int {
        guard !bytes.isEmpty else { return 0 }
        while true {
            let n = Glibc.send(fd.rawValue, bytes.baseAddress!, bytes.count, Int32(MSG_NOSIGNAL) | Int32(MSG_DONTWAIT))
            if n >= 0 { return n }
            let code = Glibc.errno
            switch code {
            case EINTR: continue
            case EAGAIN, EWOULDBLOCK: return 0
            case EFAULT, EBADF: preconditionFailure("send: \(SysError("send", errno: code)) (a bug: the buffer and socket are ours)")
            default: throw SysError("send", errno: code)
            }
        }
    }

    /// Sends `bytes` with `descriptors` attached (SCM_RIGHTS; at most `maxPassedDescriptors`).
    /// The descriptors stay the caller's. Returns the bytes sent, 0 when the socket buffer is full.
    public func send(_ bytes: UnsafeRawBufferPointer, passing descriptors: [Int32]) throws(SysError) -> Int {
        guard descriptors.count <= Self.maxPassedDescriptors else {
            throw SysError("sendmsg (\(descriptors.count) descriptors, more than \(Self.maxPassedDescriptors))", errno: EINVAL)
        }
        while true {
            let n = descriptors.withUnsafeBufferPointer { fds in
                clinux_send_fds(fd.rawValue, bytes.baseAddress, bytes.count, fds.baseAddress, Int32(fds.count))
            }
            if n >= 0 { return n }
            let code = Glibc.errno
            switch code {
            case EINTR: continue
            case EAGAIN, EWOULDBLOCK: return 0
            default: throw SysError("sendmsg", errno: code)
            }
        }
    }

    /// What one `receive` got.
    public enum Received: Equatable, Sendable {
        /// Nothing to read now.
        case wouldBlock
        /// The peer closed its sending side (descriptors that came with the end were closed).
        case endOfStream
        /// `count` bytes (more than 0), and the descriptors passed with them (close-on-exec), which
        /// the caller now owns.
        case data(count: Int, descriptors: [Int32])
    }

    /// Reads what is there now into `buffer` (never waits), with the descriptors passed along
    /// (up to `maxPassedDescriptors`; any more are closed). Retries EINTR; throws SysError("recvmsg")
    /// for a connection that failed (ECONNRESET...).
    public func receive(into buffer: UnsafeMutableRawBufferPointer) throws(SysError) -> Received {
        var fds = [Int32](repeating: -1, count: Self.maxPassedDescriptors)
        var nfds: Int32 = 0
        while true {
            let n = clinux_recv_fds(fd.rawValue, buffer.baseAddress, buffer.count, Int32(MSG_DONTWAIT) | Int32(MSG_CMSG_CLOEXEC),
                                    &fds, CLINUX_MAX_PASSED_FDS, &nfds)
            if n < 0 {
                let code = Glibc.errno
                switch code {
                case EINTR: continue
                case EAGAIN, EWOULDBLOCK: return .wouldBlock
                default: throw SysError("recvmsg", errno: code)
                }
            }
            let received = Array(fds.prefix(Int(nfds)))
            if n == 0 {
                closeDescriptors(received)
                return .endOfStream
            }
            return .data(count: n, descriptors: received)
        }
    }

    /// Which direction `shutdown` ends.
    public enum Direction: Sendable {
        case reading, writing, both
    }

    /// Ends one or both directions of the connection (shutdown(2)); the peer reads end of stream
    /// after the data already sent when writing ends.
    public func shutdown(_ direction: Direction) throws(SysError) {
        let how: Int32
        switch direction {
        case .reading: how = Int32(SHUT_RD)
        case .writing: how = Int32(SHUT_WR)
        case .both: how = Int32(SHUT_RDWR)
        }
        _ = try retryingEINTR("shutdown") { Glibc.shutdown(fd.rawValue, how) }
    }

    /// Waits up to `timeoutMilliseconds` for room to write (or for an error or hangup, which the
    /// next `send` reports). True when the socket is ready.
    public func waitWritable(timeoutMilliseconds: Int32) -> Bool {
        var set = PollSet()
        set.add(fd, .writable)
        return (try? set.wait(timeoutMilliseconds: timeoutMilliseconds))?.first?.isEmpty == false
    }

    /// Probes the socket file at `path`: nil when no socket could be made for the probe, 0 when a
    /// nonblocking connect succeeded, else connect's errno (ECONNREFUSED: nobody listens; EAGAIN
    /// or EINPROGRESS: a listener with a full backlog).
    static func probe(_ path: String) -> Int32? {
        let raw = socket(AF_UNIX, streamFlags, 0)
        guard raw >= 0 else { return nil }
        let probe = UnixStream(adopting: raw)
        let rc = clinux_unix_connect(probe.fd.rawValue, path)
        return rc == 0 ? 0 : Glibc.errno
    }
}

extension UnixStream {
    /// A connected pair of Unix stream sockets (socketpair(2)), both close-on-exec. `local` is
    /// nonblocking like every UnixStream; `remote` is left blocking because it is meant to be
    /// handed to another process (with `send(_:passing:)`): a passed descriptor shares its file
    /// status flags with the receiver, and peers such as swtpm read it with blocking calls.
    /// Throws SysError("socketpair") or SysError("fcntl F_SETFL").
    public static func pair() throws(SysError) -> UnixStreamPair {
        var fds: [Int32] = [-1, -1]
        _ = try retryingEINTR("socketpair") {
            socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &fds)
        }
        let local = UnixStream(adopting: fds[0])
        let remote = UnixStream(adopting: fds[1])
        let flags = try retryingEINTR("fcntl F_GETFL") { fcntl(fds[0], F_GETFL) }
        _ = try retryingEINTR("fcntl F_SETFL") { fcntl(fds[0], F_SETFL, flags | O_NONBLOCK) }
        return UnixStreamPair(local: local, remote: remote)
    }

    /// The two ends `pair()` made.
    public struct UnixStreamPair: ~Copyable {
        public let local: UnixStream
        public let remote: UnixStream

        /// Ends the pair once `remote` has been handed over: closes it and returns `local`.
        public consuming func closingRemote() -> UnixStream {
            local
        }
    }

    /// How `receiveExactly` ended.
    public enum FillOutcome: Equatable, Sendable {
        /// The buffer is full.
        case complete
        /// The peer closed its sending side after `received` bytes (fewer than asked for).
        case endOfStream(received: Int)
        /// The time ran out after `received` bytes (fewer than asked for).
        case timedOut(received: Int)
    }

    /// Reads until `buffer` is full, waiting (poll) up to `timeoutMilliseconds` in all (0: only
    /// what is there now), and never reads past the buffer: the bytes that follow stay in the
    /// socket. Descriptors passed along with the bytes are closed. Throws SysError("recvmsg") when
    /// the connection failed (ECONNRESET: the peer died with data unread) and SysError("poll").
    public func receiveExactly(into buffer: UnsafeMutableRawBufferPointer, timeoutMilliseconds: Int32) throws(SysError) -> FillOutcome {
        let deadline = monotonicMilliseconds() + Int64(max(timeoutMilliseconds, 0))
        var count = 0
        while count < buffer.count {
            switch try receive(into: UnsafeMutableRawBufferPointer(rebasing: buffer[count...])) {
            case .data(let n, let descriptors):
                closeDescriptors(descriptors)
                count += n
            case .endOfStream:
                return .endOfStream(received: count)
            case .wouldBlock:
                let left = deadline - monotonicMilliseconds()
                guard left > 0 else { return .timedOut(received: count) }
                var set = PollSet()
                set.add(fd, .readable)
                _ = try set.wait(timeoutMilliseconds: Int32(left))
            }
        }
        return .complete
    }

    /// Sends all of `bytes`, `descriptors` (SCM_RIGHTS, at most `maxPassedDescriptors`; they stay
    /// the caller's) attached to the first part sent, waiting (poll) for room up to
    /// `timeoutMilliseconds` in all. Returns false when the time ran out first (a part may have
    /// been sent). Throws SysError("send") or SysError("sendmsg") when the connection failed
    /// (EPIPE: the peer is gone; never a SIGPIPE).
    public func sendAll(_ bytes: UnsafeRawBufferPointer, passing descriptors: [Int32] = [], timeoutMilliseconds: Int32) throws(SysError) -> Bool {
        let deadline = monotonicMilliseconds() + Int64(max(timeoutMilliseconds, 0))
        var offset = 0
        var pending = descriptors
        while offset < bytes.count {
            let rest = UnsafeRawBufferPointer(rebasing: bytes[offset...])
            let n = pending.isEmpty ? try send(rest) : try send(rest, passing: pending)
            if n > 0 {
                offset += n
                pending = []
                continue
            }
            let left = deadline - monotonicMilliseconds()
            guard left > 0 else { return false }
            _ = waitWritable(timeoutMilliseconds: Int32(left))
        }
        return true
    }
}

/// A listening Unix stream socket at a path, nonblocking and close-on-exec: closed in `deinit`
/// (the socket file stays until `removeSocketFile`).
///
/// The path appears only once the socket listens: it is bound under a temporary name in the same
/// directory first (through /proc/self/fd/DIRFD, so the address stays short whatever the
/// directory's length), then renamed into place without replacing anything. A stale socket file
/// left by a dead process is replaced; a path held by a live server (EADDRINUSE) or by anything
/// but a socket (EEXIST) is refused, and so are an empty path and one longer than 107 bytes
/// (clients could not connect to it). Temporary names left by a process killed between bind and
/// rename are removed.
public struct UnixListener: ~Copyable, @unchecked Sendable {
    public let fd: OwnedFD
    public let path: String
    /// The socket file's device and inode (rename keeps the inode).
    private let device: UInt64
    private let inode: UInt64

    /// Creates the socket file at `path` with `mode` and listens with `backlog`. `description`
    /// names the socket in error messages ("QMP socket": "create the QMP socket PATH (...)");
    /// temporary names are `temporaryPrefix` PID "-" random hex.
    public init(path: String, description: String, temporaryPrefix: String, mode: mode_t = 0o600, backlog: Int32 = 8) throws(SysError) {
        let socketFD = OwnedFD(adopting: try retryingEINTR("socket") { socket(AF_UNIX, streamFlags, 0) })
        (device, inode) = try Self.createSocketFile(listening: socketFD.rawValue, at: path, description: description,
                                                    temporaryPrefix: temporaryPrefix, mode: mode, backlog: backlog)
        fd = socketFD
        self.path = path
    }

    /// Accepts a waiting connection (nonblocking and close-on-exec). Throws SysError("accept"):
    /// EAGAIN when none waits or the client went away, EMFILE/ENFILE/ENOBUFS/ENOMEM when out of
    /// resources (the connection stays in the backlog).
    public func accept() throws(SysError) -> UnixStream {
        let raw = try retryingEINTR("accept") { clinux_accept4(fd.rawValue, Int32(SOCK_CLOEXEC.rawValue) | Int32(SOCK_NONBLOCK.rawValue)) }
        return UnixStream(adopting: raw)
    }

    /// Removes the socket file if `path` still names the one this listener created. Best effort.
    public func removeSocketFile() {
        var st = stat()
        if lstat(path, &st) == 0 && UInt64(st.st_dev) == device && UInt64(st.st_ino) == inode {
            unlink(path)
        }
    }

    /// Binds `fd` under a temporary name in `path`'s directory, listens, and renames the file to
    /// `path`. Returns the identity of the file.
    private static func createSocketFile(listening fd: Int32, at path: String, description: String, temporaryPrefix: String,
                                         mode: mode_t, backlog: Int32) throws(SysError) -> (UInt64, UInt64) {
        guard !path.isEmpty else { throw SysError("create the \(description) (the \(description) path is empty)", errno: EINVAL) }
        // sun_path holds 108 bytes, the terminating NUL included: nobody could connect to a longer path.
        guard path.utf8.count <= 107 else {
            throw SysError("create the \(description) \(path) (the \(description) path is longer than 107 bytes, the limit of Unix socket addresses)", errno: ENAMETOOLONG)
        }
        let directory: String
        let name: String
        if let slash = path.lastIndex(of: "/") {
            directory = slash == path.startIndex ? "/" : String(path[..<slash])
            name = String(path[path.index(after: slash)...])
        } else {
            directory = "."
            name = path
        }
        guard !name.isEmpty && name != "." && name != ".." else {
            throw SysError("create the \(description) \(path) (the path names a directory)", errno: EISDIR)
        }
        let dir = try OwnedFD.open(directory, flags: openPathOnly | O_DIRECTORY)
        // Names relative to the directory's descriptor: short whatever the directory's length.
        let inDirectory = "/proc/self/fd/\(dir.rawValue)/"
        removeStaleTemporaries(in: dir.rawValue, prefix: temporaryPrefix)
        try removeStaleSocket(path, description: description)

        // The file bind creates takes the socket inode's mode (less the umask): no window at 0777.
        _ = fchmod(fd, mode)
        var temporary = ""
        var collisions = 0
        while true {
            temporary = "\(temporaryPrefix)\(getpid())-\(String(UInt64.random(in: .min ... .max), radix: 16))"
            do throws(SysError) {
                _ = try retryingEINTR("bind \(path) (under a temporary name)") { clinux_unix_bind(fd, inDirectory + temporary) }
                break
            } catch {
                guard error.errno == EADDRINUSE && collisions < 3 else { throw error }
                collisions += 1
            }
        }
        do throws(SysError) {
            _ = fchmodat(dir.rawValue, temporary, mode, 0)
            var st = stat()
            guard fstatat(dir.rawValue, temporary, &st, AT_SYMLINK_NOFOLLOW) == 0 else { throw SysError.last("stat \(path)") }
            _ = try retryingEINTR("listen \(path)") { listen(fd, backlog) }
            try moveIntoPlace(inDirectory + temporary, directory: dir.rawValue, temporary: temporary, path: path, name: name,
                              description: description)
            return (UInt64(st.st_dev), UInt64(st.st_ino))
        } catch {
            unlinkat(dir.rawValue, temporary, 0)
            throw error
        }
    }

    /// Renames the temporary socket file to `path`, never over something else: another stale
    /// socket that appeared meanwhile is removed, a live server's socket or another file refused.
    private static func moveIntoPlace(_ from: String, directory dir: Int32, temporary: String, path: String, name: String,
                                      description: String) throws(SysError) {
        let to = "/proc/self/fd/\(dir)/\(name)"
        for _ in 0..<4 {
            if clinux_rename_noreplace(from, to) == 0 { return }
            var err = errno
            if err == EINVAL {
                // No RENAME_NOREPLACE on this file system: a hard link refuses an existing name too.
                if linkat(dir, temporary, dir, name, 0) == 0 {
                    unlinkat(dir, temporary, 0)
                    return
                }
                err = errno
            }
            guard err == EEXIST || err == EINTR else { throw SysError("rename the \(description) to \(path)", errno: err) }
            if err == EEXIST { try removeStaleSocket(path, description: description) }
        }
        throw SysError("create the \(description) \(path) (the path keeps being taken)", errno: EEXIST)
    }

    /// Removes temporary socket files in `dir` left by a process killed between bind and rename:
    /// named `prefix` PID "-" HEX, a socket nobody listens on, and that pid is not a live
    /// process. Anything else stays. Best effort: failures are ignored.
    private static func removeStaleTemporaries(in dir: Int32, prefix: String) {
        let listing = clinux_open("/proc/self/fd/\(dir)", O_RDONLY | O_DIRECTORY | O_CLOEXEC, 0)
        guard listing >= 0 else { return }
        guard let stream = fdopendir(listing) else {
            Glibc.close(listing)
            return
        }
        var candidates: [(name: String, pid: pid_t)] = []
        while let entry = readdir(stream) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            if let pid = temporaryOwner(name, prefix: prefix) { candidates.append((name, pid)) }
        }
        closedir(stream)
        for (name, pid) in candidates {
            guard pid != getpid(), kill(pid, 0) != 0 && errno == ESRCH else { continue }
            var st = stat()
            guard fstatat(dir, name, &st, AT_SYMLINK_NOFOLLOW) == 0, st.st_mode & S_IFMT == S_IFSOCK else { continue }
            guard let result = UnixStream.probe("/proc/self/fd/\(dir)/\(name)") else { return }
            if result == ECONNREFUSED { unlinkat(dir, name, 0) }
        }
    }

    /// The pid in a temporary socket name (`prefix` DIGITS "-" HEX), nil for other names.
    public static func temporaryOwner(_ name: String, prefix: String) -> pid_t? {
        guard name.hasPrefix(prefix) else { return nil }
        let parts = name.dropFirst(prefix.count).split(separator: "-", omittingEmptySubsequences: false)
        guard parts.count == 2, (1...10).contains(parts[0].count), parts[0].allSatisfy({ $0.isASCII && $0.isNumber }),
              (1...16).contains(parts[1].count), parts[1].allSatisfy({ $0.isASCII && $0.isHexDigit }),
              let pid = pid_t(parts[0]), pid > 0 else { return nil }
        return pid
    }

    private static func removeStaleSocket(_ path: String, description: String) throws(SysError) {
        var st = stat()
        guard lstat(path, &st) == 0 else { return }
        guard st.st_mode & S_IFMT == S_IFSOCK else {
            throw SysError("create the \(description) \(path) (a file that is not a socket is in the way)", errno: EEXIST)
        }
        // A socket someone listens on belongs to a live server: connecting tells. Nonblocking, so a
        // full backlog (EAGAIN) cannot hang us; it means "in use" as well.
        if let err = UnixStream.probe(path) {
            if err == 0 || err == EAGAIN || err == EINPROGRESS {
                throw SysError("create the \(description) \(path) (another server is listening on it)", errno: EADDRINUSE)
            }
            guard err == ECONNREFUSED else { throw SysError("probe the \(description) \(path)", errno: err) }
        }
        guard unlink(path) == 0 || errno == ENOENT else { throw SysError.last("unlink the stale socket \(path)") }
    }
}
