import Devices
import FuzzEntries
import Synchronization
import Testing
import TestSupport
import VMMCore
import WireFormat

/// The rules every snapshot payload follows, checked against a device made by `make`:
/// every truncation throws and changes nothing; trailing bytes are rejected at the current version
/// and ignored at a newer one; versions older than the oldest are rejected.
func checkPayloadRules<D: SnapshotDevice>(_ payload: [UInt8], sourceLocation: SourceLocation = #_sourceLocation,
                                          make: () -> D) {
    let current = D.snapshotVersion
    let target = make()
    let pristine = target.saveSnapshot()
    for n in 0..<payload.count {
        #expect(throws: LEDecodeError.self, "prefix of \(n) bytes", sourceLocation: sourceLocation) {
            try target.restoreSnapshot(Array(payload.prefix(n)), version: current)
        }
    }
    #expect(target.saveSnapshot() == pristine, "a rejected prefix changed the device", sourceLocation: sourceLocation)

    let extra = payload + [0xDE, 0xAD, 0xBE]
    #expect(throws: LEDecodeError.invalid(
        field: D.snapshotName, reason: "3 unexpected bytes after the last field of a version-\(current) payload"),
            sourceLocation: sourceLocation) {
        try target.restoreSnapshot(extra, version: current)
    }
    #expect(target.saveSnapshot() == pristine, sourceLocation: sourceLocation)
    #expect(throws: LEDecodeError.self, sourceLocation: sourceLocation) {
        try target.restoreSnapshot(payload, version: D.oldestSnapshotVersion - 1)
    }

    // A newer build appended fields: this build reads what it knows and ignores the rest.
    let newer = make()
    #expect(throws: Never.self, sourceLocation: sourceLocation) { try newer.restoreSnapshot(extra, version: current + 1) }
    #expect(newer.saveSnapshot() == payload, sourceLocation: sourceLocation)
}

/// Restores `payload` into a fresh device and expects identical bytes back.
@discardableResult
func roundTrip<D: SnapshotDevice>(_ payload: [UInt8], sourceLocation: SourceLocation = #_sourceLocation,
                                  into make: () -> D) throws -> D {
    let device = make()
    try device.restoreSnapshot(payload, version: D.snapshotVersion)
    #expect(device.saveSnapshot() == payload, "save → restore → save", sourceLocation: sourceLocation)
    // What the machine does once the interrupt controller is restored: lines are driven again.
    (device as? any PlatformDevice)?.afterRestore()
    return device
}

/// `payload` with the bytes at `offset` replaced.
func patched(_ payload: [UInt8], at offset: Int, _ bytes: [UInt8]) -> [UInt8] {
    var p = payload
    p.replaceSubrange(offset..<offset + bytes.count, with: bytes)
    return p
}

func le32(_ v: UInt32) -> [UInt8] { (0..<4).map { UInt8(truncatingIfNeeded: v >> (8 * $0)) } }

// MARK: - 16550

@Suite("Device snapshots: 16550 UART")
struct SerialSnapshotTests {
    let base: UInt64 = 0x3F8

    func make(_ irq: RecordingInterruptLine = RecordingInterruptLine()) -> Serial16550 {
        Serial16550(output: RecordingConsole(), irq: irq)
    }

    func attach(_ uart: Serial16550) throws -> BusHarness {
        var bus = BusHarness()
        try bus.attach(uart, at: base, size: 8)
        return bus
    }

    /// DLAB divisor 0x0102, 8N1, FIFOs on, MCR DTR|RTS|OUT2, scratch, RDA+RLS enabled, "hello" received.
    func busyUART(_ irq: RecordingInterruptLine = RecordingInterruptLine()) throws -> (Serial16550, BusHarness) {
        let uart = make(irq)
        let bus = try attach(uart)
        bus.write8(base + 3, 0x83)
        bus.write8(base + 0, 0x02)
        bus.write8(base + 1, 0x01)
        bus.write8(base + 3, 0x03)
        bus.write8(base + 2, 0x01)
        bus.write8(base + 4, 0x0B)
        bus.write8(base + 7, 0x5A)
        bus.write8(base + 1, 0x05)
        uart.enqueueInput(Array("hello".utf8))
        return (uart, bus)
    }

    @Test("payload layout, round trip, and the restored UART reads the same registers and bytes")
    func roundTripBehaves() throws {
        let (uart, bus) = try busyUART()
        let payload = uart.saveSnapshot()
        #expect(payload == [0x05, 0x03, 0x0B, 0x5A, 0x02, 0x01, 1, 0, 0, 5, 0, 0, 0] + Array("hello".utf8))

        let irq = RecordingInterruptLine()
        let restored = try roundTrip(payload) { make(irq) }
        #expect(irq.history == [true]) // RDA is enabled and bytes are waiting
        let other = try attach(restored)
        for offset: UInt64 in [1, 2, 3, 4, 5, 6, 7] {
            #expect(other.read8(base + offset) == bus.read8(base + offset), "register \(offset)")
        }
        var received: [UInt8] = []
        while other.read8(base + 5) & 0x01 != 0 { received.append(other.read8(base)) }
        #expect(received == Array("hello".utf8))
        #expect(irq.level == false)
        #expect(other.read8(base + 2) == 0xC1) // FIFOs on, nothing pending
        other.write8(base + 3, 0x83)
        #expect(other.read8(base) == 0x02 && other.read8(base + 1) == 0x01) // the divisor latch
    }

