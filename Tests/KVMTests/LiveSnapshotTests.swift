import Glibc
@testable import Machine
import Snapshot
import Testing
import TestSupport
import VMMCore
import VMMSys

/// Live snapshots (`createSnapshot(live: true)`) on the real /dev/kvm: the guest is paused only
/// while its state is saved, and the image is memory at that one instant although the guest
/// rewrites memory at full speed while it is written.
@Suite("KVM live snapshots", .enabled(if: kvmAvailable(), "needs /dev/kvm"))
struct LiveSnapshotTests {
    /// The buffer sits past 40 MiB of other data, so that memory is still being written when the
    /// guest runs again (written in address order, the buffer comes last).
    static let buffer: UInt64 = 0x3000000
    static let words: UInt32 = 1 << 17 // 1 MiB

    /// Rewrites a 1 MiB buffer over and over, always writing. Pass g (rbx) takes every word,
    /// checks that it holds g-1 (what the pass before wrote), and writes g; then it prints g's low
    /// byte on COM1. A word that does not hold g-1 prints "!" and stops. At any instant the buffer
    /// is words [0, rcx) = g and [rcx, N) = g-1 (word rcx itself is g between the store at +21 and
    /// the inc at +29), which the test checks against the saved registers; a clone restored from
    /// memory of another instant than its registers also prints "!".
    ///
    ///     outer:  inc rbx ; xor ecx, ecx
    ///     loop:   mov rax, [rcx*8 + buffer] ; inc rax ; cmp rax, rbx ; jne bad
    ///             mov [rcx*8 + buffer], rbx ; inc rcx ; cmp rcx, N ; jb loop
    ///             mov al, bl ; mov dx, 0x3f8 ; out dx, al ; jmp outer
    ///     bad:    mov al, '!' ; mov dx, 0x3f8 ; out dx, al ; jmp $
    static var rewriter: [UInt8] {
        let n = withUnsafeBytes(of: words.littleEndian) { Array($0) }
        let b = withUnsafeBytes(of: UInt32(buffer).littleEndian) { Array($0) }
        return [0x48, 0xFF, 0xC3, 0x31, 0xC9,
                0x48, 0x8B, 0x04, 0xCD] + b + [0x48, 0xFF, 0xC0, 0x48, 0x39, 0xD8, 0x75, 0x1D,
                0x48, 0x89, 0x1C, 0xCD] + b + [0x48, 0xFF, 0xC1, 0x48, 0x81, 0xF9] + n + [0x72, 0xDC,
                0x88, 0xD8, 0x66, 0xBA, 0xF8, 0x03, 0xEE, 0xEB, 0xCE,
                0xB0, 0x21, 0x66, 0xBA, 0xF8, 0x03, 0xEE, 0xEB, 0xFE]
    }

    /// What word `k` of the buffer holds when the vCPU has these registers.
    static func expectedWord(_ k: Int, rip: UInt64, rbx: UInt64, rcx: UInt64) -> UInt64 {
        let offset = rip &- 0x100000
        if offset == 3 { return rbx &- 1 } // after inc rbx, before xor ecx: rcx is still N
        let written = UInt64(k) < rcx || (UInt64(k) == rcx && offset == 29) // stored, rcx not yet incremented
        return written ? rbx : rbx &- 1
    }

    /// A 64 MiB machine running `rewriter`.
    static func rewriterMachine(_ console: RecordingConsole) throws -> Machine {
        try Machine(MachineConfig(memorySize: 64 << 20, console: console), boot: .program64(code: rewriter, loadAddress: 0x100000))
    }

    static func wait(_ console: RecordingConsole, for count: Int, seconds: Int = 60) -> Bool {
        SnapshotGuestTests.waitFor(console, bytes: count, seconds: seconds)
    }

