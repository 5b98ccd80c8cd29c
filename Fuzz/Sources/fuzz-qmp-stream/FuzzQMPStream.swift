import QMP

/// libFuzzer entry: arbitrary bytes as a QMP client's stream, cut into chunks (byte 0 seeds the cut
/// points). Every chunk's items are drained; the decoder must never trap, must keep its buffer
/// bounded by the message limit (plus the chunk being scanned), and must decode the same items
/// whether the stream comes whole or in chunks (error offsets aside).
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzQMPStream(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    guard size > 0 else { return 0 }
    let seed = Int(data[0])
    let bytes = Array(UnsafeBufferPointer(start: data + 1, count: size - 1))
    var limits = JSONLimits()
    limits.maxBytes = 256
    func describe(_ item: QMPStreamDecoder.Item) -> String {
        switch item {
        case .value(let v): return "value \(v)"
        case .error(let e): return "error \(e.message)"
        }
    }
    var whole = QMPStreamDecoder(limits: limits)
    whole.feed(bytes)
    var expected: [String] = []
    while let item = whole.next() { expected.append(describe(item)) }

    var chunked = QMPStreamDecoder(limits: limits)
    var got: [String] = []
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
    return 0
}
