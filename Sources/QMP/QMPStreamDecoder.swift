/// Splits a QMP byte stream into top-level JSON values.
///
/// A QMP stream is a sequence of JSON values separated by optional whitespace, cut anywhere by
/// the transport. The decoder buffers bytes, finds where each top-level value ends by tracking
/// nesting and strings, and parses it with `JSONValue.parse`. Errors are items too, and decoding
/// goes on after them:
///
/// - a value longer than `limits.maxBytes` is reported once, as soon as it crosses the limit, and
///   the rest of it is discarded as it arrives (memory stays bounded by the limit);
/// - a byte that can never appear in JSON text (an ASCII control character other than tab, CR and
///   LF, or a byte that never occurs in UTF-8) abandons the value in progress, as QEMU's lexer
///   does; the QMP specification tells clients to send such a byte to get the parser back into a
///   known state after incomplete input;
/// - stray bytes between values (`}`, `,`, ...) give one error per run of them.
///
/// The caller bounds what it feeds: the server reads one chunk at a time and only when `next()`
/// has nothing left.
public struct QMPStreamDecoder: Sendable {
    public enum Item: Equatable, Sendable {
        case value(JSONValue)
        case error(JSONParseError)
    }

    private enum Kind: Sendable { case none, container, string, scalar }

    public let limits: JSONLimits
    private var input: [UInt8] = []
    /// Next byte of `input` to look at.
    private var scan = 0
    /// Where the value in progress starts in `input`.
    private var start = 0
    private var kind = Kind.none
    private var depth = 0
    private var inString = false
    private var escaped = false
    /// The value in progress went over the limit: its remaining bytes are dropped, silently.
    private var skipping = false
    /// An error was just reported for junk between values: more junk adds no error.
    private var recovering = false

    public init(limits: JSONLimits = JSONLimits()) {
        self.limits = limits
    }

    /// Appends bytes received from the transport.
    public mutating func feed(_ bytes: some Sequence<UInt8>) {
        input.append(contentsOf: bytes)
    }

    /// Bytes buffered that do not yet form a complete value (whitespace included).
    public var bufferedByteCount: Int { input.count }

    /// True while a value has started but not ended.
    public var hasPartialValue: Bool { kind != .none }

    /// True when `next()` has bytes it has not looked at yet.
    public var hasUnscannedInput: Bool { scan < input.count }

    /// The next complete value or error, or nil when more input is needed.
    public mutating func next() -> Item? {
        defer { compact() }
        while scan < input.count {
            let c = input[scan]
            if Self.isLexicalError(c) {
                scan += 1
                let wasInValue = kind != .none
                let wasSkipping = skipping
                resetValue()
                if wasSkipping { continue }
                if wasInValue || !recovering {
                    recovering = true
                    let what = "byte 0x\(String(c, radix: 16, uppercase: true))"
                    return .error(JSONParseError(wasInValue ? "invalid \(what) in the input, incomplete value discarded" : "stray \(what)", offset: scan - 1))
                }
                continue
            }
            switch kind {
            case .none:
                scan += 1
                if Self.isWhitespace(c) { continue }
                start = scan - 1
                switch c {
                case UInt8(ascii: "{"), UInt8(ascii: "["):
                    kind = .container
                    depth = 1
                case UInt8(ascii: "\""):
                    kind = .string
                case UInt8(ascii: "-"), UInt8(ascii: "0")...UInt8(ascii: "9"),
                     UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"):
                    kind = .scalar
                default:
                    start = scan
                    if recovering { continue }
                    recovering = true
                    let shown = c >= 0x21 && c < 0x7F ? "'\(Character(Unicode.Scalar(c)))'" : "byte 0x\(String(c, radix: 16, uppercase: true))"
                    return .error(JSONParseError("stray \(shown)", offset: scan - 1))
                }
                recovering = false
                if let item = checkSize() { return item }
            case .container:
                scan += 1
                if inString {
                    if escaped { escaped = false } else if c == UInt8(ascii: "\\") { escaped = true } else if c == UInt8(ascii: "\"") { inString = false }
                } else if c == UInt8(ascii: "\"") {
                    inString = true
                } else if c == UInt8(ascii: "{") || c == UInt8(ascii: "[") {
                    depth += 1
                } else if c == UInt8(ascii: "}") || c == UInt8(ascii: "]") {
                    depth -= 1
                    if depth == 0, let item = complete(end: scan) { return item }
                    if depth == 0 { continue }
                }
                if let item = checkSize() { return item }
            case .string:
                scan += 1
                if escaped { escaped = false } else if c == UInt8(ascii: "\\") { escaped = true } else if c == UInt8(ascii: "\"") {
                    if let item = complete(end: scan) { return item }
                    continue
                }
                if let item = checkSize() { return item }
            case .scalar:
                if Self.isWhitespace(c) || Self.isStructural(c) {
                    // The delimiter is not part of the scalar: it is looked at again between values.
                    if let item = complete(end: scan) { return item }
                    continue
                }
                scan += 1
                if let item = checkSize() { return item }
            }
        }
        return nil
    }

    /// Ends the value in progress at `end` (exclusive): parses it, or drops it when it was too large.
    private mutating func complete(end: Int) -> Item? {
        let wasSkipping = skipping
        let range = start..<end
        resetValue()
        start = end
        if wasSkipping { return nil }
        switch JSONValue.parse(input[range], limits: limits) {
        case .success(let v): return .value(v)
        case .failure(let e): return .error(JSONParseError(e.message, offset: e.offset))
        }
    }

    /// Reports a value that has just grown past the limit, and from then on drops its bytes.
    private mutating func checkSize() -> Item? {
        if skipping {
            start = scan // drop what was scanned
            return nil
        }
        guard scan - start > limits.maxBytes else { return nil }
        skipping = true
        start = scan
        return .error(JSONParseError("message larger than \(limits.maxBytes) bytes", offset: scan - 1))
    }

    private mutating func resetValue() {
        kind = .none
        depth = 0
        inString = false
        escaped = false
        skipping = false
        start = scan
    }

    /// Drops bytes no longer needed.
    private mutating func compact() {
        let keepFrom = kind == .none ? scan : start
        if keepFrom > 0 {
            input.removeFirst(keepFrom)
            scan -= keepFrom
            start -= keepFrom
        }
    }

    static func isWhitespace(_ c: UInt8) -> Bool { c == 0x20 || c == 0x0A || c == 0x0D || c == 0x09 }

    static func isStructural(_ c: UInt8) -> Bool {
        c == UInt8(ascii: "{") || c == UInt8(ascii: "}") || c == UInt8(ascii: "[") || c == UInt8(ascii: "]")
            || c == UInt8(ascii: "\"") || c == UInt8(ascii: ",") || c == UInt8(ascii: ":")
    }

    /// Bytes that are an error wherever they appear in JSON text.
    static func isLexicalError(_ c: UInt8) -> Bool {
        (c < 0x20 && !isWhitespace(c)) || c == 0xC0 || c == 0xC1 || c >= 0xF5
    }
}
