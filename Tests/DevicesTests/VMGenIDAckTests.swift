import Devices
import Synchronization
import Testing
import TestSupport
import VMMCore
import WireFormat

/// Collects what an acknowledgement handler hears.
final class AckLog<Ack: Sendable>: Sendable {
    private let acks = Mutex<[Ack]>([])
    var all: [Ack] { acks.withLock { $0 } }
    func record(_ ack: Ack) { acks.withLock { $0.append(ack) } }
}

/// The guest's acknowledgement of a generation ID change: the vmgenid device wired to the ACPI
/// model as the machine wires them (`VMGenID(guid:memory:acpi:)`), the guest's GPE0_STS writes
/// through the bus harness, time from a manual clock.
@Suite("VM generation ID: the guest's acknowledgement (GPE0_STS bit 5 cleared)")
struct VMGenIDAckTests {
    static let gpe0: UInt64 = 0x620, gpeSts = gpe0, gpeEn = gpe0 + 2
    static let first = [UInt8](repeating: 0x11, count: 16)
    static let second = [UInt8](repeating: 0x22, count: 16)
    static let third = [UInt8](repeating: 0x33, count: 16)

    let clock = ManualClock(50_000_000_000)
    let sci = RecordingInterruptLine()
    let memory = try! GuestMemory(ranges: [(GuestAddress(0), 1 << 20)])
    let pm: ACPIPowerManagement
    let dev: VMGenID
    let acks = AckLog<VMGenID.Acknowledgement>()
    var bus = BusHarness()

    init() throws {
        let clock = self.clock
        pm = ACPIPowerManagement(sci: sci, now: { clock.now() }, onPowerOff: {}, onReset: {})
        try bus.attach(pm.gpe0, name: "gpe0", at: Self.gpe0, size: UInt64(pm.gpe0.length))
        dev = VMGenID(guid: Self.first, memory: memory, acpi: pm)
        let acks = self.acks
        dev.onAcknowledged { acks.record($0) }
        #expect(dev.addressWritten([0x28, 0x10, 0, 0, 0, 0, 0, 0]), "the guest's loader reported the GUID address")
        bus.write8(Self.gpeEn, 0x20) // the guest enabled GPE 5, as ACPICA does for a GPE with an _E05 method
    }

    /// The guest's OSPM clears GPE0_STS bits (write 1 to clear), as ACPICA's acpi_hw_clear_gpe does.
    func guestClears(_ bits: UInt8, byte: UInt64 = 0) { bus.write8(Self.gpeSts + byte, bits) }
    var gpe5Set: Bool { pm.gpeStatus(byte: 0) & 0x20 != 0 }

    @Test("a clear of bit 5 after a change: exactly one acknowledgement, with the GUID and the time since the change")
    func oneChangeOneAck() throws {
        #expect(dev.changeStatus == .unchanged)
        #expect(dev.setGUID(Self.second))
        #expect(gpe5Set && sci.level, "GPE 5 raised with the SCI")
        #expect(dev.changeStatus == .pending)
        clock.advance(2_500_000)
        guestClears(0x20)
        #expect(!gpe5Set)
        let expected = VMGenID.Acknowledgement(guid: Self.second, latencyNanoseconds: 2_500_000)
        #expect(acks.all == [expected])
        #expect(expected.latencyMilliseconds == 2.5)
        #expect(dev.changeStatus == .acknowledged(expected))
        // The same clear again (ACPICA's clear-all at init or resume, a confused guest): nothing more.
        clock.advance(1_000_000)
        guestClears(0x20)
        guestClears(0xFF)
        #expect(acks.all == [expected])
        #expect(dev.changeStatus == .acknowledged(expected))
    }

    @Test("a clear with no change pending acknowledges nothing")
    func clearWithoutChange() {
        guestClears(0x20)
        guestClears(0xFF)
        bus.write(Self.gpeSts, size: 2, value: 0xFFFF)
        #expect(acks.all.isEmpty)
        #expect(dev.changeStatus == .unchanged)
    }

    @Test("two changes, then one clear: one acknowledgement, for the latest change, timed from it")
    func twoChangesOneClear() {
        #expect(dev.setGUID(Self.second))
        clock.advance(7_000_000)
        #expect(dev.setGUID(Self.third))
        clock.advance(1_250_000)
        guestClears(0x20)
        #expect(acks.all == [VMGenID.Acknowledgement(guid: Self.third, latencyNanoseconds: 1_250_000)])
        guestClears(0x20)
        #expect(acks.all.count == 1, "the superseded change is never acknowledged on its own")
        // A later change is acknowledged again, once.
        #expect(dev.setGUID(Self.first))
        clock.advance(3_000)
        guestClears(0x20)
        #expect(acks.all.map(\.guid) == [Self.third, Self.first])
        #expect(acks.all.last?.latencyNanoseconds == 3_000)
    }

    @Test("a clear of other GPE bits leaves the change pending")
    func otherBits() {
        #expect(dev.setGUID(Self.second))
        pm.raiseGPE(0)
        pm.raiseGPE(9)
        guestClears(0x01)
        guestClears(0xDF)        // every bit of the byte but 5
        guestClears(0xFF, byte: 1) // GPE 8-15
        #expect(acks.all.isEmpty)
        #expect(dev.changeStatus == .pending)
        #expect(gpe5Set)
        guestClears(0x20)
        #expect(acks.all.map(\.guid) == [Self.second])
    }

