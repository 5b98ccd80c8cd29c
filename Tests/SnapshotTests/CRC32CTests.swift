import CLinux
import Testing
import Snapshot

@Suite struct CRC32CTests {
    @Test func standardCheckValue() {
        let input = Array("123456789".utf8)
        #expect(CRC32C.checksum(input) == 0xE306_9283)
        #expect(input.withUnsafeBytes { clinux_crc32c_sw(0, $0.baseAddress, $0.count) } == 0xE306_9283)
        #expect(input.withUnsafeBytes { clinux_crc32c_hw(0, $0.baseAddress, $0.count) } == 0xE306_9283)
        #expect(referenceCRC32C(input) == 0xE306_9283)
        #expect(CRC32C.checksum([UInt8]()) == 0)
        // RFC 3720 (iSCSI) B.4 vectors: 32 bytes of zeros and of 0xFF.
        #expect(CRC32C.checksum([UInt8](repeating: 0, count: 32)) == 0x8A91_36AA)
        #expect(CRC32C.checksum([UInt8](repeating: 0xFF, count: 32)) == 0x62A8_AB43)
    }

    /// The SSE4.2 path (three interleaved streams for long inputs) and the table path agree for
    /// every length around the block boundaries and every misalignment, and checksums chain.
    @Test func hardwareAndTableAgree() {
        var rng = SeededRandom(seed: 42)
        let data = (0..<(200 * 1024)).map { _ in UInt8.random(in: 0...255, using: &rng) }
        var lengths = [0, 1, 7, 8, 9, 63, 64, 4095, 4096, 24575, 24576, 24577, 49152, 49160, 100_000, 150_001]
        for _ in 0..<40 { lengths.append(Int.random(in: 0...(190 * 1024), using: &rng)) }
        data.withUnsafeBytes { raw in
            for length in lengths {
                for misalign in [0, 1, 3, 5] {
                    let p = raw.baseAddress! + misalign
                    let seed = UInt32(truncatingIfNeeded: length &* 2_654_435_761)
                    let sw = clinux_crc32c_sw(seed, p, length)
                    let hw = clinux_crc32c_hw(seed, p, length)
                    #expect(sw == hw, "length \(length) misalign \(misalign)")
                }
            }
            // Chaining: crc(a + b) == update(crc(a), b).
            let whole = CRC32C.checksum(UnsafeRawBufferPointer(rebasing: raw[0..<100_000]))
            let first = CRC32C.checksum(UnsafeRawBufferPointer(rebasing: raw[0..<33_333]))
            #expect(CRC32C.update(first, UnsafeRawBufferPointer(rebasing: raw[33_333..<100_000])) == whole)
        }
        #expect(referenceCRC32C(data[0..<5000]) == CRC32C.checksum(data[0..<5000]))
        print("CRC32C: SSE4.2 \(clinux_crc32c_hw_available() != 0 ? "available" : "not available; compared table with table")")
    }

    /// clinux_crc32c times the instruction against the table on its first call of 4 KiB or more and
    /// keeps the faster (an emulated CPU can run the table faster); either way the checksums are the same.
    @Test func chosenImplementationGivesTheSameChecksums() {
        var rng = SeededRandom(seed: 7)
        let data = (0..<(70 * 1024)).map { _ in UInt8.random(in: 0...255, using: &rng) }
        data.withUnsafeBytes { raw in
            for length in [0, 5, 4096, 4097, 65536, 70 * 1024] {
                let p = raw.baseAddress!
                #expect(clinux_crc32c(9, p, length) == clinux_crc32c_sw(9, p, length), "length \(length)")
            }
        }
        let choice = clinux_crc32c_choice()
        #expect(choice == 1 || choice == 2, "no choice after a call of 4 KiB or more: \(choice)")
        if clinux_crc32c_hw_available() == 0 { #expect(choice == 2) }
        print("CRC32C: clinux_crc32c runs \(choice == 1 ? "the SSE4.2 instruction" : "the table") on this machine")
    }

    @Test func allZero() {
        var page = [UInt8](repeating: 0, count: 4096)
        #expect(page.withUnsafeBytes { clinux_all_zero($0.baseAddress, $0.count) } == 1)
        for position in [0, 1, 15, 16, 17, 2048, 4095] {
            page[position] = 1
            #expect(page.withUnsafeBytes { clinux_all_zero($0.baseAddress, $0.count) } == 0, "byte \(position)")
            page[position] = 0
        }
        let short: [UInt8] = [0, 0, 0, 2]
        #expect(short.withUnsafeBytes { clinux_all_zero($0.baseAddress, $0.count) } == 0)
        #expect(short.withUnsafeBytes { clinux_all_zero($0.baseAddress, 3) } == 1)
    }
}