    @Test("restore drives the line from IER/IIR state: THRE pending, overrun, and quiet")
    func interruptLevels() throws {
        // THRE: enabling it raises the interrupt; it survives until IIR is read.
        let irq1 = RecordingInterruptLine()
        let thre = make()
        try attach(thre).write8(base + 1, 0x02)
        let restored = try roundTrip(thre.saveSnapshot()) { make(irq1) }
        #expect(irq1.history == [true])
        let bus = try attach(restored)
        #expect(bus.read8(base + 2) & 0x0F == 0x02)
        #expect(irq1.history == [true, false])

        // An overrun with RLS enabled reports as the highest-priority interrupt.
        var s = Serial16550.State()
        s.ier = 0x04
        s.overrun = true
        let irq2 = RecordingInterruptLine()
        let lsr = make(irq2)
        try lsr.restoreState(s)
        #expect(irq2.history.isEmpty, "a restore leaves the line alone until afterRestore")
        lsr.afterRestore()
        #expect(irq2.history == [true])
        let lsrBus = try attach(lsr)
        #expect(lsrBus.read8(base + 2) & 0x0F == 0x06)
        #expect(lsrBus.read8(base + 5) & 0x02 == 0x02)
        #expect(irq2.level == false)

        // Nothing pending: the line is driven low even though it already was, for the irqchip's sake.
        let irq3 = RecordingInterruptLine()
        try roundTrip(make().saveSnapshot()) { make(irq3) }
        #expect(irq3.history == [false])

        // A restore over a device that holds the line high lowers it.
        let (busy, _) = try busyUART(irq3)
        #expect(irq3.level == true)
        try busy.restoreSnapshot(make().saveSnapshot(), version: Serial16550.snapshotVersion)
        busy.afterRestore()
        #expect(irq3.level == false)
    }

    @Test("truncations, trailing bytes, versions")
    func payloadRules() throws {
        checkPayloadRules(try busyUART().0.saveSnapshot()) { make() }
        checkPayloadRules(make().saveSnapshot()) { make() }
    }

    @Test("invalid fields are rejected by name and change nothing")
    func invalidFields() throws {
        let payload = try busyUART().0.saveSnapshot()
        let irq = RecordingInterruptLine()
        let target = make(irq)
        let pristine = target.saveSnapshot()
        let v = Serial16550.snapshotVersion
        #expect(throws: LEDecodeError.invalid(field: "serial.ier", reason: "0x15 has bits 4-7 set, which always read 0")) {
            try target.restoreSnapshot(patched(payload, at: 0, [0x15]), version: v)
        }
        #expect(throws: LEDecodeError.invalid(field: "serial.mcr", reason: "0x2b has bits 5-7 set, which always read 0")) {
            try target.restoreSnapshot(patched(payload, at: 2, [0x2B]), version: v)
        }
        #expect(throws: LEDecodeError.invalid(field: "serial.fifo enabled", reason: "2 is not a boolean (0 or 1)")) {
            try target.restoreSnapshot(patched(payload, at: 6, [2]), version: v)
        }
        #expect(throws: LEDecodeError.invalid(field: "serial.fifo count", reason: "4097 is over the limit of 4096")) {
            try target.restoreSnapshot(patched(payload, at: 9, le32(4097)) + [UInt8](repeating: 0, count: 4097), version: v)
        }
        #expect(throws: LEDecodeError.truncated(field: "serial.fifo count", needed: 6, available: 5)) {
            try target.restoreSnapshot(patched(payload, at: 9, le32(6)), version: v)
        }
        #expect(throws: LEDecodeError.self) {
            var s = Serial16550.State()
            s.rx = [UInt8](repeating: 0, count: Serial16550.inputCapacity + 1)
            try target.restoreState(s)
        }
        #expect(target.saveSnapshot() == pristine)
        #expect(irq.history.isEmpty)
    }

    @Test("a full FIFO (the capacity) round-trips")
    func fullFIFO() throws {
        let uart = make()
        #expect(uart.enqueueInput((0..<5000).map { UInt8(truncatingIfNeeded: $0) }) == Serial16550.inputCapacity)
        try roundTrip(uart.saveSnapshot()) { make() }
    }
}

// MARK: - i8042

@Suite("Device snapshots: i8042")
struct I8042SnapshotTests {
    final class Resets: Sendable {
        let count = Mutex(0)
        var value: Int { count.withLock { $0 } }
    }

    func make(_ irq: RecordingInterruptLine = RecordingInterruptLine(), resets: Resets = Resets()) -> I8042 {
        I8042(irq: irq) { resets.count.withLock { $0 += 1 } }
    }

    func attach(_ dev: I8042) throws -> BusHarness {
        var bus = BusHarness()
        try bus.attach(dev, at: 0x60, size: 5)
        return bus
    }

    /// Self test (0x55), keyboard identify (FA AB 83), then "write output port" waiting for its byte.
    func busy(_ irq: RecordingInterruptLine = RecordingInterruptLine()) throws -> I8042 {
        let dev = make(irq)
        let bus = try attach(dev)
        bus.write8(0x64, 0xAA)
        bus.write8(0x60, 0xF2)
        bus.write8(0x64, 0xD1)
        return dev
    }

    @Test("golden payload: config, pending command, output count, output bytes")
    func golden() throws {
        #expect(try busy().saveSnapshot() == [0x45, 0xD1, 0x04, 0x00, 0x00, 0x00, 0x55, 0xFA, 0xAB, 0x83])
        #expect(make().saveSnapshot() == [0x45, 0x00, 0x00, 0x00, 0x00, 0x00])
    }

