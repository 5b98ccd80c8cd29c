import Devices
import Testing
import TestSupport

@Suite("16550 UART through the bus harness")
struct Serial16550Tests {
    let console = RecordingConsole()
    let irq = RecordingInterruptLine()
    let uart: Serial16550
    var bus = BusHarness()
    let base: UInt64 = 0x3F8

    init() throws {
        uart = Serial16550(output: console, irq: irq)
        try bus.attach(uart, at: base, size: 8)
    }

    @Test("THR writes reach the console; LSR says the transmitter is empty")
    func transmit() {
        for b in "hi\n".utf8 { bus.write8(base, b) }
        #expect(console.text == "hi\n")
        #expect(bus.read8(base + 5) & 0x60 == 0x60)
        #expect(bus.read8(base + 5) & 0x01 == 0) // no data ready
    }

    @Test("divisor latch is behind DLAB and does not disturb IER/THR")
    func divisorLatch() {
        bus.write8(base + 1, 0x01)          // IER = RDA
        bus.write8(base + 3, 0x80)          // DLAB
        bus.write8(base + 0, 0x01)          // DLL
        bus.write8(base + 1, 0x00)          // DLM
        #expect(bus.read8(base + 0) == 0x01)
        #expect(bus.read8(base + 1) == 0x00)
        bus.write8(base + 3, 0x03)          // 8N1, DLAB off
        #expect(bus.read8(base + 1) == 0x01) // IER kept
        #expect(bus.read8(base + 3) == 0x03)
        #expect(console.output.isEmpty)      // the DLL write was not transmitted
    }

    @Test("scratch register stores a byte")
    func scratch() {
        bus.write8(base + 7, 0xA5)
        #expect(bus.read8(base + 7) == 0xA5)
    }

    @Test("received bytes: LSR.DR, RBR, and an RDA interrupt while enabled")
    func receive() {
        bus.write8(base + 1, 0x01)                  // enable RDA
        #expect(irq.level == false)
        #expect(uart.enqueueInput(Array("ab".utf8)) == 2)
        #expect(irq.level == true)
        #expect(bus.read8(base + 2) & 0x0F == 0x04) // IIR: RDA
        #expect(bus.read8(base + 5) & 0x01 == 0x01)
        #expect(bus.read8(base) == UInt8(ascii: "a"))
        #expect(irq.level == true)
        #expect(bus.read8(base) == UInt8(ascii: "b"))
        #expect(irq.level == false)
        #expect(bus.read8(base + 2) & 0x0F == 0x01) // no interrupt pending
        #expect(bus.read8(base) == 0)               // empty RBR reads 0, no trap
    }

    @Test("THRE interrupt: raised on enable, acknowledged by reading IIR, raised again after a write")
    func thre() {
        bus.write8(base + 1, 0x02)
        #expect(irq.level == true)
        #expect(bus.read8(base + 2) & 0x0F == 0x02)
        #expect(irq.level == false)
        #expect(bus.read8(base + 2) & 0x0F == 0x01)
        bus.write8(base, UInt8(ascii: "x"))
        #expect(irq.level == true)
        bus.write8(base + 1, 0x00)                  // disabling drops the line
        #expect(irq.level == false)
        #expect(irq.history == [true, false, true, false])
    }

    @Test("FIFO control: IIR shows FIFOs enabled, FCR bit 1 clears the receiver")
    func fifo() {
        bus.write8(base + 2, 0x01)
        #expect(bus.read8(base + 2) & 0xC0 == 0xC0)
        uart.enqueueInput([1, 2, 3])
        bus.write8(base + 2, 0x03)
        #expect(bus.read8(base + 5) & 0x01 == 0)
    }

    @Test("loopback mode: MSR mirrors MCR and THR loops to RBR, as 8250 autoconfig expects")
    func loopback() {
        bus.write8(base + 4, 0x1A)                  // LOOP | OUT2 | RTS
        #expect(bus.read8(base + 6) & 0xF0 == 0x90) // DCD | CTS
        bus.write8(base + 4, 0x1F)
        #expect(bus.read8(base + 6) & 0xF0 == 0xF0)
        bus.write8(base, 0x42)
        #expect(console.output.isEmpty)
        #expect(bus.read8(base) == 0x42)
        bus.write8(base + 4, 0x0B)
        #expect(bus.read8(base + 6) == 0xB0)        // a terminal is attached
    }

