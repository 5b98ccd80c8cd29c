/// Splits a QMP byte stream into top-level JSON values.
///
/// A QMP stream is a sequence of JSON values separated by optional whitespace, cut anywhere by
/// the transport. The decoder buffers bytes, finds where each top-level value ends by tracking
/// nesting and strings, and parses it with `JSONValue.parse`. Errors are items too, and decoding
/// goes on after them:
///
/// - a value longer than `limits.maxBytes` is reported once, as soon as it crosses the limit, and
///   the rest of it is discarded as it arrives (memory stays bounded by the limit);
/// - a byte that never occurs in UTF-8 (0xC0, 0xC1, 0xF5-0xFF) anywhere, or a raw control
///   character (below 0x20, tab, CR and LF included) inside a string, abandons the value in
///   progress with one error, as QEMU's lexer does. Where the bad message was meant to end cannot
///   be known (restarting at the next byte could be restarting inside its string, out of phase
///   for good), so the decoder then drops bytes up to the next newline, silently, and resumes
///   after it; a newline that was itself the bad byte is that newline. The QMP specification
///   tells clients to send such a byte (0xFF) to get the parser back into a known state after
///   incomplete input: followed by a newline, it does that;
/// - an ASCII control character other than tab, CR and LF outside strings abandons the value in
///   progress too, and decoding resumes at the next byte (no string can be open there);
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
    /// A bad byte abandoned a value: everything up to the next newline is dropped.
    private var discarding = false
    /// A newline inside a string ended a bad message: this line may be the rest of it. The first
    /// error on it is not reported; the rest of the line is dropped instead.
    private var quietLine = false

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
            if discarding {
                // The rest of a line whose message was abandoned.
                scan += 1
                start = scan
                if c == 0x0A { endLine() }
                continue
            }
            let inAString = kind == .string || (kind == .container && inString)
            let resync = Self.isInvalidUTF8(c) || (inAString && c < 0x20)
            if resync || Self.isLexicalError(c) {
                scan += 1
                let wasInValue = kind != .none
                let wasSkipping = skipping
                let wasQuiet = quietLine
                resetValue()
                let report = !wasSkipping && !wasQuiet && (wasInValue || !recovering)
                if resync && c == 0x0A {
                    // This newline ends the bad line. The next line may hold the rest of the bad
                    // message (the rest of its string): that line is quiet.
                    endLine()
                    quietLine = !wasQuiet
                } else if resync || wasQuiet {
                    discarding = true
                } else if report {
                    recovering = true
                }
                if report {
                    let what = "byte 0x\(String(c, radix: 16, uppercase: true))"
                    return .error(JSONParseError(wasInValue ? "invalid \(what) in the input, incomplete value discarded" : "stray \(what)", offset: scan - 1))
                }
                continue
            }
            switch kind {
            case .none:
                scan += 1
                if Self.isWhitespace(c) {
                    if c == 0x0A { quietLine = false }
                    continue
                }
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
                    let shown = c >= 0x21 && c < 0x7F ? "'\(Character(Unicode.Scalar(c)))'" : "byte 0x\(String(c, radix: 16, uppercase: true))"
                    if let item = report(JSONParseError("stray \(shown)", offset: scan - 1)) {
                        recovering = true
                        return item
                    }
                    continue
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
                } else if c == 0x0A {
                    quietLine = false
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

    /// A newline ended the line being discarded (or the bad line itself).
    private mutating func endLine() {
        discarding = false
        recovering = false
        quietLine = false
    }

    /// `error` as an item; on a quiet line, nothing: the rest of the line is dropped instead.
    private mutating func report(_ error: JSONParseError) -> Item? {
        guard quietLine else { return .error(error) }
        resetValue()
        discarding = true
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
        case .failure(let e): return report(JSONParseError(e.message, offset: e.offset))
        }
    }

    /// Reports a value that has just grown past the limit, and from then on drops its bytes.
    private mutating func checkSize() -> Item? {
        if skipping {
            start = scan // drop what was scanned
            return nil
        }
        guard scan - start > limits.maxBytes else { return nil }
        guard let item = report(JSONParseError("message larger than \(limits.maxBytes) bytes", offset: scan - 1)) else { return nil }
        skipping = true
        start = scan
        return item
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
        (c < 0x20 && !isWhitespace(c)) || isInvalidUTF8(c)
    }

    /// Bytes that never occur in UTF-8.
    static func isInvalidUTF8(_ c: UInt8) -> Bool {
        c == 0xC0 || c == 0xC1 || c >= 0xF5
    }
}