    @Test("round trip: output bytes in order, the pending 0xD1 still resets, IRQ level from the status")
    func roundTripBehaves() throws {
        let irq = RecordingInterruptLine()
        let resets = Resets()
        let restored = try roundTrip(try busy().saveSnapshot()) { make(irq, resets: resets) }
        #expect(irq.history == [true])
        let bus = try attach(restored)
        #expect(bus.read8(0x64) & 0x01 == 0x01)
        #expect((0..<4).map { _ in bus.read8(0x60) } == [0x55, 0xFA, 0xAB, 0x83])
        #expect(irq.level == false)
        #expect(bus.read8(0x64) & 0x01 == 0)
        bus.write8(0x60, 0x00) // the data byte of the pending "write output port": bit 0 low resets
        #expect(resets.value == 1)

        // With the keyboard interrupt disabled in the configuration byte, waiting output keeps it low.
        var s = I8042.State()
        s.config = 0x44
        s.output = [0xFA]
        let quiet = RecordingInterruptLine()
        let controller = make(quiet)
        try controller.restoreState(s)
        controller.afterRestore()
        #expect(quiet.history == [false])
    }

    @Test("truncations, trailing bytes, versions")
    func payloadRules() throws {
        checkPayloadRules(try busy().saveSnapshot()) { make() }
    }

    @Test("invalid fields are rejected by name and change nothing")
    func invalidFields() throws {
        let payload = try busy().saveSnapshot()
        let irq = RecordingInterruptLine()
        let target = make(irq)
        let pristine = target.saveSnapshot()
        let v = I8042.snapshotVersion
        #expect(throws: LEDecodeError.invalid(field: "i8042.pending command", reason: "0x20 takes no data byte (only 0x60 and 0xD1 do)")) {
            try target.restoreSnapshot(patched(payload, at: 1, [0x20]), version: v)
        }
        #expect(throws: LEDecodeError.invalid(field: "i8042.output count", reason: "17 is over the limit of 16")) {
            try target.restoreSnapshot(patched(payload, at: 2, le32(17)) + [UInt8](repeating: 0xFA, count: 13), version: v)
        }
        #expect(target.saveSnapshot() == pristine)
        #expect(irq.history.isEmpty)
    }

    @Test("controller commands cannot grow the output buffer past its capacity")
    func outputCapacity() throws {
        let dev = make()
        let bus = try attach(dev)
        for _ in 0..<40 { bus.write8(0x64, 0xAA) }
        #expect(dev.saveState().output.count == I8042.outputCapacity)
        try roundTrip(dev.saveSnapshot()) { make() }
    }
}

// MARK: - CMOS

@Suite("Device snapshots: CMOS")
struct CMOSSnapshotTests {
    func make() -> CMOSClock { CMOSClock(now: { 1_700_000_000 }) }

    func attach(_ dev: CMOSClock) throws -> BusHarness {
        var bus = BusHarness()
        try bus.attach(dev, at: 0x70, size: 2)
        return bus
    }

    func busy() throws -> CMOSClock {
        let dev = make()
        let bus = try attach(dev)
        for (index, value) in [(0x0E, 0x33), (0x10, 0xAB), (0x7F, 0x01), (0x32, 0x99), (0x00, 0x42)] as [(UInt8, UInt8)] {
            bus.write8(0x70, index)
            bus.write8(0x71, value)
        }
        bus.write8(0x70, 0x8F) // select 0x0F with the NMI mask bit
        return dev
    }

    @Test("golden payload: the index, then the 128 RAM bytes; the restored RAM reads back")
    func roundTripBehaves() throws {
        let payload = try busy().saveSnapshot()
        var expected = [UInt8](repeating: 0, count: 129)
        expected[0] = 0x0F
        expected[1 + 0x0E] = 0x33
        expected[1 + 0x10] = 0xAB
        expected[1 + 0x7F] = 0x01
        #expect(payload == expected)
        let bus = try attach(try roundTrip(payload) { make() })
        #expect(bus.read8(0x70) == 0x0F)
        bus.write8(0x70, 0x10)
        #expect(bus.read8(0x71) == 0xAB)
        bus.write8(0x70, 0x32)
        #expect(bus.read8(0x71) == 0x20) // the century still comes from the clock
    }

    @Test("truncations, trailing bytes, versions")
    func payloadRules() throws {
        checkPayloadRules(try busy().saveSnapshot()) { make() }
    }

    @Test("invalid fields are rejected by name and change nothing")
    func invalidFields() throws {
        let payload = try busy().saveSnapshot()
        let target = make()
        let pristine = target.saveSnapshot()
        let v = CMOSClock.snapshotVersion
        #expect(throws: LEDecodeError.invalid(field: "cmos.index", reason: "0x80 is past the 128 registers")) {
            try target.restoreSnapshot(patched(payload, at: 0, [0x80]), version: v)
        }
        #expect(throws: LEDecodeError.invalid(field: "cmos.ram", reason: "byte 0x32 is a clock register, which is never stored, but holds 0x19")) {
            try target.restoreSnapshot(patched(payload, at: 1 + 0x32, [0x19]), version: v)
        }
        #expect(throws: LEDecodeError.self) {
            try target.restoreSnapshot(patched(payload, at: 1, [1]), version: v)
        }
        #expect(target.saveSnapshot() == pristine)
    }
}

// MARK: - ACPI PM

@Suite("Device snapshots: ACPI PM")
struct ACPISnapshotTests {
    static let pm1Evt: UInt64 = 0x600, pm1En = pm1Evt + 2, pm1Cnt: UInt64 = 0x604, pmTmr: UInt64 = 0x608
    static let gpe0: UInt64 = 0x620, gpeEn = gpe0 + 2, cf9: UInt64 = 0xCF9

