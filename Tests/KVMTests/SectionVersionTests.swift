import Foundation
import Glibc
import Devices
import KVM
import Machine
import Snapshot
import Testing
import TestSupport
import WireFormat

/// One compatibility rule for every section (docs/snapshot-format.md): a payload of a newer layout
/// whose minimum version this build meets loads as this build's layout, its trailing bytes ignored;
/// trailing bytes after a layout this build knows completely are refused.
@Suite("snapshot sections: one version rule for vCPU, VM, device and configuration sections",
       .enabled(if: kvmAvailable(), "needs /dev/kvm"))
struct SectionVersionTests {
    /// A snapshot of the running counting guest in a new temporary directory.
    static func counterSnapshot() throws -> (parent: String, dir: String) {
        let parent = makeTemporaryDirectory("swiftvmm-sectionversion")
        let console = RecordingConsole()
        let m = try Machine(MachineConfig(memorySize: 16 << 20, console: console),
                            boot: .program64(code: SnapshotGuestTests.counter, loadAddress: 0x100000))
        let wait = SnapshotGuestTests.start(m)
        #expect(SnapshotGuestTests.waitFor(console, bytes: 10))
        _ = try m.createSnapshot(at: parent + "/snap")
        m.requestExit(.quit("test"))
        _ = wait()
        return (parent, parent + "/snap")
    }

    /// Rewrites `dir`'s state.bin with `change` applied to every section (checksums recomputed).
    static func rewrite(_ dir: String, _ change: (inout SnapshotSection) -> Void) throws {
        let snap = try SnapshotReader.open(directory: dir)
        var sections = snap.sections
        for i in sections.indices { change(&sections[i]) }
        let state = try SnapshotFormat.encodeState(header: snap.header, sections: sections)
        try Data(state).write(to: URL(fileURLWithPath: dir + "/state.bin"))
    }

    static func restoreAndCount(_ dir: String) throws -> [UInt8] {
        let console = RecordingConsole()
        let m = try Machine.restore(from: dir, options: RestoreOptions(console: console, generationID: .keep))
        let wait = SnapshotGuestTests.start(m)
        #expect(SnapshotGuestTests.waitFor(console, bytes: 5))
        m.requestExit(.quit("test"))
        _ = wait()
        return console.output
    }

    @Test("every section written one version newer than this build's, minimum 1, with 16 more bytes, restores as this build's layout and the guest counts on")
    func newerCompatibleLoads() throws {
        let (parent, dir) = try Self.counterSnapshot()
        defer { _ = runProcess(["rm", "-rf", parent]) }
        try Self.rewrite(dir) { s in
            s.version += 1
            s.minimumVersion = 1
            s.payload += [UInt8](repeating: 0xA5, count: 16)
        }
        let out = try Self.restoreAndCount(dir)
        #expect(out.count >= 5 && SnapshotGuestTests.countsUp(out, from: out[0]))
    }

    @Test("a payload of the layout this build writes, with one junk byte after it, is refused, for each section", arguments: [
        "vcpu.0", "vm", "config.fwcfg", "dev.serial0", "dev.fw-cfg", "dev.vmgenid",
    ])
    func junkAfterKnownLayoutRefused(_ name: String) throws {
        let (parent, dir) = try Self.counterSnapshot()
        defer { _ = runProcess(["rm", "-rf", parent]) }
        try Self.rewrite(dir) { s in if s.name == name { s.payload.append(0) } }
        do {
            _ = try Machine.restore(from: dir, options: RestoreOptions(console: RecordingConsole(), generationID: .keep))
            Issue.record("a \(name) payload with a junk byte was restored")
        } catch {
            #expect("\(error)".contains("section \"\(name)\""), "\(error)")
            #expect("\(error)".contains("1 unexpected bytes after the last field of a version-"), "\(error)")
        }
    }

    @Test("the rule itself: too old refused, newer decoded as the current layout, trailing bytes by version")
    func ruleItself() throws {
        func decode(_ payload: [UInt8], version: UInt16) throws(LEDecodeError) -> UInt16 {
            try VersionedPayload.decode(payload, version: version, current: 2, oldest: 2, name: "x") { r, v throws(LEDecodeError) in
                _ = try r.u8("x.a")
                return v
            }
        }
        #expect(throws: LEDecodeError.self) { try decode([1], version: 1) }
        #expect(try decode([1], version: 2) == 2)
        #expect(throws: LEDecodeError.self) { try decode([1, 2], version: 2) }
        #expect(try decode([1, 2, 3], version: 7) == 2)
    }
}
