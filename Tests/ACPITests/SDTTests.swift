import ACPI
import Testing

@Suite("ACPI table header")
struct SDTTests {
    @Test("header fields sit at their ACPI offsets and the table sums to zero")
    func header() {
        let t = SDT(signature: "TEST", revision: 2, oemTableID: "ABC", oemRevision: 7, body: [1, 2, 3])
        let b = t.bytes
        #expect(b.count == 39)
        #expect(Array(b[0..<4]) == Array("TEST".utf8))
        #expect(b[4] == 39 && b[5] == 0 && b[6] == 0 && b[7] == 0)
        #expect(b[8] == 2)
        #expect(Array(b[10..<16]) == Array("SWVMM ".utf8))
        #expect(Array(b[16..<24]) == Array("ABC     ".utf8))
        #expect(b[24] == 7)
        #expect(Array(b[28..<32]) == Array("SWFT".utf8))
        #expect(Array(b[36...]) == [1, 2, 3])
        #expect(ACPIChecksum.sum(b) == 0)
    }
}