    @Test("a change before the guest reported the GUID's address is not notified, so it is never pending")
    func changeBeforeAddress() throws {
        let pm = ACPIPowerManagement(sci: RecordingInterruptLine(), now: { 0 }, onPowerOff: {}, onReset: {})
        let dev = VMGenID(guid: Self.first, memory: memory, acpi: pm)
        #expect(!dev.setGUID(Self.second))
        #expect(dev.changeStatus == .unchanged)
        #expect(pm.gpeStatus(byte: 0) == 0)
    }

    @Test("a clear of an older change's raise, reported after a newer change, acknowledges nothing")
    func staleClear() {
        let raised = AckLog<UInt64>()
        let dev = VMGenID(guid: Self.first, memory: memory) { raised.record($0) }
        dev.addressWritten([0x28, 0x20, 0, 0, 0, 0, 0, 0])
        dev.setGUID(Self.second)
        dev.setGUID(Self.third)
        #expect(raised.all == [1, 2], "each change is raised with its number")
        #expect(dev.acknowledge(change: 1, latencyNanoseconds: 10) == nil)
        #expect(dev.changeStatus == .pending)
        #expect(dev.acknowledge(change: 2, latencyNanoseconds: 10) == VMGenID.Acknowledgement(guid: Self.third, latencyNanoseconds: 10))
        #expect(dev.acknowledge(change: 2, latencyNanoseconds: 20) == nil, "acknowledged once")
    }

    @Test("restore: nothing pending after it; the restore's change, or a re-notification, is acknowledged once")
    func restore() throws {
        #expect(dev.setGUID(Self.second))
        let saved = dev.saveState()
        let acpiSaved = pm.saveState()
        // The snapshot carries GPE 5's status bit, not the bookkeeping.
        try pm.restoreState(acpiSaved)
        try dev.restoreState(saved)
        #expect(dev.changeStatus == .unchanged)
        guestClears(0x20)
        #expect(acks.all.isEmpty, "a clear of the restored status bit alone acknowledges nothing")
        // `--vmgenid keep` with GPE 5 pending at the save: the change is pending again.
        try pm.restoreState(acpiSaved)
        try dev.restoreState(saved)
        #expect(dev.renotify())
        #expect(dev.changeStatus == .pending)
        clock.advance(4_000)
        guestClears(0x20)
        #expect(acks.all == [VMGenID.Acknowledgement(guid: Self.second, latencyNanoseconds: 4_000)])
        // A new GUID at the restore.
        try pm.restoreState(acpiSaved)
        try dev.restoreState(saved)
        #expect(dev.setGUID(Self.third))
        guestClears(0x20)
        #expect(acks.all.map(\.guid) == [Self.second, Self.third])
    }
}

@Suite("ACPI GPE acknowledgements")
struct GPEAcknowledgementTests {
    let clock = ManualClock(1_000)
    let pm: ACPIPowerManagement
    let acks = AckLog<ACPIPowerManagement.GPEAcknowledgement>()
    var bus = BusHarness()

    init() throws {
        let clock = self.clock
        pm = ACPIPowerManagement(sci: RecordingInterruptLine(), now: { clock.now() }, onPowerOff: {}, onReset: {})
        try bus.attach(pm.gpe0, name: "gpe0", at: 0x620, size: UInt64(pm.gpe0.length))
        let acks = self.acks
        pm.onGuestAcknowledgement(gpe: 9) { acks.record($0) }
    }

    @Test("the guest's clear of a raised GPE reports its tag and latency to that GPE's handler only, once")
    func reported() {
        pm.raiseGPE(9, tag: 7)
        pm.raiseGPE(3, tag: 1)
        clock.advance(500)
        bus.write(0x620, size: 2, value: 0xFFFF)
        #expect(acks.all == [.init(gpe: 9, tag: 7, latencyNanoseconds: 500)])
        bus.write(0x620, size: 2, value: 0xFFFF)
        #expect(acks.all.count == 1)
    }

    @Test("raises folded into one clear: the largest tag, the latency from the latest raise")
    func folded() {
        pm.raiseGPE(9, tag: 4)
        clock.advance(100)
        pm.raiseGPE(9, tag: 2)
        clock.advance(30)
        bus.write8(0x621, 0x02)
        #expect(acks.all == [.init(gpe: 9, tag: 4, latencyNanoseconds: 30)])
    }

    @Test("a restored status bit has no raise to acknowledge; a removed handler hears nothing")
    func restoredAndRemoved() throws {
        pm.raiseGPE(9, tag: 1)
        let saved = pm.saveState()
        try pm.restoreState(saved)
        bus.write8(0x621, 0x02)
        #expect(acks.all.isEmpty)
        pm.onGuestAcknowledgement(gpe: 9, nil)
        pm.raiseGPE(9, tag: 2)
        bus.write8(0x621, 0x02)
        #expect(acks.all.isEmpty)
    }
}
