import BootLoader
import Glibc
import Testing
import TestSupport

@Suite("bzImage parser")
struct BzImageTests {
    @Test("a well-formed image parses with every header field")
    func valid() throws {
        let image = try BzImage(syntheticBzImage())
        #expect(image.protocolVersion == 0x020F)
        #expect(image.setupSectors == 4)
        #expect(image.relocatable)
        #expect(image.kernelAlignment == 0x20_0000)
        #expect(image.initrdAddressMax == 0x7FFF_FFFF)
        #expect(image.commandLineSizeMax == 2048)
        #expect(image.preferredAddress == 0x100_0000)
        #expect(image.initSize == 0x0200_0000)
        #expect(image.protectedModeKernel.count == 4096)
        #expect(image.protectedModeKernel.first == 0)
        #expect(image.setupHeader.count == 0x26C - 0x1F1)
    }

    @Test("setup_sects = 0 means 4")
    func zeroSetupSects() throws {
        let bytes = syntheticBzImage(setupSects: 4) { $0[0x1F1] = 0 }
        #expect(try BzImage(bytes).setupSectors == 4)
    }

    @Test("the installed Debian kernel parses (the e2e tests boot it)")
    func realKernel() throws {
        let path = try #require(installedDebianKernel(), "no /boot/vmlinuz-*: install linux-image-amd64 (guest-tests/lib/deps.sh does)")
        let image = try BzImage(readWholeFile(path))
        #expect(image.protocolVersion >= 0x020F)
        #expect(image.xloadFlags & 1 == 1)
        #expect(image.relocatable)
        #expect(image.initSize > UInt32(image.protectedModeKernel.count))
    }

    @Test("refusals come as clear errors, never traps", arguments: [
        ("empty file", [UInt8](), BootError.tooSmall(size: 0)),
        ("truncated header", Array(syntheticBzImage().prefix(0x250)), BootError.tooSmall(size: 0x250)),
        ("wrong boot flag", syntheticBzImage { $0[0x1FE] = 0 }, BootError.badBootFlag(0xAA00)),
        ("wrong magic", syntheticBzImage { $0[0x202] = 0x41 }, BootError.notBzImage(magic: 0x5372_6441)),
        ("protocol 2.05", syntheticBzImage(version: 0x0205), BootError.protocolTooOld(version: 0x0205)),
        ("no 64-bit entry", syntheticBzImage(xloadflags: 0), BootError.not64Bit),
        ("zImage", syntheticBzImage(loadflags: 0), BootError.notLoadedHigh),
        ("setup past the end", syntheticBzImage(setupSects: 4, payload: 0) { $0[0x1F1] = 200 },
         BootError.truncated(expected: 201 * 512 + 1, actual: 5 * 512)),
        ("init_size 0", syntheticBzImage(initSize: 0), BootError.absurdField(name: "init_size", value: 0)),
        ("init_size 4 GiB", syntheticBzImage(initSize: 0xFFFF_FFFF), BootError.absurdField(name: "init_size", value: 0xFFFF_FFFF)),
        ("odd kernel_alignment", syntheticBzImage { $0[0x230] = 3 }, BootError.absurdField(name: "kernel_alignment", value: 0x20_0003)),
        ("huge cmdline_size", syntheticBzImage { $0[0x23B] = 0xFF }, BootError.absurdField(name: "cmdline_size", value: 0xFF00_0800)),
    ] as [(String, [UInt8], BootError)])
    func rejects(_ name: String, _ bytes: [UInt8], _ expected: BootError) {
        #expect(throws: expected, "\(name)") { try BzImage(bytes) }
        #expect(!expected.description.isEmpty)
    }

    @Test("random garbage is refused with a BootError, never accepted")
    func garbage() {
        var rng = SplitMix64(state: 0xB2_1A6E)
        for _ in 0..<500 {
            let bytes = (0..<Int.random(in: 0...4096, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) }
            // Typed throws: whatever is thrown is a BootError; a trap would end the test run.
            #expect(throws: BootError.self, "\(bytes.count) random bytes") { try BzImage(bytes) }
        }
    }

    @Test("every prefix of a valid image is refused as too small or truncated until the kernel starts")
    func truncatedPrefixes() throws {
        let bytes = syntheticBzImage(setupSects: 4, payload: 64)
        let kernelStart = 5 * 512
        for length in 0...bytes.count {
            let prefix = Array(bytes.prefix(length))
            if length < 0x290 {
                #expect(throws: BootError.tooSmall(size: length)) { try BzImage(prefix) }
            } else if length <= kernelStart {
                #expect(throws: BootError.truncated(expected: kernelStart + 1, actual: length)) { try BzImage(prefix) }
            } else {
                #expect(try BzImage(prefix).protectedModeKernel.count == length - kernelStart)
            }
        }
    }