    func make(_ clock: ManualClock, _ sci: RecordingInterruptLine = RecordingInterruptLine(),
              gpeBlockLength: Int = 4) -> ACPIPowerManagement {
        ACPIPowerManagement(gpeBlockLength: gpeBlockLength, sci: sci, now: { clock.now() }, onPowerOff: {}, onReset: {})
    }

    func attach(_ pm: ACPIPowerManagement) throws -> BusHarness {
        var bus = BusHarness()
        try bus.attach(pm.pm1Event, name: "evt", at: Self.pm1Evt, size: 4)
        try bus.attach(pm.pm1Control, name: "cnt", at: Self.pm1Cnt, size: 2)
        try bus.attach(pm.pmTimer, name: "tmr", at: Self.pmTmr, size: 4)
        try bus.attach(pm.gpe0, name: "gpe", at: Self.gpe0, size: 4)
        try bus.attach(pm.resetRegister, name: "cf9", at: Self.cf9, size: 1)
        return bus
    }

    /// PWRBTN pressed but not enabled, RTC enabled, SLP_TYP 2 + BM_RLD, GPE 9 raised and enabled,
    /// GPE 3 enabled, reset register 0x0A, 2 s of timer.
    func busy(_ clock: ManualClock, _ sci: RecordingInterruptLine = RecordingInterruptLine()) throws -> ACPIPowerManagement {
        let pm = make(clock, sci)
        let bus = try attach(pm)
        pm.pressPowerButton()
        bus.write(Self.pm1En, size: 2, value: UInt64(ACPIPowerManagement.rtcEnable))
        bus.write(Self.pm1Cnt, size: 2, value: 2 << 10 | 0x0002)
        bus.write8(Self.gpeEn, 0x08)
        bus.write8(Self.gpeEn + 1, 0x02)
        pm.raiseGPE(9)
        bus.write8(Self.cf9, 0x0A)
        clock.advance(2_000_000_000)
        return pm
    }

    @Test("payload layout, round trip; registers and SCI restored; the PM timer continues from the saved value")
    func roundTripBehaves() throws {
        let clock = ManualClock(7_000_000_000)
        let pm = try busy(clock)
        let bus = try attach(pm)
        let payload = pm.saveSnapshot()
        let timer = UInt32(7_159_090) // 2 s at 3.579545 MHz
        #expect(payload == [0x00, 0x01, 0x00, 0x04, 0x02, 0x08, 0x0A] + le32(timer) + le32(2) + [0x00, 0x02, 0x08, 0x02])

        // Another host, another clock: the timer does not jump to that clock's value.
        let otherClock = ManualClock(900_000_000_000)
        let sci = RecordingInterruptLine()
        let restored = try roundTrip(payload) { make(otherClock, sci) }
        #expect(sci.history == [true]) // GPE 9: status and enable
        #expect(restored.sciLevel)
        let other = try attach(restored)
        for port in [Self.pm1Evt, Self.pm1Evt + 1, Self.pm1En, Self.pm1En + 1, Self.pm1Cnt, Self.pm1Cnt + 1,
                     Self.gpe0, Self.gpe0 + 1, Self.gpeEn, Self.gpeEn + 1, Self.cf9] {
            #expect(other.read8(port) == bus.read8(port), "port \(port)")
        }
        #expect(other.read(Self.pmTmr, size: 4) == UInt64(timer))
        otherClock.advance(1_000_000_000)
        #expect(other.read(Self.pmTmr, size: 4) == UInt64(timer) + 3_579_545)

        // Acknowledging GPE 9 on the restored model lowers the SCI.
        other.write8(Self.gpe0 + 1, 0x02)
        #expect(sci.history == [true, false])
    }

    @Test("SCI after restore: from PM1 status & enable, and low when nothing is enabled")
    func sciLevels() throws {
        let clock = ManualClock(1)
        let pm = make(clock)
        pm.pressPowerButton()
        try attach(pm).write(Self.pm1En, size: 2, value: UInt64(ACPIPowerManagement.pwrbtnEnable))
        let sci = RecordingInterruptLine()
        try roundTrip(pm.saveSnapshot()) { make(clock, sci) }
        #expect(sci.history == [true])

        let disabled = make(clock)
        disabled.pressPowerButton()
        disabled.raiseGPE(1)
        let low = RecordingInterruptLine()
        try roundTrip(disabled.saveSnapshot()) { make(clock, low) }
        #expect(low.history == [false])
    }

    @Test("the timer wraps at 32 bits after a restore near the top")
    func timerWraps() throws {
        let clock = ManualClock(0)
        let payload = patched(make(clock).saveSnapshot(), at: 7, le32(0xFFFF_FFFF))
        let pm = make(clock)
        try pm.restoreSnapshot(payload, version: ACPIPowerManagement.snapshotVersion)
        clock.advance(1_000_000_000)
        #expect(try attach(pm).read(Self.pmTmr, size: 4) == 3_579_544)
    }

    @Test("truncations, trailing bytes, versions")
    func payloadRules() throws {
        let clock = ManualClock(5)
        checkPayloadRules(try busy(clock).saveSnapshot()) { make(clock) }
    }

