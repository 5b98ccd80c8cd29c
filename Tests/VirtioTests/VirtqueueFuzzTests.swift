import FuzzEntries
import Glibc
import Testing
import TestSupport

/// The `fuzz-virtqueue` entry (Fuzz/) on its seed corpus, on damaged seeds and on seeded random
/// inputs, so that `swift test` catches an entry that traps on ordinary input.
@Suite("fuzz entry: virtqueue")
struct VirtqueueFuzzTests {
    /// The files of Fuzz/corpus/fuzz-virtqueue.
    static func corpus() -> [[UInt8]] {
        let root = String(#filePath.split(separator: "/").dropLast(3).joined(separator: "/"))
        let dir = "/" + root + "/Fuzz/corpus/fuzz-virtqueue"
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

    @Test("the seed corpus is there and runs through the entry")
    func seeds() {
        let inputs = Self.corpus()
        #expect(inputs.count >= 5, "Fuzz/corpus/fuzz-virtqueue is empty or missing")
        for input in inputs { Fuzz.virtqueue(input) }
    }

    @Test("seeded random inputs, and each seed with random bytes changed, inserted or cut")
    func random() {
        var rng = SplitMix64(state: 0x71F7)
        for _ in 0..<400 {
            Fuzz.virtqueue((0..<Int.random(in: 0...160, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) })
        }
        for seed in Self.corpus() where seed.count > 1 {
            for _ in 0..<80 {
                var bytes = seed
                for _ in 0..<Int.random(in: 1...4, using: &rng) {
                    let i = Int.random(in: 0..<bytes.count, using: &rng)
                    switch Int.random(in: 0..<3, using: &rng) {
                    case 0: bytes[i] = .random(in: 0...255, using: &rng)
                    case 1: bytes.insert(.random(in: 0...255, using: &rng), at: i)
                    default: bytes = Array(bytes.prefix(max(i, 1)))
                    }
                }
                Fuzz.virtqueue(bytes)
            }
        }
    }
}
