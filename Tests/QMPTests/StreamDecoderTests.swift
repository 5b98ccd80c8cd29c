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
        // Inside a string as well; 0xFF too. Those drop the rest of the line: the error may have
        // come before the string's end, and where that is cannot be known.
        let more = decode([Array(#"{"a": "x"#.utf8) + [0xFF] + Array(#"{"c": 3}"#.utf8) + [0x0A] + Array(#"{"c": 4}"#.utf8)])
        #expect(more.count == 2 && more[1] == .value(["c": 4]))
        // Between messages: one error for a run of them.
        #expect(decode([[0x04, 0x04, 0x1B] + Array("[]".utf8)]).count == 2)
    }

    /// Items with error offsets left out: they count from wherever the decoder's buffer starts,
    /// which depends on how the input was cut.
    func summary(_ items: [QMPStreamDecoder.Item]) -> [String] {
        items.map {
            switch $0 {
            case .value(let v): "value \(v.serialized)"
            case .error(let e): "error \(e.message)"
            }
        }
    }

    static let queryStatus = Array(#"{"execute":"query-status"}"#.utf8) + [0x0A]

    /// A message with `bad` inside its "id" string, its line's end, then a good message.
    static func badStringLine(_ bad: [UInt8]) -> [UInt8] {
        Array(#"{"execute":"x","id":"a"#.utf8) + bad + Array(#"b"}"#.utf8) + [0x0A] + queryStatus
    }

    /// Streams that must give one error, then the query-status message of the next line.
    static let resyncCases: [(name: String, bytes: [UInt8])] = [
        ("0xFF in a string", Array(#"{"execute":"query-status","id":""#.utf8) + [0xFF] + Array(#""}"#.utf8) + [0x0A] + queryStatus),
        ("raw LF in a string", badStringLine([0x0A])),
        ("raw CR in a string", badStringLine([0x0D])),
        ("raw tab in a string", badStringLine([0x09])),
        ("0x01 in a string", badStringLine([0x01])),
        ("0x1F in a string", badStringLine([0x1F])),
        ("0xC0 in a string", badStringLine([0xC0])),
        ("0xF5 in a string", badStringLine([0xF5])),
        // The raw LF ends the line: a string left open by mistake does not cost the next message.
        ("an unterminated string, then a message on the next line", Array(#"{"execute":"x","id":"abc"#.utf8) + [0x0A] + queryStatus),
        // The rest of the bad message after the raw LF gives no error (nor anything else).
        ("a raw LF, then more of the message", Array(#"{"execute":"x","id":"a"#.utf8) + [0x0A]
            + Array(#"b", "arguments": {"k": [1, "v", {"w": null}]}, "x": "y"}"#.utf8) + [0x0A] + queryStatus),
        ("a raw LF, then the rest of the message and another message", Array(#"{"execute":"x","id":"a"#.utf8) + [0x0A]
            + Array(#"b"} {"execute":"lost"}"#.utf8) + [0x0A] + queryStatus),
        ("a raw LF in a key", Array(#"{"exe"#.utf8) + [0x0A] + Array(#"cute":"x"}"#.utf8) + [0x0A] + queryStatus),
        ("0xFF in a top-level string", Array(#"""#.utf8) + [0xFF] + Array(#"" "more" {"and": "more"}"#.utf8) + [0x0A] + queryStatus),
        ("a raw LF in a top-level string", Array(#""a"#.utf8) + [0x0A] + Array(#"b" 1 2 3"#.utf8) + [0x0A] + queryStatus),
        ("0xFF outside a string, inside an object", Array(#"{"execute":"#.utf8) + [0xFF] + Array(#""x"}"#.utf8) + [0x0A] + queryStatus),
        ("0xFF between messages", [0xFF, 0xFF] + Array(#"{"execute":"lost"}"#.utf8) + [0x0A] + queryStatus),
    ]

    @Test("a bad byte in a string gives one error, and decoding resumes at the next line")
    func resynchronizesAtNewline() {
        let expected = ["error", "value \(JSONValue.object(["execute": "query-status"]).serialized)"]
        for (name, bytes) in Self.resyncCases {
            let items = decode([bytes])
            #expect(items.count == 2, "\(name): \(summary(items))")
            #expect(summary(items).map { $0.hasPrefix("error") ? "error" : $0 } == expected, "\(name)")
            #expect(items.last == .value(["execute": "query-status"]), "\(name)")
        }
        // The error says the message was dropped.
        let items = decode([Self.badStringLine([0x0A])])
        #expect(isError(items[0], containing: "invalid byte 0xA in the input, incomplete value discarded"))
        // Several bad lines in a row, each its own error; a good message on the line after each.
        let many = Self.badStringLine([0x01]) + Self.badStringLine([0xFF]) + Self.badStringLine([0x0A])
        #expect(summary(decode([many])).map { $0.prefix(5) } == ["error", "value", "error", "value", "error", "value"])
        // Only the line right after a raw LF in a string is quiet: errors on the next are reported.
        let after = Self.badStringLine([0x0A]) + Array("} ,".utf8) + [0x0A]
        #expect(summary(decode([after])).map { $0.prefix(5) } == ["error", "value", "error"])
    }

    @Test("whitespace between values and inside strings' escapes stays valid")
    func whitespaceOutsideStrings() {
        let text = "\t{\"a\":\t1,\r\n \"b\": \"tab\\there\\nnew line\"}\r\n\t[2]\n"
        #expect(decode([Array(text.utf8)]) == [.value(["a": 1, "b": "tab\there\nnew line"]), .value([2])])
    }

    @Test("a bare 0xFF between messages resets the parser: one error, the next line is served")
    func bareResetByte() {
        let bytes = Array(#"{"a":1}"#.utf8) + [0xFF, 0x0A] + Array(#"{"b":2}"#.utf8) + [0x0A]
        let items = decode([bytes])
        #expect(items.count == 3)
        #expect(items.first == .value(["a": 1]))
        if items.count == 3 { #expect(isError(items[1], containing: "stray byte 0xFF")) }
        #expect(items.last == .value(["b": 2]))
        // After an incomplete message, as the QMP specification suggests.
        let reset = decode([Array(#"{"execute": "query-st"#.utf8) + [0xFF, 0x0A] + Self.queryStatus])
        #expect(reset.count == 2 && reset.last == .value(["execute": "query-status"]))
    }

    @Test("the resynchronization cases give the same items however the input is cut")
    func resyncSplits() {
        for (name, bytes) in Self.resyncCases {
            let whole = summary(decode([bytes]))
            #expect(whole.count == 2, "\(name)")
            for cut in 0...bytes.count {
                #expect(summary(decode([Array(bytes[..<cut]), Array(bytes[cut...])])) == whole, "\(name), split at \(cut)")
            }
            #expect(summary(decode(bytes.map { [$0] })) == whole, "\(name), byte by byte")
        }
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

    @Test("a bad byte in the dropped part of an oversized message adds no error")
    func oversizedThenBadByte() {
        let limits = JSONLimits(maxBytes: 20, maxDepth: 64)
        for bad: UInt8 in [0x0A, 0x01, 0xFF] {
            let bytes = Array((#"{"execute": "x", "arguments": {"s": ""# + String(repeating: "y", count: 40)).utf8) + [bad]
                + Array(#"z"}} {"lost": 1}"#.utf8) + [0x0A] + Array(#"{"b": 2}"#.utf8)
            let items = decode([bytes], limits: limits)
            #expect(items.count == 2, "byte \(bad)")
            if items.count == 2 { #expect(isError(items[0], containing: "larger than 20 bytes")) }
            #expect(items.last == .value(["b": 2]), "byte \(bad)")
        }
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
