import Foundation
import Glibc
import Devices
import KVM
import Machine
import Snapshot
import Testing
import TestSupport
import WireFormat

/// `VCPUState.fitted(to:reference:vcpu:)` with made-up hosts: no /dev/kvm, and the same result on
/// every machine.
@Suite("a saved vCPU state fitted to the restoring host")
struct HostFitTests {
    static let pkruOffset = 0x980

    static func setU64(_ bytes: inout [UInt8], _ at: Int, _ v: UInt64) {
        for i in 0..<8 { bytes[at + i] = UInt8(truncatingIfNeeded: v >> (8 * UInt64(i))) }
    }
    static func u64(_ bytes: [UInt8], _ at: Int) -> UInt64 {
        (0..<8).reduce(UInt64(0)) { $0 | UInt64(bytes[at + $1]) << (8 * UInt64($1)) }
    }

    /// A host with x87, SSE and AVX (at 576) but no PKRU, MSRs 0x10 and 0x174.
    static func hostWithoutPKU(avxOffset: UInt32 = 576) -> HostCPU {
        HostCPU(supportedCPUID: [
            CPUIDEntry(function: 0xD, index: 0, eax: 0x7, ebx: 832, ecx: 832),
            CPUIDEntry(function: 0xD, index: 2, eax: 256, ebx: avxOffset),
        ], msrIndices: [0x10, 0x174], xsaveSize: 4096)
    }

    /// What a fresh vCPU gets on that host: SSE3, XSAVE, AVX; leaf 7 with AVX2 but neither PKU nor AVX-512.
    static let reference: [CPUIDEntry] = [
        CPUIDEntry(function: 0x1, ecx: 1 << 0 | 1 << 26 | 1 << 28, edx: 1 << 0),
        CPUIDEntry(function: 0x7, index: 0, ebx: 1 << 5),
        CPUIDEntry(function: 0xD, index: 0, eax: 0x7, ebx: 832, ecx: 832),
        CPUIDEntry(function: 0xD, index: 2, eax: 256, ebx: 576),
    ]

    /// A state saved on a host with PKU: XCR0 and XSTATE_BV hold x87, SSE, AVX and PKRU (`pkru`),
    /// CPUID announces PKU and component 9 at 0x980.
    static func savedWithPKRU(pkru: UInt32 = 0, avx: UInt8 = 0x5A) -> VCPUState {
        var s = VCPUState()
        s.xsave = [UInt8](repeating: 0, count: 4096)
        s.xsave[0] = 0x7F // x87 control word
        setU64(&s.xsave, 512, 0x207)
        for i in 0..<256 { s.xsave[576 + i] = avx }
        for i in 0..<4 { s.xsave[pkruOffset + i] = UInt8(truncatingIfNeeded: pkru >> (8 * UInt32(i))) }
        if pkru == 0 { setU64(&s.xsave, 512, 0x7) } // PKRU in its initial state: XSTATE_BV bit clear
        else { setU64(&s.xsave, 512, 0x207) }
        s.xcrs = [VCPUState.XCR(index: 0, value: 0x207)]
        s.msrs = [VCPUState.MSREntry(index: 0x10, value: 1234), VCPUState.MSREntry(index: 0x174, value: 0)]
        s.cpuid = [
            CPUIDEntry(function: 0x1, ecx: 1 << 0 | 1 << 26 | 1 << 27 | 1 << 28, edx: 1 << 0),
            CPUIDEntry(function: 0x7, index: 0, ebx: 1 << 5, ecx: 1 << 3 | 1 << 4),
            CPUIDEntry(function: 0xD, index: 0, eax: 0x207, ebx: 0x988, ecx: 0x988),
            CPUIDEntry(function: 0xD, index: 2, eax: 256, ebx: 576),
            CPUIDEntry(function: 0xD, index: 9, eax: 8, ebx: UInt32(pkruOffset)),
        ]
        return s
    }

    func refusal(_ body: () throws -> Void) -> String? {
        do { try body() } catch {
            if let e = error as? KVMError, case .incompatibleHost(let reason) = e { return reason }
            return "unexpected error \(error)"
        }
        return nil
    }

