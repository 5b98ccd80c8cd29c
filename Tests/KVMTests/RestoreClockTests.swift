import Foundation
import Glibc
import KVM
@testable import Machine
import Snapshot
import Testing
import TestSupport
import VMMSys
import WireFormat

/// The guest's clocks across a restore (`swiftvmm restore --clock saved|host`) and the TSC rate a
/// snapshot records, on this machine's /dev/kvm with the counting guest.
@Suite("restore: the guest's clocks and TSC rate", .enabled(if: kvmAvailable(), "needs /dev/kvm"))
struct RestoreClockTests {
    static func vmState(_ dir: String) throws -> VMState {
        let snap = try SnapshotReader.open(directory: dir)
        let section = try #require(snap.section(named: "vm"))
        return try section.load(SectionSupport(current: VMState.version, oldest: 1)) {
            (r: inout LEReader, v: UInt16) throws(LEDecodeError) in try VMState(from: &r, version: v)
        }
    }

    /// The kvmclock of a machine restored from `dir` with `clock`, read before any vCPU runs.
    static func restoredClock(_ dir: String, _ clock: RestoreOptions.ClockMode) throws -> UInt64 {
        var options = RestoreOptions(console: RecordingConsole(), generationID: .keep)
        options.clock = clock
        let m = try Machine.restore(from: dir, options: options)
        return try m.vm.saveState().clock.clock
    }

    @Test("a snapshot records the TSC rate and when it was saved; --clock saved continues the kvmclock from the save, --clock host moves it on by the time since")
    func clockModes() throws {
        let (parent, dir) = try SectionVersionTests.counterSnapshot()
        defer { _ = runProcess(["rm", "-rf", parent]) }
        let saved = try Self.vmState(dir)
        let now = realtimeNanoseconds()
        #expect(saved.savedRealtime > 0 && saved.savedRealtime <= now && now - saved.savedRealtime < 60_000_000_000,
                "the save time \(saved.savedRealtime) is not a moment ago (now \(now))")
        let here = try Machine.restore(from: dir, options: RestoreOptions(console: RecordingConsole(), generationID: .keep))
        let hostKHz = try here.vcpus[0].tscKHz()
        #expect(saved.tscKHz != 0 && saved.tscKHz == hostKHz)

        usleep(1_500_000)
        let kept = try Self.restoredClock(dir, .saved)
        #expect(kept >= saved.clock.clock && kept - saved.clock.clock < 500_000_000,
                "--clock saved: the kvmclock moved \(Int64(bitPattern: kept &- saved.clock.clock) / 1_000_000) ms past the save")
        let moved = try Self.restoredClock(dir, .host)
        let since = realtimeNanoseconds() - saved.savedRealtime
        #expect(moved >= saved.clock.clock + 1_500_000_000 && moved <= saved.clock.clock + since + 500_000_000,
                "--clock host: the kvmclock moved \(Int64(bitPattern: moved &- saved.clock.clock) / 1_000_000) ms, \(since / 1_000_000) ms passed since the save")
    }

    @Test("--clock host is refused for a layout-1 snapshot, which does not say when it was saved")
    func hostClockNeedsTheSaveTime() throws {
        let (parent, dir) = try SectionVersionTests.counterSnapshot()
        defer { _ = runProcess(["rm", "-rf", parent]) }
        try SectionVersionTests.rewrite(dir) { s in
            guard s.name == "vm" else { return }
            s.version = 1
            s.minimumVersion = 1
            s.payload.removeLast(12)
        }
        #expect(try Self.restoredClock(dir, .saved) > 0, "a layout-1 vm section restores")
        do {
            _ = try Self.restoredClock(dir, .host)
            Issue.record("--clock host restored a snapshot without its save time")
        } catch {
            #expect("\(error)".contains("does not record when it was saved"), "\(error)")
        }
    }

    @Test("a snapshot whose guest ran its TSC 10% faster: restored at that rate where KVM scales the TSC, else refused naming both rates")
    func otherTSCRate() throws {
        let (parent, dir) = try SectionVersionTests.counterSnapshot()
        defer { _ = runProcess(["rm", "-rf", parent]) }
        var state = try Self.vmState(dir)
        let host = state.tscKHz
        try #require(host > 0)
        state.tscKHz = host + host / 10
        try SectionVersionTests.rewrite(dir) { s in
            guard s.name == "vm" else { return }
            var w = LEWriter()
            state.encode(to: &w)
            s.payload = w.bytes
        }
        let probe = try Machine(MachineConfig(memorySize: 16 << 20, console: RecordingConsole()),
                                boot: .program64(code: SnapshotGuestTests.counter, loadAddress: 0x100000))
        let scales = probe.vm.canScaleTSC
        do {
            let m = try Machine.restore(from: dir, options: RestoreOptions(console: RecordingConsole(), generationID: .keep))
            #expect(scales, "restored without TSC scaling")
            let khz = try m.vcpus[0].tscKHz()
            #expect(khz == state.tscKHz)
        } catch {
            #expect(!scales, "refused although KVM scales the TSC: \(error)")
            #expect("\(error)".contains("\(state.tscKHz) kHz") && "\(error)".contains("\(host) kHz"), "\(error)")
        }
    }
}
