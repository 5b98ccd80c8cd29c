import Glibc
import Testing
import VMMSys

@Suite("VMMSys socket pairs, exact reads and whole sends")
struct UnixStreamPairTests {
    @Test("a pair: close-on-exec ends, the local one nonblocking and the remote one blocking; closingRemote ends the remote")
    func pair() throws {
        let pair = try UnixStream.pair()
        #expect(fcntl(pair.local.fd.rawValue, F_GETFD) & FD_CLOEXEC != 0)
        #expect(fcntl(pair.remote.fd.rawValue, F_GETFD) & FD_CLOEXEC != 0)
        #expect(try descriptorStatusFlags(pair.local.fd.rawValue) & O_NONBLOCK != 0)
        #expect(try descriptorStatusFlags(pair.remote.fd.rawValue) & O_NONBLOCK == 0)
        let remoteFD = pair.remote.fd.rawValue
        let local = pair.closingRemote()
        #expect(fcntl(remoteFD, F_GETFD) < 0 || remoteFD == local.fd.rawValue)
        var buffer = [UInt8](repeating: 0, count: 4)
        #expect(try buffer.withUnsafeMutableBytes { try local.receiveExactly(into: $0, timeoutMilliseconds: 1000) } == .endOfStream(received: 0))
    }

    @Test("receiveExactly fills the buffer and leaves what follows; reports a timeout and the end with the count")
    func receiveExactly() throws {
        let pair = try UnixStream.pair()
        let twelve = Array(UInt8(1)...12)
        #expect(try twelve.withUnsafeBytes { try pair.remote.sendAll($0, timeoutMilliseconds: 1000) })
        var ten = [UInt8](repeating: 0, count: 10)
        #expect(try ten.withUnsafeMutableBytes { try pair.local.receiveExactly(into: $0, timeoutMilliseconds: 1000) } == .complete)
        #expect(ten == Array(twelve.prefix(10)))
        // Two bytes are left; four are asked for: the time runs out with two.
        var four = [UInt8](repeating: 0, count: 4)
        let start = monotonicMilliseconds()
        #expect(try four.withUnsafeMutableBytes { try pair.local.receiveExactly(into: $0, timeoutMilliseconds: 100) } == .timedOut(received: 2))
        #expect(monotonicMilliseconds() - start >= 90)
        #expect(four.prefix(2) == [11, 12])
        // Bytes that come while it waits complete the buffer.
        let remoteFD = pair.remote.fd.rawValue
        let writer = try OSThread(name: "test-writer", role: .io) {
            usleep(50_000)
            _ = [UInt8](repeating: 7, count: 4).withUnsafeBytes { write(remoteFD, $0.baseAddress, 4) }
        }
        #expect(try four.withUnsafeMutableBytes { try pair.local.receiveExactly(into: $0, timeoutMilliseconds: 5000) } == .complete)
        writer.join()
        #expect(four == [7, 7, 7, 7])
        // With nothing more to come, the end of the stream comes with the count.
        try pair.remote.shutdown(.writing)
        #expect(try four.withUnsafeMutableBytes { try pair.local.receiveExactly(into: $0, timeoutMilliseconds: 5000) } == .endOfStream(received: 0))
    }

    @Test("sendAll passes descriptors with the first part, waits for room, gives up at the timeout, throws EPIPE when the peer is gone")
    func sendAll() throws {
        let pair = try UnixStream.pair()
        let passed = try OwnedFD.open("/dev/null", flags: O_RDONLY)
        let big = [UInt8](repeating: 0x5A, count: 1 << 20)
        // A reader drains 1 MiB on another thread while sendAll waits for room.
        let remoteFD = pair.remote.fd.rawValue
        final class Count: @unchecked Sendable { var bytes = 0; var descriptors: [Int32] = [] }
        let count = Count()
        let reader = try OSThread(name: "test-reader", role: .io) {
            var buffer = [UInt8](repeating: 0, count: 65536)
            while count.bytes < 1 << 20 {
                var fds: [Int32] = [-1]
                var nfds: Int32 = 0
                let n = buffer.withUnsafeMutableBytes { raw in
                    fds.withUnsafeMutableBufferPointer { recvFDs(remoteFD, raw, $0.baseAddress!, &nfds) }
                }
                if n <= 0 { break }
                count.bytes += n
                count.descriptors += fds.prefix(Int(nfds))
            }
        }
        #expect(try big.withUnsafeBytes { try pair.local.sendAll($0, passing: [passed.rawValue], timeoutMilliseconds: 10_000) })
        reader.join()
        #expect(count.bytes == 1 << 20 && count.descriptors.count == 1)
        closeDescriptors(count.descriptors)

        // Nobody reads: the buffer fills and the time runs out.
        let start = monotonicMilliseconds()
        #expect(try big.withUnsafeBytes { try pair.local.sendAll($0, timeoutMilliseconds: 100) } == false)
        #expect(monotonicMilliseconds() - start >= 90)

        // The peer is gone: EPIPE, no SIGPIPE.
        let lone = pair.closingRemote()
        #expect(throws: SysError("send", errno: EPIPE)) {
            _ = try [UInt8](repeating: 1, count: 8).withUnsafeBytes { try lone.sendAll($0, timeoutMilliseconds: 100) }
        }
    }
}

/// recvmsg with room for one descriptor (the test's reader runs on a blocking socket).
private func recvFDs(_ fd: Int32, _ buffer: UnsafeMutableRawBufferPointer, _ fds: UnsafeMutablePointer<Int32>, _ nfds: inout Int32) -> Int {
    var iov = iovec(iov_base: buffer.baseAddress, iov_len: buffer.count)
    let space = 64
    let control = UnsafeMutableRawPointer.allocate(byteCount: space, alignment: 8)
    defer { control.deallocate() }
    var message = msghdr()
    return withUnsafeMutablePointer(to: &iov) { iovPointer in
        message.msg_iov = iovPointer
        message.msg_iovlen = 1
        message.msg_control = control
        message.msg_controllen = space
        let n = recvmsg(fd, &message, 0)
        nfds = 0
        if n > 0, message.msg_controllen >= MemoryLayout<cmsghdr>.size {
            let header = control.load(as: cmsghdr.self)
            if header.cmsg_level == SOL_SOCKET && header.cmsg_type == Int32(SCM_RIGHTS) {
                fds.pointee = control.load(fromByteOffset: MemoryLayout<cmsghdr>.size, as: Int32.self)
                nfds = 1
            }
        }
        return n
    }
}
