import Devices
import Synchronization
import Testing
import TestSupport
import WireFormat

/// A monotonic clock the test moves by hand, in nanoseconds.
final class ManualClock: Sendable {
    private let ns: Mutex<UInt64>
    init(_ start: UInt64) { ns = Mutex(start) }
    func now() -> UInt64 { ns.withLock { $0 } }
    func advance(_ delta: UInt64) { ns.withLock { $0 += delta } }
}

/// Counts the machine-level requests the device makes.
final class MachineRequests: Sendable {
    private let calls = Mutex<(powerOffs: Int, resets: Int, sleeps: [UInt8])>((0, 0, []))
    func powerOff() { calls.withLock { $0.powerOffs += 1 } }
    func reset() { calls.withLock { $0.resets += 1 } }
    func sleep(_ type: UInt8) { calls.withLock { $0.sleeps.append(type) } }
    var powerOffs: Int { calls.withLock { $0.powerOffs } }
    var resets: Int { calls.withLock { $0.resets } }
    var sleeps: [UInt8] { calls.withLock { $0.sleeps } }
}

@Suite("ACPI fixed hardware through the bus harness")
struct ACPIPMTests {
    // Ports as a machine might place them.
    static let pm1Evt: UInt64 = 0x600, pm1Sts = pm1Evt, pm1En = pm1Evt + 2
    static let pm1Cnt: UInt64 = 0x604, pmTmr: UInt64 = 0x608, gpe0: UInt64 = 0x620, cf9: UInt64 = 0xCF9
    static let gpeSts = gpe0, gpeEn = gpe0 + 2 // GPE0_BLK_LEN 4: two STS bytes, two EN bytes

    let clock = ManualClock(123_000_000_000) // the host has been up a while: the timer still starts at 0
    let requests = MachineRequests()
    let sci = RecordingInterruptLine()
    let pm: ACPIPowerManagement
    var bus = BusHarness()

    init() throws {
        pm = Self.makeModel(clock: clock, requests: requests, sci: sci)
        for block in [pm.pm1Event, pm.pm1Control, pm.pmTimer, pm.gpe0, pm.resetRegister] {
            let base: UInt64 = switch block.kind {
            case .pm1Event: Self.pm1Evt
            case .pm1Control: Self.pm1Cnt
            case .pmTimer: Self.pmTmr
            case .gpe0: Self.gpe0
            case .resetRegister: Self.cf9
            }
            try bus.attach(block, name: "\(block.kind)", at: base, size: UInt64(block.length))
        }
    }

    static func makeModel(clock: ManualClock, requests: MachineRequests, sci: RecordingInterruptLine) -> ACPIPowerManagement {
        ACPIPowerManagement(sci: sci, now: { clock.now() },
                            onPowerOff: { requests.powerOff() }, onReset: { requests.reset() },
                            onUnsupportedSleep: { requests.sleep($0) })
    }

    func read16(_ port: UInt64) -> UInt16 { UInt16(bus.read(port, size: 2)) }
    func write16(_ port: UInt64, _ value: UInt16) { bus.write(port, size: 2, value: UInt64(value)) }
    func timer() -> UInt32 { UInt32(bus.read(Self.pmTmr, size: 4)) }

    // MARK: PM1 event block

    @Test("PM1_STS is write-1-to-clear; writing 0 or other bits clears nothing")
    func pm1StatusWriteOneToClear() {
        pm.pressPowerButton()
        #expect(read16(Self.pm1Sts) == 0x0100)
        write16(Self.pm1Sts, 0)
        #expect(read16(Self.pm1Sts) == 0x0100)
        write16(Self.pm1Sts, ~ACPIPowerManagement.pwrbtnStatus)
        #expect(read16(Self.pm1Sts) == 0x0100)
        bus.write8(Self.pm1Sts + 1, 0x01) // a byte write to the high byte clears it too
        #expect(read16(Self.pm1Sts) == 0)
        pm.pressPowerButton()
        write16(Self.pm1Sts, ACPIPowerManagement.fixedStatusMask) // Linux's "clear all" (0xC731)
        #expect(read16(Self.pm1Sts) == 0)
    }

    @Test("PM1_EN reads back what was written for its bits, as acpi_enable_event checks")
    func pm1EnableReadsBack() {
        for bits: UInt16 in [0x0100, 0x0001, 0x0020, 0x0200, 0x0400, 0x4000, 0x4721, 0] {
            write16(Self.pm1En, bits)
            #expect(read16(Self.pm1En) == bits)
        }
        write16(Self.pm1En, 0xFFFF)
        #expect(read16(Self.pm1En) == ACPIPowerManagement.fixedEnableMask) // reserved bits read 0
        bus.write8(Self.pm1En, 0x00)                                        // low byte only
        #expect(read16(Self.pm1En) == 0x4700)
        #expect(pm.pm1Enable == 0x4700)
    }