    @Test("PKRU in its initial state is dropped from XSTATE_BV, XCR0 and CPUID; the rest is kept")
    func pkruDropped() throws {
        let (s, notes) = try Self.savedWithPKRU().fitted(to: Self.hostWithoutPKU(), reference: Self.reference, vcpu: 0)
        #expect(Self.u64(s.xsave, 512) == 0x7)
        #expect(s.xcrs == [VCPUState.XCR(index: 0, value: 0x7)])
        let leaf7 = try #require(s.cpuid.first { $0.function == 7 })
        #expect(leaf7.ecx & (1 << 3) == 0 && leaf7.ecx & (1 << 4) == 0, "PKU and OSPKE cleared")
        #expect(leaf7.ebx == 1 << 5, "AVX2 kept")
        #expect(!s.cpuid.contains { $0.function == 0xD && $0.index == 9 })
        #expect(s.cpuid.first { $0.function == 0xD && $0.index == 0 }?.eax == 0x7)
        #expect(s.xsave[0] == 0x7F && s.xsave[576] == 0x5A && s.xsave[576 + 255] == 0x5A, "x87 and AVX state kept")
        #expect(s.msrs == Self.savedWithPKRU().msrs)
        #expect(notes.count == 1 && notes[0].contains("PKRU"))
    }

    @Test("PKRU in use, or CR4.PKE set, on a host without PKU is refused naming it")
    func pkruInUseRefused() {
        let used = refusal { _ = try Self.savedWithPKRU(pkru: 0x5555_5554).fitted(to: Self.hostWithoutPKU(), reference: Self.reference, vcpu: 3) }
        #expect(used == "vCPU 3 uses XSAVE component 9 (PKRU, protection keys), which this host's CPU does not support")
        var pke = Self.savedWithPKRU()
        pke.sregs.cr4 |= 1 << 22
        let cr4 = refusal { _ = try pke.fitted(to: Self.hostWithoutPKU(), reference: Self.reference, vcpu: 0) }
        #expect(cr4?.contains("CR4.PKE") == true && cr4?.contains("pku (CPUID 0x7.0 ECX bit 3)") == true, "\(cr4 ?? "accepted")")
    }

    @Test("a component at another offset on this host is moved there (the standard format's offsets come from CPUID 0xD)")
    func componentRelocated() throws {
        let (s, _) = try Self.savedWithPKRU().fitted(to: Self.hostWithoutPKU(avxOffset: 1024), reference: Self.reference, vcpu: 0)
        #expect(s.xsave[1024] == 0x5A && s.xsave[1024 + 255] == 0x5A)
        #expect(s.xsave[576] == 0, "nothing left at the old offset")
    }

    @Test("the area takes the host's size: a larger host gets zeros after, a smaller one keeps what fits")
    func areaSize() throws {
        var host = Self.hostWithoutPKU()
        host.xsaveSize = 8192
        #expect(try Self.savedWithPKRU().fitted(to: host, reference: Self.reference, vcpu: 0).state.xsave.count == 8192)
        var big = Self.savedWithPKRU()
        big.xsave += [UInt8](repeating: 0, count: 4096)
        #expect(try big.fitted(to: Self.hostWithoutPKU(), reference: Self.reference, vcpu: 0).state.xsave.count == 4096)
    }

    @Test("a CPU feature this host cannot give is refused by name; dynamic bits (OSXSAVE, OSPKE) are not features")
    func missingFeatureRefused() {
        var s = Self.savedWithPKRU()
        s.cpuid[1].ebx |= 1 << 16
        let r = refusal { _ = try s.fitted(to: Self.hostWithoutPKU(), reference: Self.reference, vcpu: 0) }
        #expect(r == "vCPU 0 was given the CPU feature avx512f (CPUID 0x7.0 EBX bit 16), which this host cannot give")
        s = Self.savedWithPKRU()
        s.cpuid[0].ecx |= 1 << 25
        #expect(refusal { _ = try s.fitted(to: Self.hostWithoutPKU(), reference: Self.reference, vcpu: 0) }?.contains("aes (CPUID 0x1.0 ECX bit 25)") == true)
    }