    @Test("a live snapshot pauses the guest for milliseconds; its clone continues consistently, a damaged copy is caught")
    func liveSnapshotIsOneInstant() throws {
        let dir = makeTemporaryDirectory("swiftvmm-live")
        defer { _ = runProcess(["rm", "-rf", dir]) }
        let console = RecordingConsole()
        let original = try Self.rewriterMachine(console)
        var filler = SplitMix64(state: 1)
        let fillWords = Int(Self.buffer - 0x800000) / 8
        let fill = try original.memory.hostPointer(GuestAddress(0x800000), length: UInt64(fillWords * 8))
            .bindMemory(to: UInt64.self, capacity: fillWords)
        for i in 0..<fillWords { fill[i] = filler.next() | 1 }
        let waitOriginal = SnapshotGuestTests.start(original)
        #expect(Self.wait(console, for: 3))
        let summary = try original.createSnapshot(at: dir + "/live", live: true)
        #expect(summary.wasRunning && !original.isPaused)
        // The pause covers saving the vCPU and device state and the fork, not writing memory.
        #expect(summary.pause < summary.result.duration)
        #expect(summary.pause < .milliseconds(500), "paused \(summary.pause)")
        print("live snapshot: guest paused \(summary.pause), write \(summary.result.duration)")
        let printedAfter = console.output.count
        #expect(Self.wait(console, for: printedAfter + 3), "the original runs on")
        original.requestExit(.quit("test"))
        _ = waitOriginal()
        #expect(!console.output.contains(UInt8(ascii: "!")))
        #expect(SnapshotReader.verify(directory: dir + "/live").ok)

        // The clone starts from the instant of the pause and finds the buffer as it left it: the
        // saved registers and the saved buffer agree word for word (a later word in the image,
        // even one the guest would write again with the same value, is caught here).
        let c1 = RecordingConsole()
        let clone = try Machine.restore(from: dir + "/live", options: RestoreOptions(console: c1, generationID: .keep))
        let regs = try clone.vcpus[0].getRegisters()
        let pass = regs.rbx, at = Int(regs.rcx)
        var mismatches = 0
        for k in 0..<Int(Self.words) {
            let expected = Self.expectedWord(k, rip: regs.rip, rbx: regs.rbx, rcx: regs.rcx)
            if try clone.memory.read(UInt64.self, at: GuestAddress(Self.buffer + UInt64(8 * k))) != expected { mismatches += 1 }
        }
        #expect(mismatches == 0, "\(mismatches) words differ from pass \(pass) at word \(at) (rip \(String(regs.rip, radix: 16)))")
        let waitClone = SnapshotGuestTests.start(clone)
        #expect(Self.wait(c1, for: 3))
        clone.requestExit(.quit("test"))
        _ = waitClone()
        let out = c1.output
        #expect(!out.contains(UInt8(ascii: "!")), "the clone found a buffer from another instant: \(out.prefix(20))")
        try #require(!out.isEmpty)
        #expect(SnapshotGuestTests.countsUp(out, from: out[0]))
        #expect(console.output.contains(out[0] &- 1), "the clone continues a pass the original printed")

        // The check can fail: a copy whose buffer holds words from another pass makes the clone say so.
        // (The first and the last word: whatever loop the snapshot caught the guest in, one of
        // them is checked before it is rewritten, unless the pause fell on the very first write.)
        _ = runProcess(["cp", "-r", dir + "/live", dir + "/torn"])
        let fd = open(dir + "/torn/memory.bin", O_RDWR)
        try #require(fd >= 0)
        for index in [0, Int(Self.words) - 1] {
            var word: UInt64 = 0
            let at = off_t(Self.buffer) + off_t(8 * index)
            #expect(pread(fd, &word, 8, at) == 8)
            word &+= 7
            #expect(pwrite(fd, &word, 8, at) == 8)
        }
        close(fd)
        let c2 = RecordingConsole()
        let torn = try Machine.restore(from: dir + "/torn", options: RestoreOptions(console: c2, generationID: .keep))
        let waitTorn = SnapshotGuestTests.start(torn)
        var caught = false
        for _ in 0..<2000 where !caught {
            caught = c2.output.contains(UInt8(ascii: "!"))
            usleep(5000)
        }
        torn.requestExit(.quit("test"))
        _ = waitTorn()
        #expect(caught, "the guest notices a word from another pass: \(c2.output.prefix(20))")
    }

    @Test("without live, the guest stays paused for the whole write; a paused VM stays paused either way")
    func pauseCoversTheWrite() throws {
        let dir = makeTemporaryDirectory("swiftvmm-live2")
        defer { _ = runProcess(["rm", "-rf", dir]) }
        let console = RecordingConsole()
        let m = try Self.rewriterMachine(console)
        let waitM = SnapshotGuestTests.start(m)
        #expect(Self.wait(console, for: 2))
        let still = try m.createSnapshot(at: dir + "/still")
        #expect(still.pause >= still.result.duration, "paused \(still.pause) for a write of \(still.result.duration)")
        m.pause()
        let printed = console.output.count
        let paused = try m.createSnapshot(at: dir + "/paused", live: true)
        #expect(m.isPaused && paused.pause == .zero && !paused.wasRunning)
        usleep(100_000)
        #expect(console.output.count == printed, "nothing ran")
        m.requestExit(.quit("test"))
        _ = waitM()
        #expect(SnapshotReader.verify(directory: dir + "/paused").ok)
    }
}

