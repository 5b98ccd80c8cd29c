import Synchronization
import Testing
import TestSupport
import VMMCore
import Virtio
import WireFormat

/// A network backend with frames queued by the test and the frames the guest sent.
final class QueueNet: NetBackend {
    let name = "fake0"
    let readinessDescriptor: Int32 = -1
    private let state = Mutex<(incoming: [[UInt8]], sent: [[UInt8]])>(([], []))
    func deliver(_ frame: [UInt8]) { state.withLock { $0.incoming.append(frame) } }
    var sent: [[UInt8]] { state.withLock { $0.sent } }
    var waiting: Int { state.withLock { $0.incoming.count } }
    func receive(into buffer: UnsafeMutableRawBufferPointer) -> Int? {
        state.withLock { s in
            guard !s.incoming.isEmpty else { return nil }
            let frame = s.incoming.removeFirst()
            let n = min(frame.count, buffer.count)
            buffer.copyBytes(from: frame.prefix(n))
            return n
        }
    }
    func send(_ frame: UnsafeRawBufferPointer) -> Bool {
        state.withLock { $0.sent.append(Array(frame)) }
        return true
    }
}

let testMAC: [UInt8] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56]

func netDriver(_ backend: QueueNet) throws -> (VirtioDriver, VirtioNet) {
    let model = VirtioNet(backend: backend, mac: testMAC)
    let driver = try VirtioDriver.make(model)
    #expect(driver.initialize())
    return (driver, model)
}