    @Test("power button: status without SCI until PWRBTN_EN; the guest's clear drops the SCI; one setLevel per edge")
    func powerButton() {
        pm.pressPowerButton()
        #expect(pm.pm1Status & ACPIPowerManagement.pwrbtnStatus != 0)
        #expect(sci.level == false)
        write16(Self.pm1En, ACPIPowerManagement.pwrbtnEnable)
        #expect(sci.level == true)
        #expect(pm.sciLevel == true)
        pm.pressPowerButton()                  // still pending: no new edge
        _ = read16(Self.pm1Sts)                // reads never drive the line
        write16(Self.pm1En, ACPIPowerManagement.pwrbtnEnable)
        write16(Self.pm1Sts, ACPIPowerManagement.pwrbtnStatus)
        #expect(sci.level == false)
        #expect(read16(Self.pm1Sts) == 0)
        write16(Self.pm1Sts, ACPIPowerManagement.pwrbtnStatus)
        #expect(sci.history == [true, false])
        pm.pressPowerButton()                  // enabled now: the SCI rises at once
        #expect(sci.history == [true, false, true])
    }

    // MARK: GPE0

    @Test("GPE: Linux's boot sequence, then raise/enable, then the _Exx servicing order of §2.4")
    func gpeServicing() {
        for i: UInt64 in 0..<2 { bus.write8(Self.gpeEn + i, 0x00) }
        for i: UInt64 in 0..<2 { bus.write8(Self.gpeSts + i, 0xFF) }
        #expect(pm.raiseGPE(5))
        #expect(bus.read8(Self.gpeSts) == 0x20)
        #expect(sci.level == false)              // not enabled yet
        // acpi_update_all_gpes: read-modify-write of the EN byte.
        bus.write8(Self.gpeEn, bus.read8(Self.gpeEn) | 0x20)
        #expect(sci.level == true)
        #expect(pm.gpeEnable(byte: 0) == 0x20)
        // The SCI handler: EN, then STS; the GPE is active.
        #expect(bus.read8(Self.gpeEn) & bus.read8(Self.gpeSts) == 0x20)
        bus.write8(Self.gpeEn, bus.read8(Self.gpeEn) & ~0x20) // disable
        bus.write8(Self.gpeSts, 0x20)                          // edge: clear status
        #expect(sci.level == false)
        bus.write8(Self.gpeEn, bus.read8(Self.gpeEn) | 0x20)  // re-enable after _E05
        #expect(sci.level == false)
        #expect(bus.read8(Self.gpeSts) == 0)
        #expect(sci.history == [true, false])
    }

    @Test("GPE numbering: GPE n is bit n%8 of byte n/8; wider accesses split into bytes")
    func gpeNumbering() {
        #expect(pm.gpeCount == 16)
        #expect(pm.raiseGPE(0) && pm.raiseGPE(15))
        #expect(read16(Self.gpeSts) == 0x8001)
        write16(Self.gpeEn, 0x8000)                // 16-bit write over both EN bytes
        #expect(pm.gpeEnable(byte: 0) == 0 && pm.gpeEnable(byte: 1) == 0x80)
        #expect(sci.level == true)
        #expect(bus.read(Self.gpe0, size: 4) == 0x8000_8001)
        bus.write(Self.gpe0, size: 4, value: 0x0000_8000) // clears STS 15 only; EN becomes 0
        #expect(pm.gpeStatus(byte: 0) == 0x01 && pm.gpeStatus(byte: 1) == 0)
        #expect(pm.gpeEnable(byte: 1) == 0)
        #expect(sci.level == false)
        #expect(pm.gpeStatus(byte: 2) == 0)       // no such byte: reads 0, no trap
    }

    @Test("raiseGPE out of range returns false and changes nothing", arguments: [-1, 16, 1000, Int.max, Int.min])
    func gpeOutOfRange(n: Int) {
        #expect(pm.raiseGPE(n) == false)
        #expect(pm.gpeStatus(byte: 0) == 0 && pm.gpeStatus(byte: 1) == 0)
        #expect(sci.history.isEmpty)
    }

    // MARK: PM1 control

