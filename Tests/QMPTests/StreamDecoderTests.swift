import QMP
import Testing

@Suite("QMP stream framing")
struct StreamDecoderTests {
    static let stream = #"{"execute": "qmp_capabilities"}"# + "\n"
        + #"  {"execute":"echo","arguments":{"text":"}{][\"\\"},"id":[1,{"a":"b"}]}"# + "\r\n"
        + #"{"execute": "query-status", "id": "\u00e9t\u00e9 ☃"}"#
        + "\n"

    static let expected: [QMPStreamDecoder.Item] = [
        .value(["execute": "qmp_capabilities"]),
        .value(["execute": "echo", "arguments": ["text": "}{][\"\\"], "id": [1, ["a": "b"]]]),
        .value(["execute": "query-status", "id": "été ☃"]),
    ]

    func drain(_ d: inout QMPStreamDecoder) -> [QMPStreamDecoder.Item] {
        var items: [QMPStreamDecoder.Item] = []
        while let i = d.next() { items.append(i) }
        return items
    }

    func decode(_ chunks: [[UInt8]], limits: JSONLimits = JSONLimits()) -> [QMPStreamDecoder.Item] {
        var d = QMPStreamDecoder(limits: limits)
        var items: [QMPStreamDecoder.Item] = []
        for c in chunks {
            d.feed(c)
            items += drain(&d)
        }
        return items
    }

    func isError(_ item: QMPStreamDecoder.Item, containing text: String) -> Bool {
        if case .error(let e) = item { return e.message.contains(text) }
        return false
    }

    @Test("several messages in one read")
    func severalInOneRead() {
        #expect(decode([Array(Self.stream.utf8)]) == Self.expected)
    }

    @Test("split at every byte boundary")
    func everySplit() {
        let bytes = Array(Self.stream.utf8)
        for cut in 0...bytes.count {
            let items = decode([Array(bytes[..<cut]), Array(bytes[cut...])])
            #expect(items == Self.expected, "split at \(cut)")
        }
    }

    @Test("one byte at a time, and three-way splits")
    func byteByByte() {
        let bytes = Array(Self.stream.utf8)
        #expect(decode(bytes.map { [$0] }) == Self.expected)
        for a in stride(from: 0, through: bytes.count, by: 7) {
            for b in stride(from: a, through: bytes.count, by: 5) {
                #expect(decode([Array(bytes[..<a]), Array(bytes[a..<b]), Array(bytes[b...])]) == Self.expected)
            }
        }
    }

    @Test("nothing is yielded before a value is complete")
    func incomplete() {
        var d = QMPStreamDecoder()
        d.feed(Array(#"{"execute": "x""#.utf8))
        #expect(d.next() == nil)
        #expect(d.hasPartialValue)
        d.feed(Array("}".utf8))
        #expect(d.next() == .value(["execute": "x"]))
        #expect(!d.hasPartialValue)
        #expect(d.next() == nil)
    }

    @Test("top-level scalars are values (ended by whitespace or a delimiter)")
    func scalars() {
        #expect(decode([Array(#"1 "two" true null{"a":1}[2]"#.utf8)]) ==
                [.value(1), .value("two"), .value(true), .value(nil), .value(["a": 1]), .value([2])])
        // A scalar at the end of the input may go on in the next read.
        #expect(decode([Array("12".utf8), Array("34 ".utf8)]) == [.value(1234)])
    }

    @Test("a parse error is reported and the next message still decodes")
    func parseErrorThenValue() {
        let items = decode([Array(#"{"a" 1} {"b": [1,]} nonsense {"ok": true}"#.utf8)])
        #expect(items.count == 4)
        #expect(isError(items[0], containing: "missing ':'"))
        #expect(isError(items[1], containing: "expecting a value"))
        #expect(isError(items[2], containing: "invalid keyword"))
        #expect(items[3] == .value(["ok": true]))
    }

    @Test("stray closing brackets give one error per run")
    func stray() {
        let items = decode([Array(#"}}]] , {"a":1} :"#.utf8), Array("\n".utf8)])
        #expect(items.count == 3)
        #expect(isError(items[0], containing: "stray '}'"))
        #expect(items[1] == .value(["a": 1]))
        #expect(isError(items[2], containing: "stray ':'"))
    }

    @Test("a control character abandons the incomplete message, as QEMU's lexer does")
    func controlCharacterResets() {
        let items = decode([Array(#"{"execute": "never finished", "arguments": {"#.utf8) + [0x04], Array(#"{"b": 2}"#.utf8)])
        #expect(items.count == 2)
        #expect(isError(items[0], containing: "incomplete value discarded"))
        #expect(items[1] == .value(["b": 2]))
        // Inside a string as well; 0xFF too.
        let more = decode([Array(#"{"a": "x"#.utf8) + [0xFF] + Array(#"{"c": 3}"#.utf8)])
        #expect(more.count == 2 && more[1] == .value(["c": 3]))
        // Between messages: one error for a run of them.
        #expect(decode([[0x04, 0x04, 0x1B] + Array("[]".utf8)]).count == 2)
    }

    @Test("an oversized message is reported once, dropped, and the stream resynchronizes")
    func oversized() {
        let limits = JSONLimits(maxBytes: 100, maxDepth: 64)
        let big = #"{"execute": "x", "arguments": {"s": ""# + String(repeating: "}{", count: 200) + #""}}"#
        let text = big + #" {"execute": "after"}"#
        let items = decode([Array(text.utf8)], limits: limits)
        #expect(items.count == 2)
        #expect(isError(items[0], containing: "larger than 100 bytes"))
        #expect(items[1] == .value(["execute": "after"]))

        // Fed in small pieces, the buffer never holds much more than the limit.
        var d = QMPStreamDecoder(limits: limits)
        var got: [QMPStreamDecoder.Item] = []
        var maxBuffered = 0
        let hugeBytes = Array((#"[""# + String(repeating: "x", count: 100_000) + #""] {"execute": "after"}"#).utf8)
        var i = 0
        while i < hugeBytes.count {
            let end = min(i + 37, hugeBytes.count)
            d.feed(hugeBytes[i..<end])
            got += drain(&d)
            maxBuffered = max(maxBuffered, d.bufferedByteCount)
            i = end
        }
        #expect(got.count == 2)
        #expect(isError(got[0], containing: "larger than"))
        #expect(got[1] == .value(["execute": "after"]))
        #expect(maxBuffered <= 100 + 37)
    }

    @Test("an oversized scalar or string resynchronizes too")
    func oversizedScalar() {
        let limits = JSONLimits(maxBytes: 10, maxDepth: 64)
        let items = decode([Array(("12345678901234567890 \"" + String(repeating: "y", count: 50) + "\" [1]").utf8)], limits: limits)
        #expect(items.count == 3)
        #expect(isError(items[0], containing: "larger than"))
        #expect(isError(items[1], containing: "larger than"))
        #expect(items[2] == .value([1]))
    }
}
