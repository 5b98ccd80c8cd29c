import Foundation
import Glibc
import Devices
import KVM
import Machine
import Snapshot
import Testing
import TestSupport
import VMMCore
import WireFormat

/// Snapshots written by earlier versions of the format must keep loading. Each format version has a
/// committed fixture in Tests/Fixtures/snapshots/: the counting guest of SnapshotGuestTests (4 MiB,
/// one vCPU, ACPI), saved while it ran. Set SWIFTVMM_WRITE_FIXTURE=DIR to write a new one (for a new
/// format version; never overwrite an old one).
@Suite("snapshot fixtures of every format version")
struct SnapshotFixtureTests {
    static let fixtures = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent("Fixtures/snapshots").path
    /// Every committed fixture: (directory, format version it was written with).
    static let all: [(String, String)] = [("v1.0-counter", "1.0"), ("v1.0-baseline-counter", "1.0")]
    /// Fixtures written with the baseline CPU model: they must restore on every x86-64 KVM host.
    /// (v1.0-counter has the host CPU model of the machine that wrote it, an AMD family 0x19 with
    /// PKU and VAES: a host that lacks one of its features must refuse it naming the feature.)
    static let portable: Set<String> = ["v1.0-baseline-counter"]

    @Test("each fixture's header, checksums and sections decode with this build's readers", arguments: all.map(\.0))
    func decodes(_ name: String) throws {
        let dir = Self.fixtures + "/" + name
        let report = SnapshotReader.verify(directory: dir)
        #expect(report.ok, "\(report)")
        let snap = try SnapshotReader.open(directory: dir)
        let expected = try #require(Self.all.first { $0.0 == name }?.1)
        #expect("\(snap.header.formatMajor).\(snap.header.formatMinor)" == expected)
        #expect(snap.header.vcpuCount == 1 && snap.header.memorySize == 4 << 20)
        let vcpu = try snap.requireSection(named: "vcpu.0")
        let state = try vcpu.decode { (r: inout LEReader) throws(LEDecodeError) in try VCPUState(from: &r, version: vcpu.version) }
        #expect(state.regs.rip >= 0x100000 && state.regs.rip < 0x100000 + UInt64(SnapshotGuestTests.counter.count))
        let vm = try snap.requireSection(named: "vm")
        _ = try vm.decode { (r: inout LEReader) throws(LEDecodeError) in try VMState(from: &r, version: vm.version) }
        for section in ["dev.serial0", "dev.i8042", "dev.cmos", "dev.acpi-pm", "dev.fw-cfg", "dev.vmgenid", "config.fwcfg"] {
            #expect(snap.section(named: section) != nil, "\(section) missing")
        }
    }

    @Test("each fixture restores and the guest continues counting from the saved count",
          .enabled(if: kvmAvailable(), "needs /dev/kvm"), arguments: all.map(\.0))
    func restores(_ name: String) throws {
        let dir = Self.fixtures + "/" + name
        // The counter as saved, read straight from the memory file (guest RAM from address 0).
        let memory = try [UInt8](Data(contentsOf: URL(fileURLWithPath: dir + "/memory.bin")))
        let saved = memory[Int(SnapshotGuestTests.counterAddress.rawValue)]
        let console = RecordingConsole()
        let restored: Result<Machine, MachineError>
        do {
            var options = RestoreOptions(console: console, generationID: .new(VMGenID.randomGUID()))
            options.workingSet = false // the committed fixture is never written
            restored = .success(try Machine.restore(from: dir, options: options))
        } catch {
            restored = .failure(error)
        }
        if case .failure(.kvm(.incompatibleHost(let reason))) = restored, !Self.portable.contains(name) {
            // A host-model fixture on a host without one of its CPU's features: refused, naming it.
            #expect(reason.hasPrefix("vCPU 0 "), "\(reason)")
            #expect(reason.contains("CPUID 0x") || reason.contains("XSAVE component") || reason.contains("MSR 0x"), "\(reason)")
            return
        }
        let m = try restored.get()
        let wait = SnapshotGuestTests.start(m)
        #expect(SnapshotGuestTests.waitFor(console, bytes: 5))
        m.requestExit(.quit("test"))
        _ = wait()
        let out = console.output
        try #require(!out.isEmpty)
        // The snapshot was taken after an `out` was handled: the clone increments, then prints.
        #expect(out[0] == saved &+ 1, "first byte \(out[0]), saved count \(saved)")
        #expect(SnapshotGuestTests.countsUp(out, from: out[0]))
    }

    @Test("write a fixture (only with SWIFTVMM_WRITE_FIXTURE=DIR)",
          .enabled(if: ProcessInfo.processInfo.environment["SWIFTVMM_WRITE_FIXTURE"] != nil, "set SWIFTVMM_WRITE_FIXTURE=DIR to write one"))
    func writeFixture() throws {
        let dir = try #require(ProcessInfo.processInfo.environment["SWIFTVMM_WRITE_FIXTURE"])
        let console = RecordingConsole()
        // The baseline CPU model: a fixture must restore on every host CI may land on, whatever
        // CPU wrote it.
        var config = MachineConfig(memorySize: 4 << 20, console: console)
        config.cpuModel = .baseline
        let m = try Machine(config, boot: .program64(code: SnapshotGuestTests.counter, loadAddress: 0x100000))
        let wait = SnapshotGuestTests.start(m)
        #expect(SnapshotGuestTests.waitFor(console, bytes: 20))
        _ = try m.createSnapshot(at: dir)
        m.requestExit(.quit("fixture written"))
        _ = wait()
    }
}