    @Test("PM1_CNT: SCI_EN always reads 1; BM_RLD, bit 9 and SLP_TYP stick; GBL_RLS and SLP_EN read 0")
    func pm1Control() {
        #expect(read16(Self.pm1Cnt) == 0x0001)
        write16(Self.pm1Cnt, 0)
        #expect(read16(Self.pm1Cnt) & ACPIPowerManagement.sciEnable == 1)
        write16(Self.pm1Cnt, 3 << 10 | 1 << 9 | 0x0004 | 0x0002)
        #expect(read16(Self.pm1Cnt) == 3 << 10 | 1 << 9 | 0x0002 | 0x0001)
        bus.write8(Self.pm1Cnt, 0x00)           // low byte only: SLP_TYP stays
        #expect(read16(Self.pm1Cnt) == 3 << 10 | 1 << 9 | 0x0001)
        #expect(requests.powerOffs == 0 && requests.sleeps.isEmpty)
    }

    @Test("S5: the exact acpi_hw_legacy_sleep sequence powers off once, on the SLP_EN write")
    func powerOff() {
        write16(Self.pm1Sts, ACPIPowerManagement.wakeStatus)
        for i: UInt64 in 0..<2 { bus.write8(Self.gpeEn + i, 0) }
        write16(Self.pm1Sts, 0xC731)
        for i: UInt64 in 0..<2 { bus.write8(Self.gpeSts + i, 0xFF) }
        let control = read16(Self.pm1Cnt) & ~0x3C00
        write16(Self.pm1Cnt, control | 5 << 10)
        #expect(requests.powerOffs == 0)
        write16(Self.pm1Cnt, control | 5 << 10 | ACPIPowerManagement.slpEnable)
        #expect(requests.powerOffs == 1)
        #expect(requests.sleeps.isEmpty && requests.resets == 0)
    }

    @Test("SLP_EN with another sleep type is reported, not obeyed")
    func unsupportedSleep() {
        write16(Self.pm1Cnt, 1 << 10)
        write16(Self.pm1Cnt, 1 << 10 | ACPIPowerManagement.slpEnable)
        #expect(requests.sleeps == [1])
        #expect(requests.powerOffs == 0)
    }

    // MARK: Reset register

    @Test("reset register: Linux's CF9 sequence resets on the second write; 0x0F (RESET_VALUE) resets")
    func resetRegister() {
        let old = bus.read8(Self.cf9)
        bus.write8(Self.cf9, old & ~0x06 | 0x02)
        #expect(requests.resets == 0)
        #expect(bus.read8(Self.cf9) == 0x02)
        bus.write8(Self.cf9, old & ~0x06 | 0x02 | 0x06)
        #expect(requests.resets == 1)
        #expect(bus.read8(Self.cf9) == 0x02)    // bit 2 never reads back
        bus.write8(Self.cf9, ACPIPowerManagement.resetValue)
        #expect(requests.resets == 2)
        #expect(bus.read8(Self.cf9) == 0x0B)
    }

    // MARK: PM timer

    @Test("PM timer: 0 at creation, 3579545 after a second, ignores writes")
    func timerRate() {
        #expect(timer() == 0)
        clock.advance(1_000_000_000)
        #expect((3_579_544...3_579_546).contains(timer()))
        bus.write(Self.pmTmr, size: 4, value: 0)
        #expect((3_579_544...3_579_546).contains(timer()))
        #expect(bus.read8(Self.pmTmr + 2) == UInt8(truncatingIfNeeded: timer() >> 16)) // byte reads agree
    }

    @Test("PM timer: monotonic, and wraps modulo 2^32 after about 1200 s")
    func timerWrap() {
        var last = timer()
        for _ in 0..<1199 {
            clock.advance(1_000_000_000)
            let now = timer()
            #expect(now > last)
            last = now
        }
        // 2^32 ticks take 1199.86 s.
        clock.advance(1_000_000_000)
        let wrapped = timer()
        #expect(wrapped < last)
        #expect(wrapped == UInt32(truncatingIfNeeded: Self.ticks(1200_000_000_000)))
    }

    @Test("PM timer: years of uptime do not overflow; the reading is ticks mod 2^32")
    func timerYears() {
        let tenYears: UInt64 = 10 * 365 * 86_400 * 1_000_000_000 + 123_456_789
        clock.advance(tenYears)
        #expect(timer() == UInt32(truncatingIfNeeded: Self.ticks(tenYears)))
    }

    /// Ticks after `ns` nanoseconds, computed independently of the device.
    static func ticks(_ ns: UInt64) -> UInt128 { UInt128(ns) * 3_579_545 / 1_000_000_000 }

    // MARK: Odd accesses