@Suite("virtio-net")
struct NetTests {
    @Test("offers its MAC and link status, VERSION_1, and no offloads; the config space holds the MAC and LINK_UP")
    func features() throws {
        let (d, _) = try netDriver(QueueNet())
        let offered = d.deviceFeatureBits()
        #expect(offered & (1 << 5) != 0 && offered & (1 << 16) != 0 && offered & (1 << 32) != 0)
        // CSUM, GUEST_CSUM, GUEST_TSO4/6, GUEST_UFO, HOST_TSO4/6, HOST_UFO, MRG_RXBUF: none.
        for bit in [0, 1, 7, 8, 10, 11, 12, 14, 15] as [UInt64] { #expect(offered & (1 << bit) == 0, "bit \(bit)") }
        #expect((0..<6).map { UInt8(d.config(UInt64($0), size: 1)) } == testMAC)
        #expect(d.config(6, size: 2) == 1)
    }

    @Test("a transmitted chain reaches the backend as the frame after the 12-byte header, however it is split")
    func transmit() throws {
        let net = QueueNet()
        let (d, model) = try netDriver(net)
        let frame = (0..<100).map { UInt8($0) }
        let header = d.put([UInt8](repeating: 0, count: 12))
        let first = d.put(Array(frame.prefix(30))), rest = d.put(Array(frame.dropFirst(30)))
        #expect(d.request([.readable(header, 8), .readable(header + 8, 4), .readable(first, 30), .readable(rest, 70)], queue: 1) == [Used(id: 0, length: 0)])
        #expect(net.sent == [frame])
        // A chain shorter than the header is dropped, not sent.
        #expect(d.request([.readable(header, 10)], queue: 1).map(\.length) == [0])
        #expect(net.sent.count == 1)
        #expect(model.counters.dropped == 1)
    }

    @Test("a received frame lands after a header with num_buffers 1; one too large for the buffer is dropped; a frame waits for a buffer")
    func receive() throws {
        let net = QueueNet()
        let (d, model) = try netDriver(net)
        let frame = (0..<64).map { UInt8(255 - $0) }
        net.deliver(frame)
        let buffer = d.allocate(1526)
        #expect(d.request([.writable(buffer, 1526)], queue: 0) == [Used(id: 0, length: 76)])
        var header = [UInt8](repeating: 0, count: 12)
        header[10] = 1
        #expect(d.bytes(at: buffer, count: 12) == header)
        #expect(d.bytes(at: buffer + 12, count: 64) == frame)

        // Too large for the guest's buffer: dropped, the buffer comes back empty.
        net.deliver([UInt8](repeating: 1, count: 200))
        let small = d.allocate(100)
        #expect(d.request([.writable(small, 100)], queue: 0) == [Used(id: 0, length: 0)])
        #expect(model.counters.dropped == 1)

        // No buffer: the frame waits in the device, then goes into the next buffer posted.
        net.deliver([9, 9, 9])
        d.process(queue: 0)
        #expect(model.holdsFrame)
        #expect(d.request([.writable(buffer, 1526)], queue: 0).map(\.length) == [15])
        #expect(!model.holdsFrame)
        #expect(d.bytes(at: buffer + 12, count: 3) == [9, 9, 9])
    }

    @Test("the link goes down and up: the status bit, a new config generation and a config interrupt; frames are dropped while down")
    func link() throws {
        let net = QueueNet()
        let (d, model) = try netDriver(net)
        let generation = d.read32(0x0FC)
        d.recorder?.clear()
        #expect(model.setLink(up: false))
        d.device.configChanged()
        #expect(d.config(6, size: 2) == 0)
        #expect(d.read32(0x0FC) != generation)
        #expect(d.interruptStatus & 2 != 0)
        #expect((d.recorder?.interrupts ?? 0) >= 1)
        let header = d.put([UInt8](repeating: 0, count: 12)), payload = d.put([1, 2, 3])
        #expect(d.request([.readable(header, 12), .readable(payload, 3)], queue: 1).map(\.length) == [0])
        #expect(net.sent.isEmpty)
        net.deliver([5, 5])
        d.process(queue: 0)
        #expect(!model.holdsFrame && net.waiting == 0)
        #expect(!model.setLink(up: false), "no change")
        #expect(model.setLink(up: true))
        #expect(d.config(6, size: 2) == 1)
    }

    @Test("a restored device takes the MAC address and link status the guest knew")
    func restoreKeepsMAC() throws {
        let (d, model) = try netDriver(QueueNet())
        _ = model.setLink(up: false)
        let saved = d.device.saveSnapshot()
        let other = VirtioNet(backend: QueueNet(), mac: [0x52, 0x54, 0, 9, 9, 9])
        let d2 = try VirtioDriver.make(other)
        try d2.device.restoreSnapshot(saved, version: VirtioMMIO.snapshotVersion)
        #expect(other.mac == testMAC)
        #expect(!other.linkUp)
        #expect(d2.device.saveSnapshot() == saved)
    }
}

/// A console that records what it was given.
final class Recording: ConsoleOutput {
    let bytes = Mutex<[UInt8]>([])
    func write(_ data: UnsafeRawBufferPointer) { bytes.withLock { $0 += data } }
}

@Suite("virtio-console")
struct ConsoleTests {
    @Test("the guest's output reaches the console; input waits for a receive buffer, and empty receive buffers stay with the device")
    func bothWays() throws {
        let out = Recording()
        let model = VirtioConsole(output: out)
        let d = try VirtioDriver.make(model)
        #expect(d.initialize())
        let text = Array("hello hvc0\n".utf8)
        let a = d.put(Array(text.prefix(5))), b = d.put(Array(text.dropFirst(5)))
        #expect(d.request([.readable(a, 5), .readable(b, UInt32(text.count - 5))], queue: 1) == [Used(id: 0, length: 0)])
        #expect(out.bytes.withLock { $0 } == text)

        // A receive buffer without input: not used.
        let rx = d.allocate(8)
        #expect(d.request([.writable(rx, 8)], queue: 0).isEmpty)
        // Input: the device's thread is woken for queue 0, and the waiting buffer takes it.
        model.onInput { [device = d.device] in device.kick(queue: 0) }
        d.recorder?.clear()
        #expect(model.enqueueInput(Array("ls -l /\n".utf8) + Array("more".utf8)) == 12)
        #expect(d.recorder?.notified == [0])
        d.process(queue: 0)
        #expect(d.collectUsed(queue: 0) == [Used(id: 0, length: 8)])
        #expect(d.bytes(at: rx, count: 8) == Array("ls -l /\n".utf8))
        #expect(model.hasWork(queue: 0), "4 bytes still wait")
        #expect(d.request([.writable(rx, 8)], queue: 0).map(\.length) == [4])
        #expect(d.bytes(at: rx, count: 4) == Array("more".utf8))
        #expect(!model.hasWork(queue: 0))
    }

    @Test("input is bounded: what does not fit is refused (the caller retries), a reset drops what waits")
    func bounded() throws {
        let model = VirtioConsole(output: Recording())
        #expect(model.enqueueInput([UInt8](repeating: 0x41, count: 70 << 10)) == VirtioConsole.inputLimit)
        #expect(model.enqueueInput([0x42]) == 0)
        model.reset()
        #expect(!model.hasWork(queue: 0))
        #expect(model.enqueueInput([0x42]) == 1)
    }
}