    @Test("invalid fields are rejected by name and change nothing")
    func invalidFields() throws {
        let clock = ManualClock(5)
        let payload = try busy(clock).saveSnapshot()
        let sci = RecordingInterruptLine()
        let target = make(clock, sci)
        let pristine = target.saveSnapshot()
        let v = ACPIPowerManagement.snapshotVersion
        #expect(throws: LEDecodeError.invalid(field: "acpi.PM1_STS", reason: "0x102 has bits 0x2, which the hardware cannot hold")) {
            try target.restoreSnapshot(patched(payload, at: 0, [0x02, 0x01]), version: v)
        }
        #expect(throws: LEDecodeError.invalid(field: "acpi.PM1_EN", reason: "0x402 has bits 0x2, which the hardware cannot hold")) {
            try target.restoreSnapshot(patched(payload, at: 2, [0x02, 0x04]), version: v)
        }
        #expect(throws: LEDecodeError.invalid(field: "acpi.PM1_CNT", reason: "0x2802 has bits 0x2000, which the hardware cannot hold")) {
            try target.restoreSnapshot(patched(payload, at: 4, [0x02, 0x28]), version: v) // SLP_EN is write-only
        }
        #expect(throws: LEDecodeError.invalid(field: "acpi.reset register", reason: "0xe has bits 0x4, which the hardware cannot hold")) {
            try target.restoreSnapshot(patched(payload, at: 6, [0x0E]), version: v)
        }
        #expect(throws: LEDecodeError.invalid(field: "acpi.GPE0 length", reason: "3 bytes per register, this machine's GPE0 block has 2")) {
            try target.restoreSnapshot(patched(payload, at: 11, le32(3)) + [0, 0], version: v)
        }
        // A machine with a longer GPE0 block does not take this one's state.
        let wide = make(clock, gpeBlockLength: 8)
        #expect(throws: LEDecodeError.invalid(field: "acpi.GPE0 length", reason: "2 bytes per register, this machine's GPE0 block has 4")) {
            try wide.restoreSnapshot(payload, version: v)
        }
        #expect(target.saveSnapshot() == pristine)
        #expect(sci.history.isEmpty)
    }
}

// MARK: - VMGenID

@Suite("Device snapshots: VM generation ID")
struct VMGenIDSnapshotTests {
    final class Counter: Sendable {
        let n = Mutex(0)
        var value: Int { n.withLock { $0 } }
    }

    let guid = [UInt8](repeating: 0x11, count: 16)
    let next = [UInt8](repeating: 0x22, count: 16)

    func ram() throws -> GuestMemory { try GuestMemory(ranges: [(GuestAddress(0), 1 << 20)]) }

    @Test("payload layout and round trip; restore touches neither guest memory nor the guest")
    func roundTripBehaves() throws {
        let memory = try ram()
        let dev = VMGenID(guid: guid, memory: memory) {}
        #expect(dev.saveSnapshot() == guid + [UInt8](repeating: 0, count: 8))
        #expect(dev.addressWritten([0x28, 0x30, 0, 0, 0, 0, 0, 0]))
        let payload = dev.saveSnapshot()
        #expect(payload == guid + [0x28, 0x30, 0, 0, 0, 0, 0, 0])

        let otherMemory = try ram()
        let notified = Counter()
        let restored = try roundTrip(payload) { VMGenID(guid: next, memory: otherMemory) { notified.n.withLock { $0 += 1 } } }
        #expect(restored.guid == guid && restored.address == 0x3028)
        #expect(try otherMemory.read(GuestAddress(0x3028), count: 16) == [UInt8](repeating: 0, count: 16))
        #expect(notified.value == 0)
    }

    @Test("restore then setGUID with the address known: memory first, then the GPE, exactly once")
    func restoreThenNotify() throws {
        let memory = try ram()
        let dev = VMGenID(guid: guid, memory: memory) {}
        dev.addressWritten([0x28, 0x30, 0, 0, 0, 0, 0, 0])
        let payload = dev.saveSnapshot()

        // The machine's wiring: vmgenid notifies by raising GPE 5 on the ACPI model.
        let clock = ManualClock(1)
        let sci = RecordingInterruptLine()
        let acpi = ACPIPowerManagement(gpeBlockLength: 4, sci: sci, now: { clock.now() }, onPowerOff: {}, onReset: {})
        var bus = BusHarness()
        try bus.attach(acpi.gpe0, at: 0x620, size: 4)
        bus.write8(0x622, 0x20) // the guest enabled GPE 5
        let acpiPayload = acpi.saveSnapshot()

        let otherMemory = try ram()
        let otherSCI = RecordingInterruptLine()
        let otherACPI = ACPIPowerManagement(gpeBlockLength: 4, sci: otherSCI, now: { clock.now() }, onPowerOff: {}, onReset: {})
        let notified = Counter()
        let restored = VMGenID(guid: next, memory: otherMemory) {
            notified.n.withLock { $0 += 1 }
            otherACPI.raiseGPE(5)
        }
        try otherACPI.restoreSnapshot(acpiPayload, version: ACPIPowerManagement.snapshotVersion)
        try restored.restoreSnapshot(payload, version: VMGenID.snapshotVersion)
        otherACPI.afterRestore()
        #expect(otherSCI.history == [false])
        #expect(restored.setGUID(next))
        #expect(try otherMemory.read(GuestAddress(0x3028), count: 16) == next)
        #expect(notified.value == 1)
        #expect(otherACPI.gpeStatus(byte: 0) == 0x20)
        #expect(otherSCI.history == [false, true])
    }

    @Test("restore then setGUID with the address unknown: remembered, written when it arrives, not notified")
    func restoreThenPending() throws {
        let memory = try ram()
        let payload = VMGenID(guid: guid, memory: memory) {}.saveSnapshot()
        let notified = Counter()
        let restored = try roundTrip(payload) { VMGenID(guid: next, memory: memory) { notified.n.withLock { $0 += 1 } } }
        #expect(restored.address == nil)
        #expect(!restored.setGUID(next))
        #expect(restored.guid == next)
        #expect(restored.addressWritten([0x28, 0x40, 0, 0, 0, 0, 0, 0]))
        #expect(try memory.read(GuestAddress(0x4028), count: 16) == next)
        #expect(notified.value == 0)
    }