    @Test("host input is flow-controlled at the capacity")
    func inputCapacity() {
        let many = [UInt8](repeating: 0x41, count: Serial16550.inputCapacity + 10)
        #expect(uart.enqueueInput(many) == Serial16550.inputCapacity)
        #expect(uart.enqueueInput([1]) == 0)
        #expect(bus.read8(base + 5) & 0x02 == 0)    // not an overrun: the host keeps the rest
    }

    @Test("every offset and access size is safe", arguments: [1, 2, 4, 8])
    func anyAccess(size: Int) {
        for offset: UInt64 in 0..<8 {
            bus.write(base + offset, size: size, value: 0xFFFF_FFFF_FFFF_FFFF)
            _ = bus.read(base + offset, size: size)
        }
        #expect(uart.saveState().ier == 0x0F || uart.saveState().lcr & 0x80 != 0)
    }
}

@Suite("i8042 through the bus harness")
struct I8042Tests {
    final class Flag: @unchecked Sendable { var resets = 0 }
    let flag = Flag()
    let irq = RecordingInterruptLine()
    let dev: I8042
    var bus = BusHarness()

    init() throws {
        let f = flag
        dev = I8042(irq: irq) { f.resets += 1 }
        try bus.attach(dev, at: 0x60, size: 5)
    }

    @Test("command 0xFE pulses reset")
    func pulseReset() {
        bus.write8(0x64, 0xFE)
        #expect(flag.resets == 1)
    }

    @Test("0xD1 with bit 0 clear resets; with bit 0 set does not")
    func outputPort() {
        bus.write8(0x64, 0xD1); bus.write8(0x60, 0x01)
        #expect(flag.resets == 0)
        bus.write8(0x64, 0xD1); bus.write8(0x60, 0x00)
        #expect(flag.resets == 1)
    }

    @Test("self test, configuration byte round trip, status OBF")
    func controller() {
        #expect(bus.read8(0x64) & 0x01 == 0)
        bus.write8(0x64, 0xAA)
        #expect(bus.read8(0x64) & 0x01 == 1)
        #expect(bus.read8(0x60) == 0x55)
        bus.write8(0x64, 0x60); bus.write8(0x60, 0x44) // keyboard interrupt off
        bus.write8(0x64, 0x20)
        #expect(bus.read8(0x60) == 0x44)
        #expect(bus.read8(0x64) & 0x01 == 0)
    }

    @Test("keyboard commands are acknowledged, with IRQ 1 while the interrupt is enabled")
    func keyboard() {
        bus.write8(0x64, 0x60); bus.write8(0x60, 0x01) // keyboard interrupt on
        bus.write8(0x60, 0xF2)                          // identify
        #expect(irq.level == true)
        #expect([bus.read8(0x60), bus.read8(0x60), bus.read8(0x60)] == [0xFA, 0xAB, 0x83])
        #expect(irq.level == false)
        #expect(flag.resets == 0)
    }
}

@Suite("CMOS clock")
struct CMOSClockTests {
    @Test("time registers in BCD from the injected clock; no update in progress")
    func time() throws {
        // 2026-11-23 13:45:07 UTC = 1795441507
        let clock = CMOSClock(now: { 1_795_441_507 })
        var bus = BusHarness()
        try bus.attach(clock, at: 0x70, size: 2)
        func reg(_ i: UInt8) -> UInt8 { bus.write8(0x70, i); return bus.read8(0x71) }
        #expect(reg(0x00) == 0x07)
        #expect(reg(0x02) == 0x45)
        #expect(reg(0x04) == 0x13)
        #expect(reg(0x07) == 0x23)
        #expect(reg(0x08) == 0x11)
        #expect(reg(0x09) == 0x26)
        #expect(reg(0x32) == 0x20)
        #expect(reg(0x06) == 0x02) // Monday
        #expect(reg(0x0A) & 0x80 == 0)
        #expect(reg(0x0D) == 0x80)
        bus.write8(0x70, 0x40); bus.write8(0x71, 0x99)
        #expect(reg(0x40) == 0x99)
        bus.write8(0x70, 0x00); bus.write8(0x71, 0x99)
        #expect(reg(0x00) == 0x07) // time is read-only
    }
}