@Suite("KVM restore working set", .enabled(if: kvmAvailable(), "needs /dev/kvm"))
struct WorkingSetGuestTests {
    @Test("the first restore records the pages its guest touched; later restores bring the recorded pages in ahead of the guest")
    func recordThenPrefetch() throws {
        let dir = makeTemporaryDirectory("swiftvmm-ws")
        defer { _ = runProcess(["rm", "-rf", dir]) }
        let console = RecordingConsole()
        let original = try Machine(MachineConfig(memorySize: 16 << 20, console: console),
                                   boot: .program64(code: SnapshotGuestTests.counter, loadAddress: 0x100000))
        // A page of data the counting guest never touches.
        try original.memory.write(UInt64(0x1234_5678), at: GuestAddress(0xA00000))
        let wait = SnapshotGuestTests.start(original)
        #expect(SnapshotGuestTests.waitFor(console, bytes: 5))
        _ = try original.createSnapshot(at: dir + "/snap")
        original.requestExit(.quit("test"))
        _ = wait()
        #expect(try WorkingSet.load(directory: dir + "/snap", memoryLength: 16 << 20) == nil, "a booted VM's snapshot has none yet")

        // First restore: runs past the recording window, then the file is there.
        let c1 = RecordingConsole()
        let first = try Machine.restore(from: dir + "/snap", options: RestoreOptions(console: c1, generationID: .keep))
        let wait1 = SnapshotGuestTests.start(first)
        var runs: [WorkingSet.Run]? = nil
        for _ in 0..<600 where runs == nil {
            usleep(10_000)
            runs = try WorkingSet.load(directory: dir + "/snap", memoryLength: 16 << 20)
        }
        first.requestExit(.quit("test"))
        _ = wait1()
        let recorded = try #require(runs)
        func contains(_ runs: [WorkingSet.Run], _ address: UInt64) -> Bool {
            runs.contains { $0.firstPage <= address / 4096 && address / 4096 < $0.firstPage + UInt64($0.pages) }
        }
        #expect(contains(recorded, 0x100000) && contains(recorded, 0x200000), "the program's and the counter's pages: \(recorded)")
        #expect(!contains(recorded, 0xA00000), "a page the guest never touched is not in it")
        #expect(SnapshotReader.verify(directory: dir + "/snap").ok, "the snapshot itself is unchanged")

        // A restore that stays paused (restore --paused) records nothing: only running time counts.
        copyWithoutWorkingSet(dir + "/snap", to: dir + "/idle")
        let idle = try Machine.restore(from: dir + "/idle", options: RestoreOptions(console: RecordingConsole(), generationID: .keep))
        idle.pause()
        let waitIdle = SnapshotGuestTests.start(idle)
        usleep(1_500_000)
        idle.requestExit(.quit("test"))
        _ = waitIdle()
        #expect(try WorkingSet.load(directory: dir + "/idle", memoryLength: 16 << 20) == nil, "a paused guest's working set is not recorded")

        // A working set naming the untouched page: a restore maps it in without the guest touching it.
        copyWithoutWorkingSet(dir + "/snap", to: dir + "/snap2")
        try WorkingSet.store(recorded + [.init(firstPage: 0xA00000 / 4096, pages: 1)], directory: dir + "/snap2", memoryLength: 16 << 20)
        let c2 = RecordingConsole()
        let second = try Machine.restore(from: dir + "/snap2", options: RestoreOptions(console: c2, generationID: .keep))
        let wait2 = SnapshotGuestTests.start(second)
        #expect(SnapshotGuestTests.waitFor(c2, bytes: 5))
        var mapped = false
        for _ in 0..<300 where !mapped {
            let base = try second.memory.hostPointer(GuestAddress(0xA00000), length: 4096)
            mapped = (pagemapEntries(base: base, pages: 1)?.first ?? 0) >> 63 & 1 == 1
            if !mapped { usleep(10_000) }
        }
        second.requestExit(.quit("test"))
        _ = wait2()
        #expect(mapped, "the recorded page was brought in")
        #expect(SnapshotGuestTests.countsUp(c2.output, from: c2.output.first ?? 0))
    }
}

/// A copy of a snapshot directory without its recorded working set.
private func copyWithoutWorkingSet(_ snapshot: String, to copy: String) {
    _ = runProcess(["cp", "-r", snapshot, copy])
    _ = runProcess(["rm", "-f", copy + "/" + WorkingSet.fileName])
}