    @Test("truncations, trailing bytes, versions")
    func payloadRules() throws {
        let memory = try ram()
        let dev = VMGenID(guid: guid, memory: memory) {}
        dev.addressWritten([0x28, 0x30, 0, 0, 0, 0, 0, 0])
        checkPayloadRules(dev.saveSnapshot()) { VMGenID(guid: next, memory: memory) {} }
    }

    @Test("addresses that are not 0 nor 8-byte aligned inside one page of RAM are rejected, by the guest path too")
    func invalidAddress() throws {
        let memory = try ram()
        let target = VMGenID(guid: next, memory: memory) {}
        let pristine = target.saveSnapshot()
        for bad: UInt64 in [0x3029, 0x3FF8, 0x3FF4, 0xFFFF8, 1 << 40, .max] {
            #expect(throws: LEDecodeError.invalid(field: "vmgenid.address", reason: "\("0x" + String(bad, radix: 16)) is not 0 "
                + "(not yet reported) nor an 8-byte aligned address of 16 bytes inside one page of guest RAM")) {
                try target.restoreSnapshot(guid + le32(UInt32(truncatingIfNeeded: bad)) + le32(UInt32(bad >> 32)), version: 1)
            }
            #expect(!target.addressWritten(le32(UInt32(truncatingIfNeeded: bad)) + le32(UInt32(bad >> 32))))
        }
        #expect(target.saveSnapshot() == pristine)
        #expect(throws: LEDecodeError.invalid(field: "vmgenid.guid", reason: "15 bytes, a GUID has 16")) {
            try target.restoreState(.init(guid: [UInt8](repeating: 1, count: 15), address: 0))
        }
        // The last usable slot of a page.
        try target.restoreSnapshot(guid + [0xF0, 0x3F, 0, 0, 0, 0, 0, 0], version: 1)
        #expect(target.address == 0x3FF0)
    }
}

// MARK: - fw_cfg

@Suite("Device snapshots: fw_cfg")
struct FwCfgSnapshotTests {
    let memory: GuestMemory
    let base = FwCfg.portBase
    let table: [UInt8] = Array("ACPI tables".utf8)

    init() throws {
        memory = try GuestMemory(ranges: [(GuestAddress(0), 1 << 20)])
    }

    /// Items and files as a machine adds them; writable files in non-alphabetical order.
    func make(_ log: WriteLog = WriteLog()) throws -> FwCfg {
        let fw = FwCfg(memory: memory)
        fw.addItem(key: 0x0005, data: [2, 0])
        try fw.addFile("opt/zeta", data: [1, 2, 3])
        try fw.addWritableFile("etc/vmcoreinfo", size: 4, onWrite: log.handler)
        try fw.addFile("etc/alpha", data: table)
        try fw.addWritableFile("etc/beta", size: 8, onWrite: log.handler)
        return fw
    }

    func attach(_ fw: FwCfg) throws -> BusHarness {
        var bus = BusHarness()
        try bus.attach(fw.ports, at: base, size: FwCfg.portSize)
        return bus
    }

