import Glibc

/// A failed system call: which operation, and the errno it returned.
public struct SysError: Error, CustomStringConvertible, Equatable, Sendable {
    public let operation: String
    public let errno: Int32

    public init(_ operation: String, errno: Int32) {
        self.operation = operation
        self.errno = errno
    }

    public var description: String {
        "\(operation) failed: \(String(cString: strerror(errno))) (errno \(errno))"
    }

    /// Builds an error from the calling thread's current errno.
    public static func last(_ operation: String) -> SysError {
        SysError(operation, errno: Glibc.errno)
    }
}

/// Runs a system call, retrying on EINTR, and throws `SysError` for a negative result.
@inline(__always)
public func retryingEINTR(_ operation: @autoclosure () -> String, _ body: () -> Int32) throws(SysError) -> Int32 {
    while true {
        let result = body()
        if result >= 0 { return result }
        let code = Glibc.errno
        if code == EINTR { continue }
        throw SysError(operation(), errno: code)
    }
}
