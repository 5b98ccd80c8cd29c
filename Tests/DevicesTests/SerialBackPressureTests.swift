import Devices
import Synchronization
import Testing
import TestSupport
import VMMCore

/// A console whose readiness the test sets, and which remembers the UART's ready callback.
final class GatedConsole: ConsoleOutput, @unchecked Sendable {
    let ready = Mutex(true)
    let bytes = Mutex<[UInt8]>([])
    let callback = Mutex<(@Sendable () -> Void)?>(nil)
    func write(_ b: UnsafeRawBufferPointer) { bytes.withLock { $0 += b } }
    var isReady: Bool { ready.withLock { $0 } }
    func onReady(_ f: @escaping @Sendable () -> Void) { callback.withLock { $0 = f } }
    /// The host reader caught up.
    func becomeReady() {
        ready.withLock { $0 = true }
        callback.withLock { $0 }?()
    }
}

@Suite("16550 UART: back-pressure from a slow console")
struct SerialBackPressureTests {
    @Test("while the console is not ready the transmitter is busy: LSR THRE/TEMT clear, no THRE interrupt until it is ready again")
    func busyWhileNotReady() throws {
        let console = GatedConsole()
        let irq = RecordingInterruptLine()
        let uart = Serial16550(output: console, irq: irq)
        var bus = BusHarness()
        try bus.attach(uart, at: 0x3F8, size: 8)
        bus.write8(0x3F9, 0x02)                     // IER: THRE interrupt
        #expect(irq.level == true)                  // THR empty: interrupt
        #expect(bus.read8(0x3FA) & 0x0F == 0x02)    // IIR: THRE (reading acknowledges it)
        #expect(irq.level == false)
        console.ready.withLock { $0 = false }       // the next byte fills the console
        bus.write8(0x3F8, UInt8(ascii: "a"))
        #expect(console.bytes.withLock { $0 } == [UInt8(ascii: "a")])
        #expect(bus.read8(0x3FD) & 0x60 == 0, "LSR reports the transmitter busy")
        #expect(irq.level == false, "no THRE interrupt while the console is full")
        #expect(bus.read8(0x3FA) & 0x0F == 0x01)    // IIR: nothing pending
        console.becomeReady()
        #expect(irq.level == true, "THRE interrupt once the console has room")
        #expect(bus.read8(0x3FD) & 0x60 == 0x60)
    }

    @Test("enabling the THRE interrupt while the console is full raises it only when it is ready")
    func enableWhileFull() throws {
        let console = GatedConsole()
        console.ready.withLock { $0 = false }
        let irq = RecordingInterruptLine()
        let uart = Serial16550(output: console, irq: irq)
        var bus = BusHarness()
        try bus.attach(uart, at: 0x3F8, size: 8)
        bus.write8(0x3F9, 0x02)
        #expect(irq.level == false)
        console.becomeReady()
        #expect(irq.level == true)
    }
}