    @Test("byte and dword accesses to the PM1 event block")
    func pm1Widths() {
        pm.pressPowerButton()
        write16(Self.pm1En, 0x0100)
        #expect(bus.read8(Self.pm1Sts + 1) == 0x01)
        #expect(bus.read8(Self.pm1Sts) == 0x00)
        #expect(bus.read(Self.pm1Evt, size: 4) == 0x0100_0100)
        bus.write(Self.pm1Evt, size: 4, value: 0x0000_0100) // clears PWRBTN_STS and disables in one access
        #expect(pm.pm1Status == 0 && pm.pm1Enable == 0)
    }

    @Test("any offset and size, inside or past each block, is safe; bytes past the end read 0xFF",
          arguments: [1, 2, 4, 8])
    func anyAccess(size: Int) throws {
        var wide = BusHarness()
        let blocks = [pm.pm1Event, pm.pm1Control, pm.pmTimer, pm.gpe0, pm.resetRegister]
        for (n, block) in blocks.enumerated() {
            try wide.attach(block, name: "\(block.kind)", at: UInt64(n) * 0x100, size: 0x100)
        }
        for (n, block) in blocks.enumerated() {
            let base = UInt64(n) * 0x100
            for offset: UInt64 in 0..<12 {
                wide.write(base + offset, size: size, value: .max)
                let value = wide.read(base + offset, size: size)
                for byte in 0..<size where Int(offset) + byte >= block.length {
                    #expect(value >> (8 * byte) & 0xFF == 0xFF)
                }
            }
            var buffer = [UInt8](repeating: 0, count: 4)
            buffer.withUnsafeMutableBytes { block.read(offset: .max, data: $0) }
            #expect(buffer == [0xFF, 0xFF, 0xFF, 0xFF])
            buffer.withUnsafeBytes { block.write(offset: .max - 1, data: $0) }
        }
        #expect(bus.read(Self.pm1Evt + 3, size: 2) == 0xFF00 | UInt64(pm.pm1Enable >> 8)) // EN high byte, then past the end
    }

    // MARK: Snapshots

    @Test("save/restore round trip; the timer continues from the saved value")
    func saveRestore() throws {
        pm.pressPowerButton()
        write16(Self.pm1En, ACPIPowerManagement.pwrbtnEnable | ACPIPowerManagement.rtcEnable)
        write16(Self.pm1Cnt, 2 << 10 | 0x0002)
        bus.write8(Self.gpeEn + 1, 0x81)
        #expect(pm.raiseGPE(9))
        bus.write8(Self.cf9, 0x0A)
        clock.advance(2_000_000_000)
        let saved = pm.saveState()
        #expect(saved.pmTimer == timer())

        let otherClock = ManualClock(5_000_000_000_000)
        let otherSCI = RecordingInterruptLine()
        let restored = Self.makeModel(clock: otherClock, requests: requests, sci: otherSCI)
        try restored.restoreState(saved)
        #expect(restored.saveState() == saved)
        #expect(otherSCI.history.isEmpty, "a restore leaves the SCI alone until afterRestore")
        restored.afterRestore()
        #expect(otherSCI.history == [true])
        #expect(restored.pm1Status == pm.pm1Status && restored.gpeEnable(byte: 1) == 0x81)
        otherClock.advance(1_000_000_000)
        #expect(restored.saveState().pmTimer == saved.pmTimer + 3_579_545)
    }

    @Test("after a restore the SCI is driven once, even when the level does not change")
    func restoreDrivesSCI() throws {
        let quiet = pm.saveState()
        try pm.restoreState(quiet)
        pm.afterRestore()
        #expect(sci.history == [false])
        #expect(pm.sciLevel == false)
    }

    @Test("restore rejects states that do not fit this machine")
    func restoreRejects() {
        var s = pm.saveState()
        s.gpeStatus.append(0)
        #expect(throws: LEDecodeError.invalid(field: "acpi.GPE0_STS", reason: "3 bytes, this machine's GPE0 block has 2 per register")) {
            try pm.restoreState(s)
        }
        s = pm.saveState()
        s.gpeEnable = []
        #expect(throws: LEDecodeError.self) { try pm.restoreState(s) }
        s = pm.saveState()
        s.pm1Enable = 0x0002
        #expect(throws: LEDecodeError.invalid(field: "acpi.PM1_EN", reason: "0x2 has bits 0x2, which the hardware cannot hold")) {
            try pm.restoreState(s)
        }
        #expect(sci.history.isEmpty)            // a rejected state changes nothing
    }
}