    @Test("a valid header with one field corrupted (random values) is refused naming that field")
    func corruptedField() {
        var rng = SplitMix64(state: 0xF1E1D)
        func put(_ value: UInt64, at offset: Int, size: Int) -> [UInt8] {
            syntheticBzImage { b in for i in 0..<size { b[offset + i] = UInt8(truncatingIfNeeded: value >> (8 * i)) } }
        }
        for _ in 0..<200 {
            var flag: UInt16 = 0xAA55
            while flag == 0xAA55 { flag = .random(in: 0...0xFFFF, using: &rng) }
            #expect(throws: BootError.badBootFlag(flag)) { try BzImage(put(UInt64(flag), at: 0x1FE, size: 2)) }

            var magic: UInt32 = 0x5372_6448
            while magic == 0x5372_6448 { magic = .random(in: 0...0xFFFF_FFFF, using: &rng) }
            #expect(throws: BootError.notBzImage(magic: magic)) { try BzImage(put(UInt64(magic), at: 0x202, size: 4)) }

            let version = UInt16.random(in: 0..<0x020C, using: &rng)
            #expect(throws: BootError.protocolTooOld(version: version)) { try BzImage(put(UInt64(version), at: 0x206, size: 2)) }

            let loadflags = UInt8.random(in: 0...255, using: &rng) & ~1
            #expect(throws: BootError.notLoadedHigh) { try BzImage(put(UInt64(loadflags), at: 0x211, size: 1)) }

            let xloadflags = UInt16.random(in: 0...0xFFFF, using: &rng) & ~1
            #expect(throws: BootError.not64Bit) { try BzImage(put(UInt64(xloadflags), at: 0x236, size: 2)) }

            // Not a power of two (at least two bits set), or a power of two above 1 GiB.
            let alignment = Bool.random(using: &rng)
                ? UInt32.random(in: 0...0xFFFF_FFFF, using: &rng) | 0x3 << UInt32.random(in: 0...30, using: &rng)
                : UInt32(1) << 31
            #expect(throws: BootError.absurdField(name: "kernel_alignment", value: UInt64(alignment))) {
                try BzImage(put(UInt64(alignment), at: 0x230, size: 4))
            }

            let cmdline = UInt32.random(in: (1 << 20 + 1)...0xFFFF_FFFF, using: &rng)
            #expect(throws: BootError.absurdField(name: "cmdline_size", value: UInt64(cmdline))) {
                try BzImage(put(UInt64(cmdline), at: 0x238, size: 4))
            }

            let pref = Bool.random(using: &rng) ? UInt64.random(in: 0..<0x100000, using: &rng)
                                                : UInt64.random(in: (1 << 46)...UInt64.max, using: &rng)
            #expect(throws: BootError.absurdField(name: "pref_address", value: pref)) {
                try BzImage(put(pref, at: 0x258, size: 8))
            }

            let initSize = Bool.random(using: &rng) ? 0 : UInt32.random(in: (1 << 30 + 1)...0xFFFF_FFFF, using: &rng)
            #expect(throws: BootError.absurdField(name: "init_size", value: UInt64(initSize))) {
                try BzImage(put(UInt64(initSize), at: 0x260, size: 4))
            }
        }
    }

    @Test("random changes to the setup header are refused with a BootError or parse to what the bytes say")
    func mutatedHeader() {
        var rng = SplitMix64(state: 0x5E7_0B)
        var accepted = 0, refused = 0
        for _ in 0..<1000 {
            var bytes = syntheticBzImage()
            for _ in 0..<Int.random(in: 1...8, using: &rng) {
                bytes[Int.random(in: 0x1F0..<0x270, using: &rng)] = UInt8.random(in: 0...255, using: &rng)
            }
            do {
                let image = try BzImage(bytes)
                accepted += 1
                let sects = bytes[0x1F1] == 0 ? 4 : Int(bytes[0x1F1])
                #expect(image.setupSectors == sects)
                #expect(image.protectedModeKernel.count == bytes.count - (sects + 1) * 512)
                #expect(image.protocolVersion >= BzImage.minimumProtocol)
                #expect(image.loadFlags & 1 == 1 && image.xloadFlags & 1 == 1)
                #expect(image.initSize > 0 && image.initSize <= 1 << 30)
                #expect(image.commandLineSizeMax <= 1 << 20)
                #expect(image.preferredAddress >= 0x100000 && image.preferredAddress < 1 << 46)
                #expect(image.kernelAlignment == 0 || image.kernelAlignment.nonzeroBitCount == 1)
            } catch {
                refused += 1
                #expect(!error.description.isEmpty)
            }
        }
        // Both paths are exercised (a seeded generator: the same split every run).
        #expect(accepted > 0 && refused > 0)
    }
}


func readWholeFile(_ path: String) throws -> [UInt8] {
    guard let f = fopen(path, "rb") else { throw BootError.tooSmall(size: -1) }
    defer { fclose(f) }
    var out: [UInt8] = []
    var buf = [UInt8](repeating: 0, count: 1 << 16)
    while true {
        let n = fread(&buf, 1, buf.count, f)
        if n == 0 { break }
        out += buf[0..<n]
    }
    return out
}