    /// etc/beta written, etc/alpha selected and 4 bytes read, the DMA address's high half written.
    func busy(_ log: WriteLog = WriteLog()) throws -> FwCfg {
        let fw = try make(log)
        try fw.writeFile("etc/beta", offset: 1, [9, 8, 7])
        let bus = try attach(fw)
        bus.write(base, size: 2, value: UInt64(try #require(fw.selector(ofFile: "etc/alpha"))))
        _ = (0..<4).map { _ in bus.read8(base + 1) }
        bus.write(base + 4, size: 4, value: UInt64(UInt32(0x12).byteSwapped))
        return fw
    }

    @Test("payload layout: registers, then writable files by name; read-only items are not carried")
    func layout() throws {
        let payload = try busy().saveSnapshot()
        var w = LEWriter()
        w.u16(0x22)                  // etc/alpha's selector
        w.u32(4)
        w.u64(0x12 << 32)
        w.u32(2)
        w.string("etc/beta")
        w.blob([0, 9, 8, 7, 0, 0, 0, 0])
        w.string("etc/vmcoreinfo")
        w.blob([0, 0, 0, 0])
        #expect(payload == w.bytes)
    }

    @Test("round trip: the data register continues the selected item from the same offset; no write handler runs")
    func roundTripBehaves() throws {
        let payload = try busy().saveSnapshot()
        let log = WriteLog()
        let restored = try roundTrip(payload) { try! make(log) }
        #expect(log.calls.isEmpty)
        #expect(restored.fileData("etc/beta") == [0, 9, 8, 7, 0, 0, 0, 0])
        let bus = try attach(restored)
        #expect((0..<(table.count - 4)).map { _ in bus.read8(base + 1) } == Array(table[4...]))
        #expect(bus.read8(base + 1) == 0)
    }

    @Test("the restored DMA high half completes a transfer started before the save")
    func dmaHalf() throws {
        let fw = try make()
        let bus = try attach(fw)
        // A descriptor at 0x1_0000 (high half 0): READ 4 bytes of etc/alpha to 0x2_0000.
        let key = UInt32(try #require(fw.selector(ofFile: "etc/alpha")))
        let control = key << 16 | FwCfg.dmaSelect | FwCfg.dmaRead
        try memory.write(bigEndian(control) + bigEndian(UInt32(4)) + bigEndian(UInt64(0x2_0000)), at: GuestAddress(0x1_0000))
        bus.write(base + 4, size: 4, value: 0)
        let restored = try roundTrip(fw.saveSnapshot()) { try! make() }
        try attach(restored).write(base + 8, size: 4, value: UInt64(UInt32(0x1_0000).byteSwapped))
        #expect(try memory.read(GuestAddress(0x2_0000), count: 4) == Array(table.prefix(4)))
        #expect(try memory.read(UInt32.self, at: GuestAddress(0x1_0000)) == 0)
    }

    @Test("truncations, trailing bytes, versions")
    func payloadRules() throws {
        checkPayloadRules(try busy().saveSnapshot()) { try! make() }
    }

    @Test("invalid fields are rejected by name and change nothing; files may come in any order")
    func invalidFields() throws {
        let log = WriteLog()
        let target = try make(log)
        let pristine = target.saveSnapshot()
        let v = FwCfg.snapshotVersion
        func payload(selector: UInt16 = 0x22, offset: UInt32 = 4, dma: UInt64 = 0, count: UInt32? = nil,
                     files: [(String, [UInt8])] = [("etc/vmcoreinfo", [1, 2, 3, 4]), ("etc/beta", [UInt8](repeating: 5, count: 8))]) -> [UInt8] {
            var w = LEWriter()
            w.u16(selector)
            w.u32(offset)
            w.u64(dma)
            w.u32(count ?? UInt32(files.count))
            for (name, data) in files {
                w.string(name)
                w.blob(data)
            }
            return w.bytes
        }
        #expect(throws: LEDecodeError.invalid(field: "fwcfg.offset", reason: "12 is outside item 0x22 of 11 bytes")) {
            try target.restoreSnapshot(payload(offset: 12), version: v)
        }
        #expect(throws: LEDecodeError.invalid(field: "fwcfg.offset", reason: "1 is outside item 0x1234 of 0 bytes")) {
            try target.restoreSnapshot(payload(selector: 0x1234, offset: 1), version: v)
        }
        #expect(throws: LEDecodeError.invalid(field: "fwcfg.dma address", reason: "0x1200001000 has a low half, which the register never holds")) {
            try target.restoreSnapshot(payload(dma: 0x12_0000_1000), version: v)
        }
        #expect(throws: LEDecodeError.invalid(field: "fwcfg.file name", reason: "\"etc/nope\" is not a writable file of this device")) {
            try target.restoreSnapshot(payload(files: [("etc/nope", [0]), ("etc/beta", [UInt8](repeating: 5, count: 8))]), version: v)
        }
        #expect(throws: LEDecodeError.invalid(field: "fwcfg.file name", reason: "\"etc/alpha\" is not a writable file of this device")) {
            try target.restoreSnapshot(payload(files: [("etc/alpha", table), ("etc/beta", [UInt8](repeating: 5, count: 8))]), version: v)
        }
        #expect(throws: LEDecodeError.invalid(field: "fwcfg.file etc/beta", reason: "7 bytes, this device's file has 8")) {
            try target.restoreSnapshot(payload(files: [("etc/vmcoreinfo", [1, 2, 3, 4]), ("etc/beta", [UInt8](repeating: 5, count: 7))]), version: v)
        }
        #expect(throws: LEDecodeError.invalid(field: "fwcfg.file name", reason: "\"etc/beta\" appears twice")) {
            try target.restoreSnapshot(payload(files: [("etc/beta", [UInt8](repeating: 5, count: 8)), ("etc/beta", [UInt8](repeating: 5, count: 8))]), version: v)
        }
        #expect(throws: LEDecodeError.invalid(field: "fwcfg.file count", reason: "1 writable files, this device has 2")) {
            try target.restoreSnapshot(payload(files: [("etc/beta", [UInt8](repeating: 5, count: 8))]), version: v)
        }
        #expect(throws: LEDecodeError.invalid(field: "fwcfg.file count", reason: "3 is over the limit of 2")) {
            try target.restoreSnapshot(payload(count: 3), version: v)
        }
        #expect(throws: LEDecodeError.invalid(field: "fwcfg.file name", reason: "length 56 is over the limit of 55 bytes")) {
            try target.restoreSnapshot(payload(files: [(String(repeating: "x", count: 56), [0]), ("etc/beta", [])]), version: v)
        }
        #expect(target.saveSnapshot() == pristine)
        #expect(log.calls.isEmpty)

        // The files in the other order load the same state; the save is canonical (by name).
        try target.restoreSnapshot(payload(files: [("etc/vmcoreinfo", [1, 2, 3, 4]), ("etc/beta", [UInt8](repeating: 5, count: 8))]), version: v)
        #expect(target.saveSnapshot() == payload(files: [("etc/beta", [UInt8](repeating: 5, count: 8)), ("etc/vmcoreinfo", [1, 2, 3, 4])]))
        #expect(target.fileData("etc/vmcoreinfo") == [1, 2, 3, 4])
        #expect(log.calls.isEmpty)
    }
}

// MARK: - All devices

@Suite("Device snapshots: the fuzz entry point")
struct SnapshotFuzzSmokeTests {
    @Test("survives thousands of seeded random inputs, and the checks it makes hold for real payloads")
    func smoke() throws {
        var rng = SplitMix64(state: 0x5EED)
        for _ in 0..<4000 {
            let input = (0..<Int.random(in: 0...64, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) }
            Fuzz.deviceState(input)
        }
        // Valid payloads, so the fuzzer's oracle runs on the success path too.
        let memory = try GuestMemory(ranges: [(GuestAddress(0), 1 << 16)])
        let serial = Serial16550(output: RecordingConsole(), irq: RecordingInterruptLine())
        serial.enqueueInput([1, 2, 3])
        Fuzz.deviceState([0, 1] + serial.saveSnapshot())
        Fuzz.deviceState([1, 1, 0x45, 0xD1, 1, 0, 0, 0, 0xFA])
        Fuzz.deviceState([2, 1] + [UInt8](repeating: 0, count: 129))
        Fuzz.deviceState([3, 2, 0, 1, 0, 1, 0, 0, 0, 1, 2, 3, 4, 2, 0, 0, 0, 1, 2, 3, 4, 9])
        Fuzz.deviceState([5, 1] + VMGenID(guid: [UInt8](repeating: 7, count: 16), memory: memory) {}.saveSnapshot())
    }
}

