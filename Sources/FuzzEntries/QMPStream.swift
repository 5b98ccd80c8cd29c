import QMP

extension Fuzz {
    /// `fuzz-qmp-stream`: arbitrary bytes as a QMP client's stream, cut into chunks (byte 0 seeds the cut
    /// points). Every chunk's items are drained; the decoder must never trap, must keep its buffer
    /// bounded by the message limit (plus the chunk being scanned), and must decode the same items
    /// whether the stream comes whole or in chunks (error offsets aside).
    public static func qmpStream(_ data: [UInt8]) {
        guard let first = data.first else { return }
        let seed = Int(first)
        let bytes = Array(data.dropFirst())
        var limits = JSONLimits()
        limits.maxBytes = 256
        // Items compared as values (error offsets aside): a string per item cost most of the run.
        enum Seen: Equatable { case value(JSONValue), error(String) }
        func describe(_ item: QMPStreamDecoder.Item) -> Seen {
            switch item {
            case .value(let v): return .value(v)
            case .error(let e): return .error(e.message)
            }
        }
        var whole = QMPStreamDecoder(limits: limits)
        whole.feed(bytes)
        var expected: [Seen] = []
        while let item = whole.next() { expected.append(describe(item)) }

        var chunked = QMPStreamDecoder(limits: limits)
        var got: [Seen] = []
        var at = 0, step = 1
        while at < bytes.count {
            let n = min(bytes.count - at, 1 + (seed * 7 + step * 13) % 97)
            chunked.feed(bytes[at..<at + n])
            at += n
            step += 1
            while let item = chunked.next() { got.append(describe(item)) }
            precondition(chunked.bufferedByteCount <= limits.maxBytes + 1, "the decoder holds \(chunked.bufferedByteCount) bytes")
        }
        precondition(got == expected, "chunked decoding differs: \(got) vs \(expected)")
    }
}
