import CLinux
import Glibc

/// Sole owner of an open file descriptor; closes it in `deinit`.
///
/// Raw descriptors do not leave VMMSys except through `rawValue`, which callers use only for the
/// duration of a call on this owner's behalf (ioctl wrappers in the KVM module).
public struct OwnedFD: ~Copyable, @unchecked Sendable {
    public let rawValue: Int32

    public init(adopting fd: Int32) {
        precondition(fd >= 0, "OwnedFD requires a valid descriptor")
        rawValue = fd
    }

    /// Opens `path` with `flags` (O_CLOEXEC is always added).
    public static func open(_ path: String, flags: Int32, mode: UInt32 = 0) throws(SysError) -> OwnedFD {
        let fd = try retryingEINTR("open \(path)") { clinux_open(path, flags | O_CLOEXEC, mode) }
        return OwnedFD(adopting: fd)
    }

    deinit { _ = Glibc.close(rawValue) }

    /// ioctl with a pointer argument. EINTR is returned to the caller (as an error) rather than
    /// retried, because KVM_RUN uses it to report a kick.
    public func ioctl(_ request: UInt, _ arg: UnsafeMutableRawPointer?, name: @autoclosure () -> String) throws(SysError) -> Int32 {
        let result = clinux_ioctl_ptr(rawValue, request, arg)
        if result < 0 { throw SysError.last(name()) }
        return result
    }

    /// ioctl with an integer argument.
    public func ioctl(_ request: UInt, value: UInt, name: @autoclosure () -> String) throws(SysError) -> Int32 {
        let result = clinux_ioctl_ulong(rawValue, request, value)
        if result < 0 { throw SysError.last(name()) }
        return result
    }

    /// Reads up to `count` bytes; returns the bytes read (empty at end of file).
    public func read(upTo count: Int) throws(SysError) -> [UInt8] {
        var buffer = [UInt8](repeating: 0, count: count)
        var n = -1
        while n < 0 {
            n = buffer.withUnsafeMutableBytes { Glibc.read(rawValue, $0.baseAddress, $0.count) }
            if n < 0 && Glibc.errno != EINTR { throw SysError.last("read") }
        }
        buffer.removeSubrange(n...)
        return buffer
    }

    /// Reads the whole file from its current offset, refusing files larger than `limit` bytes.
    public func readAll(limit: Int) throws(SysError) -> [UInt8] { try readAllBytes(fd: rawValue, limit: limit) }

    /// Writes all of `bytes`, retrying short writes and EINTR.
    public func writeAll(_ bytes: UnsafeRawBufferPointer) throws(SysError) {
        var offset = 0
        while offset < bytes.count {
            let n = Glibc.write(rawValue, bytes.baseAddress! + offset, bytes.count - offset)
            if n < 0 {
                if Glibc.errno == EINTR { continue }
                throw SysError.last("write")
            }
            offset += n
        }
    }

    /// Returns the file size from fstat.
    public func size() throws(SysError) -> Int {
        var st = stat()
        _ = try retryingEINTR("fstat") { fstat(rawValue, &st) }
        return Int(st.st_size)
    }
}

/// Writes all of `bytes` to a raw descriptor (stdout/stderr, which this process does not own),
/// waiting (poll, not spinning) while a nonblocking descriptor is full; gives up when the descriptor
/// fails (its reader went away: output is dropped, never fatal).
public func writeAll(fd: Int32, _ bytes: UnsafeRawBufferPointer) {
    var offset = 0
    while offset < bytes.count {
        let n = Glibc.write(fd, bytes.baseAddress! + offset, bytes.count - offset)
        if n < 0 {
            if Glibc.errno == EINTR { continue }
            if Glibc.errno == EAGAIN {
                var p = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
                _ = poll(&p, 1, 1000)
                continue
            }
            return
        }
        offset += n
    }
}

/// Writes a string to standard error, unbuffered.
public func printError(_ message: String) {
    var text = message
    if !text.hasSuffix("\n") { text += "\n" }
    text.utf8CString.withUnsafeBytes { raw in
        writeAll(fd: 2, UnsafeRawBufferPointer(rebasing: raw.dropLast()))
    }
}

/// Reads `fd` from its current offset to the end, straight into a buffer of the file's size (a pipe
/// or device reports 0: the buffer grows then), refusing more than `limit` bytes (EFBIG): a regular
/// file from its size, before anything is read.
public func readAllBytes(fd: Int32, limit: Int) throws(SysError) -> [UInt8] {
    var st = stat()
    _ = try retryingEINTR("fstat") { fstat(fd, &st) }
    if st.st_mode & S_IFMT == S_IFREG && Int(st.st_size) > limit {
        throw SysError("read (file of \(st.st_size) bytes, larger than \(limit))", errno: EFBIG)
    }
    var data = [UInt8](repeating: 0, count: min(max(Int(st.st_size), 0), limit) + 1)
    var count = 0
    while true {
        if count == data.count {
            guard data.count <= limit else { throw SysError("read (file larger than \(limit) bytes)", errno: EFBIG) }
            data += [UInt8](repeating: 0, count: max(data.count, 1 << 20))
        }
        let n = data.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress! + count, $0.count - count) }
        if n < 0 && Glibc.errno == EINTR { continue }
        if n < 0 { throw SysError.last("read") }
        if n == 0 { break }
        count += n
    }
    guard count <= limit else { throw SysError("read (file larger than \(limit) bytes)", errno: EFBIG) }
    data.removeLast(data.count - count)
    return data
}

/// A pipe whose ends are both close-on-exec from the start (pipe2 with O_CLOEXEC): no child that
/// another thread starts meanwhile inherits them. Returns nil with errno set on failure.
public func closeOnExecPipe() -> (read: Int32, write: Int32)? {
    var fds: [Int32] = [-1, -1]
    guard clinux_pipe2(&fds, O_CLOEXEC) == 0 else { return nil }
    return (fds[0], fds[1])
}
