import FuzzEntries
import Glibc
import Testing
import TestSupport

/// The libFuzzer entries (Fuzz/) run here on seeded random inputs and on the checked-in seed corpora,
/// so that `swift test` catches an entry that traps on ordinary input or has stopped building. (The
/// device-model entries, `fwCfgDMA`, `tableLoader` and `deviceState`, have their smoke tests next to
/// their devices in DevicesTests.)
@Suite("fuzz entries: seeded inputs and the seed corpora")
struct FuzzEntriesTests {
    static func random(_ rng: inout SplitMix64, maxCount: Int) -> [UInt8] {
        (0..<Int.random(in: 0...maxCount, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) }
    }

    /// The files of Fuzz/corpus/NAME (empty if the directory is missing).
    static func corpus(_ name: String) -> [[UInt8]] {
        let root = String(#filePath.split(separator: "/").dropLast(3).joined(separator: "/"))
        let dir = "/" + root + "/Fuzz/corpus/" + name
        guard let d = opendir(dir) else { return [] }
        defer { closedir(d) }
        var inputs: [[UInt8]] = []
        while let entry = readdir(d) {
            let file = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            guard !file.hasPrefix("."), let f = fopen(dir + "/" + file, "rb") else { continue }
            defer { fclose(f) }
            var bytes: [UInt8] = []
            var buffer = [UInt8](repeating: 0, count: 1 << 16)
            while case let n = fread(&buffer, 1, buffer.count, f), n > 0 { bytes += buffer[0..<n] }
            inputs.append(bytes)
        }
        return inputs
    }

    @Test("the seed corpora are there and run through their entries", arguments: ["fuzz-bzimage", "fuzz-snapshot", "fuzz-device-state", "fuzz-qmp-commands", "fuzz-qmp-stream",
                                                                   "fuzz-fwcfg-dma", "fuzz-kvm-state", "fuzz-table-loader", "fuzz-tpm-state", "fuzz-tpm-tis"])
    func seedCorpus(name: String) {
        let inputs = Self.corpus(name)
        #expect(!inputs.isEmpty, "Fuzz/corpus/\(name) is empty or missing")
        for input in inputs {
            switch name {
            case "fuzz-bzimage": Fuzz.bzImage(input)
            case "fuzz-snapshot": Fuzz.snapshotState(input)
            case "fuzz-qmp-commands": Fuzz.qmpCommands(input)
            case "fuzz-qmp-stream": Fuzz.qmpStream(input)
            case "fuzz-fwcfg-dma": Fuzz.fwCfgDMA(input)
            case "fuzz-kvm-state": Fuzz.kvmState(input)
            case "fuzz-table-loader": Fuzz.tableLoader(input)
            case "fuzz-tpm-state": Fuzz.tpmState(input)
            case "fuzz-tpm-tis": Fuzz.tpmTIS(input)
            default: Fuzz.deviceState(input)
            }
        }
    }

    @Test("bzImage: thousands of seeded random inputs, and each corpus image with random bytes changed")
    func bzImage() {
        var rng = SplitMix64(state: 0xB21)
        for _ in 0..<2000 { Fuzz.bzImage(Self.random(&rng, maxCount: 2048)) }
        for image in Self.corpus("fuzz-bzimage") where !image.isEmpty {
            for _ in 0..<300 {
                var bytes = image
                for _ in 0..<4 { bytes[Int.random(in: 0..<min(bytes.count, 0x290), using: &rng)] = .random(in: 0...255, using: &rng) }
                Fuzz.bzImage(bytes)
            }
        }
    }

    @Test("snapshot state.bin: seeded random inputs, and each corpus file with random bytes changed")
    func snapshotState() {
        var rng = SplitMix64(state: 0x5A7)
        for _ in 0..<2000 { Fuzz.snapshotState(Self.random(&rng, maxCount: 1024)) }
        for file in Self.corpus("fuzz-snapshot") where !file.isEmpty {
            for _ in 0..<300 {
                var bytes = file
                for _ in 0..<3 { bytes[Int.random(in: 0..<bytes.count, using: &rng)] = .random(in: 0...255, using: &rng) }
                Fuzz.snapshotState(bytes)
            }
        }
    }

    @Test("vCPU and VM state payloads: seeded random inputs of every selector")
    func kvmState() {
        var rng = SplitMix64(state: 0xC0DE)
        for i in 0..<3000 { Fuzz.kvmState([UInt8(truncatingIfNeeded: i)] + Self.random(&rng, maxCount: 6000)) }
    }

    @Test("QMP commands: the corpus's requests with seeded mutations, and random bytes, through the command table")
    func qmpCommands() {
        var rng = SplitMix64(state: 0xC0C0)
        for _ in 0..<300 { Fuzz.qmpCommands(Self.random(&rng, maxCount: 300)) }
        for input in Self.corpus("fuzz-qmp-commands") {
            for _ in 0..<40 {
                var mutated = input
                for _ in 0..<3 { mutated[Int.random(in: 0..<mutated.count, using: &rng)] = UInt8.random(in: 0...255, using: &rng) }
                Fuzz.qmpCommands(mutated)
            }
        }
    }

    @Test("QMP stream: seeded random inputs and JSON-looking streams, cut at seeded points")
    func qmpStream() {
        var rng = SplitMix64(state: 0x9A9)
        for _ in 0..<2000 { Fuzz.qmpStream(Self.random(&rng, maxCount: 600)) }
        let pieces = Array(#"{"execute": "qmp_capabilities", "arguments": {"a": [1, 2.5, "x\n", true, null]}} "#.utf8)
        for seed in 0..<256 {
            var stream = [UInt8(seed)]
            for _ in 0..<4 { stream += pieces.shuffled(using: &rng).prefix(Int.random(in: 0...pieces.count, using: &rng)) + pieces }
            Fuzz.qmpStream(stream)
        }
    }
}

@Suite("fuzz entries: the TPM")
struct TPMFuzzEntriesTests {
    @Test("TIS: seeded random register programs, and a real command cycle, never break its invariants")
    func tis() {
        var rng = SplitMix64(state: 0x7115)
        for _ in 0..<3000 { Fuzz.tpmTIS(FuzzEntriesTests.random(&rng, maxCount: 400)) }
        // A guest that does it right: locality, commandReady, a 12-byte command, go, a response, reads.
        var program: [UInt8] = [255, 1, 0x00, 0x00, 0x02, 5, 0x18, 0x00, 0x40]
        for b in [0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x7B, 0, 16] as [UInt8] { program += [1, 0x24, 0x00, b] }
        program += [5, 0x18, 0x00, 0x20, 2, 0, 0, 3] + [0x80, 0x01, 0, 0, 0, 12, 0, 0, 0, 0, 0, 0]
        program += [3, 0, 0, 0] + (0..<12).flatMap { _ in [0, 0x24, 0x00, 0] as [UInt8] } + [3, 0, 0, 0]
        Fuzz.tpmTIS(program)
        for _ in 0..<500 {
            var p = program
            for _ in 0..<3 { p[Int.random(in: 1..<p.count, using: &rng)] = .random(in: 0...255, using: &rng) }
            Fuzz.tpmTIS(p)
        }
    }

    @Test("TPM state file: random files, and damaged real ones, never trap")
    func stateFile() {
        var rng = SplitMix64(state: 0x57A7E)
        for _ in 0..<200 { Fuzz.tpmState(FuzzEntriesTests.random(&rng, maxCount: 5000)) }
        let seed = Fuzz.tpmStateSeed()
        #expect(seed.count == 4096 + 4 * 4096)
        Fuzz.tpmState(seed)
        for _ in 0..<300 {
            var bytes = seed
            // Damage a few bytes in the header or the slot headers and data.
            for _ in 0..<Int.random(in: 1...4, using: &rng) {
                let region = [0..<4096, 4096..<4400, 8192..<8400, 12288..<12400, 16384..<16400].randomElement(using: &rng)!
                bytes[Int.random(in: region, using: &rng)] = .random(in: 0...255, using: &rng)
            }
            if Bool.random(using: &rng) { bytes = Array(bytes.prefix(Int.random(in: 0..<bytes.count, using: &rng))) }
            Fuzz.tpmState(bytes)
        }
    }
}