// MARK: - One code function per payload

/// A device state with its payload's code function (the configuration it needs bound).
private protocol VersionCoded: Equatable {
    mutating func code<C: LECoder>(_ c: inout C, version: UInt16) throws(LEDecodeError)
}

extension Serial16550.State: VersionCoded {}
extension I8042.State: VersionCoded {}
extension CMOSClock.State: VersionCoded {}
extension VMGenID.State: VersionCoded {}

private struct ACPICoded: VersionCoded {
    var state: ACPIPowerManagement.State
    let half: Int
    mutating func code<C: LECoder>(_ c: inout C, version: UInt16) throws(LEDecodeError) {
        try state.code(&c, version: version, gpeRegisterLength: half)
    }
}

private struct FwCfgCoded: VersionCoded {
    var state: FwCfg.State
    let sizes: [String: Int]
    mutating func code<C: LECoder>(_ c: inout C, version: UInt16) throws(LEDecodeError) {
        try state.code(&c, version: version, writableFileSizes: sizes)
    }
}

@Suite("Device snapshots: one code function per payload")
struct DeviceStateCodeTests {
    /// `state`'s code function writes `payload` (the device's own `saveSnapshot`), reads it back into
    /// `blank` as an equal state that writes the same bytes again, and builds no field name.
    private func check<S: VersionCoded>(_ state: S, blank: S, payload: [UInt8],
                                        sourceLocation: SourceLocation = #_sourceLocation) throws {
        let names = NameCounter()
        var s = state
        var enc = CountingCoder(inner: LEEncodingCoder(), names: names)
        try s.code(&enc, version: 1)
        #expect(enc.inner.writer.bytes == payload, sourceLocation: sourceLocation)
        var decoded = blank
        var dec = CountingCoder(inner: LEDecodingCoder(LEReader(payload)), names: names)
        try decoded.code(&dec, version: 1)
        try dec.inner.reader.finish()
        #expect(decoded == state, sourceLocation: sourceLocation)
        var again = CountingCoder(inner: LEEncodingCoder(), names: names)
        try decoded.code(&again, version: 1)
        #expect(again.inner.writer.bytes == payload, sourceLocation: sourceLocation)
        #expect(names.built == [], "field names built", sourceLocation: sourceLocation)
    }

    @Test("each device's state: encode → decode → encode gives the device's payload and an equal state, building no field name")
    func roundTrips() throws {
        let (uart, _) = try SerialSnapshotTests().busyUART()
        try check(uart.saveState(), blank: Serial16550.State(), payload: uart.saveSnapshot())
        let i8042 = try I8042SnapshotTests().busy()
        try check(i8042.saveState(), blank: I8042.State(), payload: i8042.saveSnapshot())
        let idle = I8042SnapshotTests().make()
        try check(idle.saveState(), blank: I8042.State(), payload: idle.saveSnapshot())
        let cmos = try CMOSSnapshotTests().busy()
        try check(cmos.saveState(), blank: CMOSClock.State(), payload: cmos.saveSnapshot())
        let clock = ManualClock(7_000_000_000)
        let acpi = ACPISnapshotTests()
        let pm = try acpi.busy(clock)
        try check(ACPICoded(state: pm.saveState(), half: 2), blank: ACPICoded(state: acpi.make(clock).saveState(), half: 2),
                  payload: pm.saveSnapshot())
        let vmgenid = VMGenID(guid: [UInt8](repeating: 0x11, count: 16), memory: try GuestMemory(ranges: [(GuestAddress(0), 1 << 20)])) {}
        #expect(vmgenid.addressWritten([0x28, 0x30, 0, 0, 0, 0, 0, 0]))
        try check(vmgenid.saveState(), blank: VMGenID.State(guid: [], address: 0), payload: vmgenid.saveSnapshot())
        let fw = try FwCfgSnapshotTests().busy()
        let sizes = ["etc/beta": 8, "etc/vmcoreinfo": 4]
        try check(FwCfgCoded(state: fw.saveState(), sizes: sizes), blank: FwCfgCoded(state: FwCfg.State(), sizes: sizes),
                  payload: fw.saveSnapshot())
    }

    @Test("a rejected field builds its own name, and the reasons are the devices' own")
    func failuresNameTheField() {
        let names = NameCounter()
        var s = Serial16550.State()
        var dec = CountingCoder(inner: LEDecodingCoder(LEReader([0, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0, 0])), names: names)
        #expect(throws: LEDecodeError.invalid(field: "serial.fifo count", reason: "65535 is over the limit of 4096")) {
            try s.code(&dec, version: 1)
        }
        #expect(names.built == ["serial.fifo count"])

        names.built = []
        var a = ACPICoded(state: ACPISnapshotTests().make(ManualClock(0)).saveState(), half: 2)
        var acpi = CountingCoder(inner: LEDecodingCoder(LEReader([0, 0, 0, 0, 0, 0, 0] + le32(0) + le32(3))), names: names)
        #expect(throws: LEDecodeError.invalid(field: "acpi.GPE0 length", reason: "3 bytes per register, this machine's GPE0 block has 2")) {
            try a.code(&acpi, version: 1)
        }
        #expect(names.built == ["acpi.GPE0 length"])
    }
}