    @Test("an MSR this host's KVM lacks is dropped when 0 and refused otherwise")
    func missingMSR() throws {
        var s = Self.savedWithPKRU()
        s.msrs.append(VCPUState.MSREntry(index: 0xC001_0117, value: 0))
        let (fitted, notes) = try s.fitted(to: Self.hostWithoutPKU(), reference: Self.reference, vcpu: 0)
        #expect(fitted.msrs.map(\.index) == [0x10, 0x174])
        #expect(notes.contains { $0.contains("MSR 0xc0010117") })
        s.msrs[2].value = 5
        #expect(refusal { _ = try s.fitted(to: Self.hostWithoutPKU(), reference: Self.reference, vcpu: 0) }
                == "vCPU 0 has MSR 0xc0010117 = 0x5, which this host's KVM does not have")
    }

    @Test("a compacted area or a component outside the area is refused, never passed on")
    func malformedArea() {
        var s = Self.savedWithPKRU()
        Self.setU64(&s.xsave, 520, 1 << 63 | 0x7)
        #expect(refusal { _ = try s.fitted(to: Self.hostWithoutPKU(), reference: Self.reference, vcpu: 0) }?.contains("XCOMP_BV") == true)
        s = Self.savedWithPKRU()
        s.cpuid[3].ebx = 4000 // AVX at 4000 + 256 > 4096
        #expect(refusal { _ = try s.fitted(to: Self.hostWithoutPKU(), reference: Self.reference, vcpu: 0) }?.contains("outside its XSAVE area") == true)
        s = Self.savedWithPKRU()
        s.xsave = [UInt8](repeating: 0, count: 100)
        #expect(refusal { _ = try s.fitted(to: Self.hostWithoutPKU(), reference: Self.reference, vcpu: 0) } != nil)
    }

    @Test("fitting twice changes nothing more")
    func idempotent() throws {
        let once = try Self.savedWithPKRU().fitted(to: Self.hostWithoutPKU(), reference: Self.reference, vcpu: 0).state
        let twice = try once.fitted(to: Self.hostWithoutPKU(), reference: Self.reference, vcpu: 0)
        #expect(twice.state == once && twice.notes.isEmpty)
    }
}

/// The same on the real /dev/kvm: a snapshot of this host whose vCPU state claims a PKRU
/// component, as one written on a host with protection keys would.
@Suite("restoring a snapshot from a host with PKU", .enabled(if: kvmAvailable(), "needs /dev/kvm"))
struct ForeignXSAVERestoreTests {
    /// Rewrites vcpu.0 of the snapshot in `dir` to carry PKRU (value `pkru`) at 0x980.
    static func addPKRU(_ dir: String, pkru: UInt32) throws {
        try SectionVersionTests.rewrite(dir) { section in
            guard section.name == "vcpu.0" else { return }
            var r = LEReader(section.payload)
            guard var s = try? VCPUState(from: &r, version: 1) else { return }
            let bv = HostFitTests.u64(s.xsave, 512)
            HostFitTests.setU64(&s.xsave, 512, pkru == 0 ? bv : bv | 0x200)
            for i in 0..<4 { s.xsave[HostFitTests.pkruOffset + i] = UInt8(truncatingIfNeeded: pkru >> (8 * UInt32(i))) }
            s.xcrs = s.xcrs.map { $0.index == 0 ? VCPUState.XCR(index: 0, value: $0.value | 0x200) : $0 }
            s.cpuid = s.cpuid.filter { !($0.function == 0xD && $0.index == 9) }.map { e in
                var e = e
                if e.function == 0xD && e.index == 0 { e.eax |= 0x200 }
                if e.function == 0x7 && e.index == 0 { e.ecx |= 1 << 3 }
                return e
            } + [CPUIDEntry(function: 0xD, index: 9, eax: 8, ebx: UInt32(HostFitTests.pkruOffset))]
            var w = LEWriter()
            s.encode(to: &w)
            section.payload = w.bytes
        }
    }

    static func hostHasPKRU() throws -> Bool {
        let host = HostCPU(supportedCPUID: try KVMSystem().supportedCPUID(), msrIndices: [], xsaveSize: 4096)
        return host.supportedXCR0 & 0x200 != 0
    }

    @Test("PKRU = 0 restores on any host and the guest counts on (dropped where the host has no PKU)")
    func initialPKRURestores() throws {
        let (parent, dir) = try SectionVersionTests.counterSnapshot()
        defer { _ = runProcess(["rm", "-rf", parent]) }
        try Self.addPKRU(dir, pkru: 0)
        let out = try SectionVersionTests.restoreAndCount(dir)
        #expect(out.count >= 5 && SnapshotGuestTests.countsUp(out, from: out[0]))
    }

