import Glibc
import Logging
import Synchronization
import VMMSys
import Virtio

/// Why a network backend cannot be used: one line naming the tap.
public struct NetBackendError: Error, CustomStringConvertible, Equatable, Sendable {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// An existing tap device behind virtio-net: frames are read and written whole, without a packet
/// information or virtio-net header (no offloads are offered). Non-blocking both ways: a frame the
/// host cannot take now is dropped, like on a wire.
public final class TapBackend: NetBackend, @unchecked Sendable {
    private let fd: OwnedFD
    public let name: String
    private let logger: Logger
    private let broken = Atomic<Bool>(false)

    /// Attaches to the tap device `name`, which must exist (`ip tuntap add NAME mode tap`).
    public static func attach(name: String, logger: Logger = Logger(label: "swiftvmm.net")) throws(NetBackendError) -> TapBackend {
        do {
            return TapBackend(fd: try OwnedFD.attachTap(name: name), name: name, logger: logger)
        } catch where error.errno == ENODEV {
            throw NetBackendError("there is no tap device \(name) (create one with `ip tuntap add \(name) mode tap`)")
        } catch where error.errno == EMEDIUMTYPE {
            throw NetBackendError("\(name) is a network device but not a tap (create one with `ip tuntap add NAME mode tap`)")
        } catch where error.errno == EINVAL {
            throw NetBackendError("\(name) is not a usable tap device name, or the device is a tun, not a tap")
        } catch where error.errno == EPERM || error.errno == EACCES {
            throw NetBackendError("no permission to attach to the tap device \(name) (its owner, or CAP_NET_ADMIN, may)")
        } catch where error.errno == EBUSY {
            throw NetBackendError("the tap device \(name) is in use by another process")
        } catch {
            throw NetBackendError("cannot attach to the tap device \(name): \(error)")
        }
    }

    /// Takes a descriptor already attached to a tap (`fd=N` from an fd set), made non-blocking.
    public static func adopt(fd: consuming OwnedFD, name: String, logger: Logger = Logger(label: "swiftvmm.net")) throws(NetBackendError) -> TapBackend {
        guard fd.isTap else { throw NetBackendError("\(name) is not a descriptor attached to a tap device") }
        do { try fd.setNonBlocking() } catch { throw NetBackendError("\(name): \(error)") }
        return TapBackend(fd: fd, name: name, logger: logger)
    }

    private init(fd: consuming OwnedFD, name: String, logger: Logger) {
        self.fd = fd
        self.name = name
        self.logger = logger
    }

    public var readinessDescriptor: Int32 { fd.rawValue }

    public var isUsable: Bool { !broken.load(ordering: .relaxed) }

    /// A read error other than "nothing there" (the tap was deleted, EBADFD) ends reception: it is
    /// logged once, and the device stops watching the tap.
    public func receive(into buffer: UnsafeMutableRawBufferPointer) -> Int? {
        guard isUsable else { return nil }
        do { return try fd.readNow(into: buffer) } catch {
            broken.store(true, ordering: .relaxed)
            logger.warning("tap \(name): read failed: \(error); the guest receives nothing more")
            return nil
        }
    }

    public func send(_ frame: UnsafeRawBufferPointer) -> Bool {
        do { return try fd.writeNow(frame) } catch {
            logger.warning("tap \(name): write failed: \(error)")
            return false
        }
    }
}
