import Foundation
import Glibc
import Devices
import KVM
import Machine
import Snapshot
import Testing
import TestSupport
import VMMSys

/// Guest memory has an upper bound, checked before anything is mapped.
@Suite("guest memory limits")
struct MachineLimitsTests {
    @Test("sizes within the bounds pass; too small, unaligned, over the maximum or over the host's RAM are refused")
    func memorySizeRule() {
        let host: UInt64 = 16 << 30
        #expect(MachineConfig.memorySizeProblem(256 << 20, hostMemory: host) == nil)
        #expect(MachineConfig.memorySizeProblem(16 << 30, hostMemory: host) == nil)
        #expect(MachineConfig.memorySizeProblem(1 << 20, hostMemory: host)?.contains("at least 2 MiB") == true)
        #expect(MachineConfig.memorySizeProblem((256 << 20) + 512, hostMemory: host)?.contains("multiple of 4 KiB") == true)
        #expect(MachineConfig.memorySizeProblem(17 << 30, hostMemory: host) == "guest memory of 17 GiB is more than this host's 16384 MiB of RAM")
        #expect(MachineConfig.memorySizeProblem(4096 << 30, hostMemory: UInt64.max) == "guest memory of 4096 GiB is more than the maximum of 1024 GiB")
        #expect(MachineConfig.memorySizeProblem(4096 << 30, hostMemory: nil)?.contains("maximum") == true)
        let real = hostPhysicalMemory()
        #expect(real != nil && real! > 64 << 20, "sysinfo reports the host's RAM")
    }

    @Test("a machine bigger than the host's RAM is refused at once, before any mapping",
          .enabled(if: kvmAvailable(), "needs /dev/kvm"))
    func bootTooLarge() throws {
        let start = monotonicMilliseconds()
        #expect(throws: MachineError.self) {
            _ = try Machine(MachineConfig(memorySize: 4096 << 30, console: RecordingConsole()),
                            boot: .program64(code: [0xF4], loadAddress: 0x100000))
        }
        #expect(monotonicMilliseconds() - start < 2000)
        do {
            _ = try Machine(MachineConfig(memorySize: 4096 << 30, console: RecordingConsole()),
                            boot: .program64(code: [0xF4], loadAddress: 0x100000))
        } catch {
            #expect("\(error)".contains("guest memory of 4096 GiB is more than"), "\(error)")
        }
    }

    @Test("a snapshot whose header claims 1 TiB (with a sparse memory.bin to match) is refused before mapping",
          .enabled(if: kvmAvailable(), "needs /dev/kvm"))
    func restoreTooLarge() throws {
        let dir = makeTemporaryDirectory("swiftvmm-limits")
        defer { _ = runProcess(["rm", "-rf", dir]) }
        let fixture = try SnapshotReader.open(directory: SnapshotFixtureTests.fixtures + "/v1.0-counter")
        var header = fixture.header
        header.memorySize = 1 << 40
        header.memoryFileLength = 1 << 40
        header.memoryCRC32C = nil
        let state = try SnapshotFormat.encodeState(header: header, sections: fixture.sections)
        try Data(state).write(to: URL(fileURLWithPath: dir + "/state.bin"))
        let fd = open(dir + "/memory.bin", O_WRONLY | O_CREAT | O_CLOEXEC, 0o600)
        try #require(fd >= 0)
        try #require(ftruncate(fd, 1 << 40) == 0, "the file system takes a sparse 1 TiB file")
        close(fd)
        let start = monotonicMilliseconds()
        do {
            _ = try Machine.restore(from: dir, options: RestoreOptions(console: RecordingConsole(), generationID: .keep))
            Issue.record("a 1 TiB snapshot was restored")
        } catch {
            #expect("\(error)".contains("guest memory of 1024 GiB is more than"), "\(error)")
        }
        #expect(monotonicMilliseconds() - start < 2000)
    }
}