    @Test("PKRU in use is refused in one sentence naming it on a host without PKU (and restores on one with it)")
    func usedPKRU() throws {
        let (parent, dir) = try SectionVersionTests.counterSnapshot()
        defer { _ = runProcess(["rm", "-rf", parent]) }
        try Self.addPKRU(dir, pkru: 0x5555_5554)
        if try Self.hostHasPKRU() {
            let out = try SectionVersionTests.restoreAndCount(dir)
            #expect(out.count >= 5)
            return
        }
        do {
            _ = try Machine.restore(from: dir, options: RestoreOptions(console: RecordingConsole(), generationID: .keep))
            Issue.record("a PKRU in use was restored on a host without PKU")
        } catch {
            #expect("\(error)" == "this host cannot run the saved CPU state: vCPU 0 uses XSAVE component 9 (PKRU, protection keys), which this host's CPU does not support")
        }
    }
}

@Suite("the baseline CPU model", .enabled(if: kvmAvailable(), "needs /dev/kvm"))
struct BaselineModelTests {
    @Test("a baseline machine's snapshot offers only x86-64-v2 features, x87/SSE XSAVE state and architectural or KVM MSRs")
    func snapshotContents() throws {
        let dir = makeTemporaryDirectory("swiftvmm-baseline")
        defer { _ = runProcess(["rm", "-rf", dir]) }
        let console = RecordingConsole()
        var config = MachineConfig(memorySize: 16 << 20, cpus: 2, console: console)
        config.cpuModel = .baseline
        let m = try Machine(config, boot: .program64(code: SnapshotGuestTests.counter, loadAddress: 0x100000))
        let wait = SnapshotGuestTests.start(m)
        #expect(SnapshotGuestTests.waitFor(console, bytes: 5))
        _ = try m.createSnapshot(at: dir + "/snap")
        m.requestExit(.quit("test"))
        _ = wait()
        let snap = try SnapshotReader.open(directory: dir + "/snap")
        for i in 0..<2 {
            let section = try snap.requireSection(named: "vcpu.\(i)")
            let s = try section.decode { (r: inout LEReader) throws(LEDecodeError) in try VCPUState(from: &r, version: 1) }
            let leaf1 = try #require(s.cpuid.first { $0.function == 1 })
            // Leaf 1 ECX: SSE3 SSSE3 CX16 SSE4.1 SSE4.2 x2APIC POPCNT TSC-deadline XSAVE hypervisor, no more.
            #expect(leaf1.ecx & ~0x85B8_2201 == 0, "leaf 1 ECX \(String(leaf1.ecx, radix: 16))")
            #expect(leaf1.edx & (1 << 1) == 0, "no VME")
            #expect(s.cpuid.filter { $0.function == 7 }.allSatisfy { $0.ebx == 0 && $0.ecx == 0 && $0.edx == 0 })
            #expect(XSAVELayout.xcr0Mask(s.cpuid) == 0b11)
            #expect(!s.cpuid.contains { $0.function == 0xD && $0.index >= 2 })
            let ext = try #require(s.cpuid.first { $0.function == 0x8000_0001 })
            #expect(ext.ecx & ~1 == 0 && ext.edx & ~UInt32(1 << 11 | 1 << 20 | 1 << 29) == 0)
            let allowed: Set<UInt32> = [0x10, 0x11, 0x12, 0x3B, 0x174, 0x175, 0x176, 0x17A, 0x17B, 0x1A0, 0x277, 0x6E0,
                                        0xC000_0081, 0xC000_0082, 0xC000_0083, 0xC000_0084, 0xC000_0102]
            for msr in s.msrs {
                #expect(allowed.contains(msr.index) || msr.index >> 8 == 0x4B_564D, "MSR \(String(msr.index, radix: 16))")
            }
            #expect(s.msrs.contains { $0.index == 0x10 }, "the TSC is saved")
        }
        // And a clone of it saves the same MSRs again (it stays portable).
        let clone = try Machine.restore(from: dir + "/snap", options: RestoreOptions(console: RecordingConsole(), generationID: .keep))
        let cloneWait = SnapshotGuestTests.start(clone)
        usleep(100_000)
        _ = try clone.createSnapshot(at: dir + "/again")
        clone.requestExit(.quit("test"))
        _ = cloneWait()
        let first = try SnapshotReader.open(directory: dir + "/snap").requireSection(named: "vcpu.0")
        let second = try SnapshotReader.open(directory: dir + "/again").requireSection(named: "vcpu.0")
        let a = try first.decode { (r: inout LEReader) throws(LEDecodeError) in try VCPUState(from: &r, version: 1) }
        let b = try second.decode { (r: inout LEReader) throws(LEDecodeError) in try VCPUState(from: &r, version: 1) }
        #expect(a.msrs.map(\.index) == b.msrs.map(\.index))
        #expect(a.cpuid == b.cpuid)
    }
}
