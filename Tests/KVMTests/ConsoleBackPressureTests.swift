import Foundation
import Glibc
import Devices
import KVM
import Machine
import Synchronization
import Testing
import TestSupport
import VMMCore
import VMMSys

@Suite("the console writer: a stalled host reader never stops the guest")
struct ConsoleBackPressureTests {
    @Test("bytes reach the descriptor in order; drain waits for them")
    func writesInOrder() throws {
        let pipe = try #require(closeOnExecPipe())
        let fds = [pipe.read, pipe.write]
        let console = try FileDescriptorConsole(fd: fds[1])
        let text = Array((0..<5000).map { UInt8(truncatingIfNeeded: $0 % 251) })
        for chunk in stride(from: 0, to: text.count, by: 7) {
            text[chunk..<min(chunk + 7, text.count)].withUnsafeBytes { console.write($0) }
        }
        console.drain(timeoutMilliseconds: 5000)
        var got = [UInt8](repeating: 0, count: text.count)
        var n = 0
        while n < text.count {
            let r = got.withUnsafeMutableBytes { read(fds[0], $0.baseAddress! + n, text.count - n) }
            try #require(r > 0)
            n += r
        }
        #expect(got == text)
        #expect(console.droppedBytes == 0)
    }

    @Test("a full buffer is not ready, drops what does not fit, and calls back once the reader catches up")
    func fullThenReady() throws {
        let pipe = try #require(closeOnExecPipe())
        let fds = [pipe.read, pipe.write]
        // Not closed: the console's thread outlives the test, and must not write into a descriptor
        // number another test reuses.
        let console = try FileDescriptorConsole(fd: fds[1], capacity: 4096)
        let called = Mutex(0)
        console.onReady { called.withLock { $0 += 1 } }
        let block = [UInt8](repeating: 0x41, count: 1024)
        // The pipe (64 KiB) fills, then the buffer: nobody reads.
        var full = false
        for _ in 0..<500 where !full {
            block.withUnsafeBytes { console.write($0) }
            full = !console.isReady && console.droppedBytes > 0
            if !full { usleep(2_000) }
        }
        #expect(full, "the buffer never filled")
        #expect(console.droppedBytes > 0)
        // The reader catches up: everything waiting is written, the UART is told.
        var sink = [UInt8](repeating: 0, count: 65536)
        let flags = fcntl(fds[0], F_GETFL)
        _ = fcntl(fds[0], F_SETFL, flags | O_NONBLOCK)
        for _ in 0..<200 {
            while sink.withUnsafeMutableBytes({ read(fds[0], $0.baseAddress, $0.count) }) > 0 {}
            if console.isReady && called.withLock({ $0 }) > 0 { break }
            usleep(10_000)
        }
        #expect(console.isReady)
        #expect(called.withLock { $0 } >= 1)
    }

    @Test("a guest printing to a console nobody reads keeps running, and pauses on request",
          .enabled(if: access("/dev/kvm", R_OK | W_OK) == 0, "needs /dev/kvm"))
    func stalledReader() throws {
        let pipe = try #require(closeOnExecPipe())
        let fds = [pipe.read, pipe.write]
        // loop: inc qword [0x200000]; mov dx, 0x3f8; mov al, 'x'; out dx, al; jmp loop
        let code: [UInt8] = [0x48, 0xFF, 0x04, 0x25, 0x00, 0x00, 0x20, 0x00,
                             0x66, 0xBA, 0xF8, 0x03, 0xB0, 0x78, 0xEE, 0xEB, 0xEF]
        let m = try Machine(MachineConfig(memorySize: 16 << 20, console: try FileDescriptorConsole(fd: fds[1])),
                            boot: .program64(code: code, loadAddress: 0x100000))
        let wait = SnapshotGuestTests.start(m)
        func counter() throws -> UInt64 { try m.memory.read(UInt64.self, at: GuestAddress(0x200000)) }
        // Far more than the pipe and the console buffer hold (64 KiB each).
        var waited = 0
        while try counter() < 150_000 && waited < 600 { usleep(100_000); waited += 1 }
        let first = try counter()
        usleep(300_000)
        let second = try counter()
        #expect(first >= 150_000, "the guest stopped after \(first) bytes (pipe and console buffer hold 128 KiB)")
        #expect(second > first, "the guest stopped running")
        if second <= first {
            // A vCPU stuck writing to the pipe: read it from now on so that the test ends (failed)
            // instead of hanging in pause().
            let readEnd = fds[0]
            _ = try OSThread(name: "test-drain", role: .io) {
                var sink = [UInt8](repeating: 0, count: 65536)
                while sink.withUnsafeMutableBytes({ read(readEnd, $0.baseAddress, $0.count) }) > 0 {}
            }
        }
        let start = monotonicMilliseconds()
        m.pause()
        #expect(monotonicMilliseconds() - start < 2000, "pause waited for the console")
        #expect(m.isPaused)
        m.requestExit(.quit("test"))
        #expect(wait() == .quit("test"))
    }
}
