/// A JSON value as QMP exchanges it.
///
/// Numbers keep the distinction QEMU makes: a literal without fraction or exponent that fits in
/// Int64 is `.int`, every other number is `.double`. Objects keep their members in order (QEMU's
/// replies are compared as text by some clients, and readable output is nicer in order).
public enum JSONValue: Equatable, Sendable {
    case null
    case bool(Bool)
    case int(Int64)
    case double(Double)
    case string(String)
    case array([JSONValue])
    case object(JSONObject)
}

/// A JSON object: members in insertion order, keys unique. Equality ignores member order.
public struct JSONObject: Equatable, Sendable, Sequence, ExpressibleByDictionaryLiteral {
    public typealias Member = (key: String, value: JSONValue)
    public private(set) var members: [Member]

    public init() { members = [] }

    /// Builds an object from `members`; a later member with a key already present replaces it.
    public init(_ members: [Member]) {
        self.members = []
        for m in members { self[m.key] = m.value }
    }

    public init(dictionaryLiteral elements: (String, JSONValue)...) {
        self.init(elements.map { (key: $0.0, value: $0.1) })
    }

    /// Members whose keys the caller has already checked to be unique.
    init(uniqueMembers: [Member]) { members = uniqueMembers }

    public var count: Int { members.count }
    public var isEmpty: Bool { members.isEmpty }
    public var keys: [String] { members.map(\.key) }

    /// The value of member `key`; assigning nil removes the member, assigning to a new key appends it.
    public subscript(key: String) -> JSONValue? {
        get { members.first { $0.key == key }?.value }
        set {
            if let i = members.firstIndex(where: { $0.key == key }) {
                if let newValue { members[i].value = newValue } else { members.remove(at: i) }
            } else if let newValue {
                members.append((key: key, value: newValue))
            }
        }
    }

    public func makeIterator() -> IndexingIterator<[Member]> { members.makeIterator() }

    public static func == (a: JSONObject, b: JSONObject) -> Bool {
        guard a.members.count == b.members.count else { return false }
        return a.members.allSatisfy { m in b[m.key] == m.value }
    }
}

extension JSONValue: ExpressibleByNilLiteral, ExpressibleByBooleanLiteral, ExpressibleByIntegerLiteral,
    ExpressibleByFloatLiteral, ExpressibleByStringLiteral, ExpressibleByArrayLiteral,
    ExpressibleByDictionaryLiteral
{
    public init(nilLiteral: ()) { self = .null }
    public init(booleanLiteral value: Bool) { self = .bool(value) }
    public init(integerLiteral value: Int64) { self = .int(value) }
    public init(floatLiteral value: Double) { self = .double(value) }
    public init(stringLiteral value: String) { self = .string(value) }
    public init(arrayLiteral elements: JSONValue...) { self = .array(elements) }
    public init(dictionaryLiteral elements: (String, JSONValue)...) {
        self = .object(JSONObject(elements.map { (key: $0.0, value: $0.1) }))
    }
}

extension JSONValue {
    public var stringValue: String? { if case .string(let s) = self { s } else { nil } }
    public var intValue: Int64? { if case .int(let i) = self { i } else { nil } }
    public var boolValue: Bool? { if case .bool(let b) = self { b } else { nil } }
    public var arrayValue: [JSONValue]? { if case .array(let a) = self { a } else { nil } }
    public var objectValue: JSONObject? { if case .object(let o) = self { o } else { nil } }

    /// Member `key` of an object; nil for a missing member or a value that is not an object.
    public subscript(key: String) -> JSONValue? { objectValue?[key] }

    /// The JSON type's name as QAPI error messages spell it.
    public var typeName: String {
        switch self {
        case .null: "null"
        case .bool: "boolean"
        case .int, .double: "number"
        case .string: "string"
        case .array: "array"
        case .object: "object"
        }
    }
}

// MARK: - Serializer

extension JSONValue {
    /// Compact JSON on one line, ASCII only (as QEMU writes it): members in order, `", "` and
    /// `": "` separators, every character outside printable ASCII escaped. Non-finite doubles,
    /// which JSON cannot express, are written as `null`.
    public var serialized: String {
        var out: [UInt8] = []
        out.reserveCapacity(64)
        serialize(into: &out)
        return String(decoding: out, as: UTF8.self)
    }

    /// Appends the compact serialization's UTF-8 bytes to `out`.
    public func serialize(into out: inout [UInt8]) {
        switch self {
        case .null: out += Array("null".utf8)
        case .bool(let b): out += Array((b ? "true" : "false").utf8)
        case .int(let i): out += Array(String(i).utf8)
        case .double(let d):
            if !d.isFinite {
                out += Array("null".utf8)
            } else {
                // Swift's shortest round-trip form ("1.0", "0.1", "1e-05", "1e+20") is valid JSON.
                out += Array(d.description.utf8)
            }
        case .string(let s): JSONValue.serializeString(s, into: &out)
        case .array(let a):
            out.append(UInt8(ascii: "["))
            for (i, v) in a.enumerated() {
                if i > 0 { out += [UInt8(ascii: ","), UInt8(ascii: " ")] }
                v.serialize(into: &out)
            }
            out.append(UInt8(ascii: "]"))
        case .object(let o):
            out.append(UInt8(ascii: "{"))
            for (i, m) in o.members.enumerated() {
                if i > 0 { out += [UInt8(ascii: ","), UInt8(ascii: " ")] }
                JSONValue.serializeString(m.key, into: &out)
                out += [UInt8(ascii: ":"), UInt8(ascii: " ")]
                m.value.serialize(into: &out)
            }
            out.append(UInt8(ascii: "}"))
        }
    }

    private static let hexDigits: [UInt8] = Array("0123456789abcdef".utf8)

    private static func appendUnicodeEscape(_ unit: UInt16, into out: inout [UInt8]) {
        out += [UInt8(ascii: "\\"), UInt8(ascii: "u"),
                hexDigits[Int(unit >> 12)], hexDigits[Int((unit >> 8) & 0xF)],
                hexDigits[Int((unit >> 4) & 0xF)], hexDigits[Int(unit & 0xF)]]
    }

    static func serializeString(_ s: String, into out: inout [UInt8]) {
        out.append(UInt8(ascii: "\""))
        for scalar in s.unicodeScalars {
            switch scalar.value {
            case 0x22: out += [UInt8(ascii: "\\"), UInt8(ascii: "\"")]
            case 0x5C: out += [UInt8(ascii: "\\"), UInt8(ascii: "\\")]
            case 0x08: out += [UInt8(ascii: "\\"), UInt8(ascii: "b")]
            case 0x0C: out += [UInt8(ascii: "\\"), UInt8(ascii: "f")]
            case 0x0A: out += [UInt8(ascii: "\\"), UInt8(ascii: "n")]
            case 0x0D: out += [UInt8(ascii: "\\"), UInt8(ascii: "r")]
            case 0x09: out += [UInt8(ascii: "\\"), UInt8(ascii: "t")]
            case 0x20..<0x7F: out.append(UInt8(scalar.value))
            case 0x10000...:
                let v = scalar.value - 0x10000
                appendUnicodeEscape(UInt16(0xD800 + (v >> 10)), into: &out)
                appendUnicodeEscape(UInt16(0xDC00 + (v & 0x3FF)), into: &out)
            default: appendUnicodeEscape(UInt16(scalar.value), into: &out)
            }
        }
        out.append(UInt8(ascii: "\""))
    }
}

// MARK: - Parser

/// Why a JSON text was rejected. `description` is the text after QEMU's "JSON parse error, ".
public struct JSONParseError: Error, Equatable, Sendable, CustomStringConvertible {
    public let message: String
    /// Byte offset of the problem in the text.
    public let offset: Int

    public init(_ message: String, offset: Int) {
        self.message = message
        self.offset = offset
    }

    public var description: String { message }
}

/// Limits for untrusted JSON.
public struct JSONLimits: Sendable, Equatable {
    /// Largest text accepted, in bytes.
    public var maxBytes: Int
    /// Deepest nesting of arrays and objects accepted (1 for `{}` or `[]`).
    public var maxDepth: Int

    public init(maxBytes: Int = 64 * 1024, maxDepth: Int = 64) {
        self.maxBytes = maxBytes
        self.maxDepth = maxDepth
    }
}

extension JSONValue {
    /// Parses exactly one JSON value (RFC 8259) surrounded by optional whitespace.
    ///
    /// Strict: no comments, no trailing commas, no single quotes, no leading zeros, no bare
    /// control characters in strings, valid UTF-8 only, no lone surrogates, no duplicate keys and no
    /// `\u0000` (QEMU rejects it too: its strings are C strings). Numbers that overflow a Double are
    /// rejected. Errors are returned, never trapped.
    public static func parse(_ bytes: some Collection<UInt8>, limits: JSONLimits = JSONLimits()) -> Result<JSONValue, JSONParseError> {
        let array = Array(bytes)
        guard array.count <= limits.maxBytes else {
            return .failure(JSONParseError("message larger than \(limits.maxBytes) bytes", offset: limits.maxBytes))
        }
        return array.withUnsafeBufferPointer { buffer in
            var parser = JSONParser(buffer, maxDepth: limits.maxDepth)
            do throws(JSONParseError) {
                parser.skipWhitespace()
                let value = try parser.parseValue(depth: 0)
                parser.skipWhitespace()
                if parser.position != buffer.count {
                    throw parser.error("unexpected data after the value")
                }
                return .success(value)
            } catch {
                return .failure(error)
            }
        }
    }

    /// Parses a string's UTF-8 (for tests and literals).
    public static func parse(_ text: String, limits: JSONLimits = JSONLimits()) -> Result<JSONValue, JSONParseError> {
        parse(Array(text.utf8), limits: limits)
    }
}

private struct JSONParser {
    let bytes: UnsafeBufferPointer<UInt8>
    let maxDepth: Int
    var position = 0

    init(_ bytes: UnsafeBufferPointer<UInt8>, maxDepth: Int) {
        self.bytes = bytes
        self.maxDepth = maxDepth
    }

    func error(_ message: String, at offset: Int? = nil) -> JSONParseError {
        JSONParseError(message, offset: offset ?? position)
    }

    var atEnd: Bool { position >= bytes.count }
    var peek: UInt8? { position < bytes.count ? bytes[position] : nil }

    mutating func skipWhitespace() {
        while let c = peek, c == 0x20 || c == 0x0A || c == 0x0D || c == 0x09 { position += 1 }
    }

    static func describe(_ c: UInt8) -> String {
        if c >= 0x21 && c < 0x7F { return "'\(Character(Unicode.Scalar(c)))'" }
        return "byte 0x\(String(c, radix: 16, uppercase: true))"
    }

    mutating func parseValue(depth: Int) throws(JSONParseError) -> JSONValue {
        guard let c = peek else { throw error("unexpected end of input, expecting a value") }
        switch c {
        case UInt8(ascii: "{"): return try parseObject(depth: depth + 1)
        case UInt8(ascii: "["): return try parseArray(depth: depth + 1)
        case UInt8(ascii: "\""): return .string(try parseString())
        case UInt8(ascii: "t"): try literal("true"); return .bool(true)
        case UInt8(ascii: "f"): try literal("false"); return .bool(false)
        case UInt8(ascii: "n"): try literal("null"); return .null
        case UInt8(ascii: "-"), UInt8(ascii: "0")...UInt8(ascii: "9"): return try parseNumber()
        default: throw error("expecting a value, found \(Self.describe(c))")
        }
    }

    mutating func literal(_ word: StaticString) throws(JSONParseError) {
        let start = position
        let n = word.utf8CodeUnitCount
        let w = UnsafeBufferPointer(start: word.utf8Start, count: n)
        guard bytes.count - position >= n, (0..<n).allSatisfy({ bytes[position + $0] == w[$0] }) else {
            var end = position
            while end < bytes.count, end - position < 32, Self.isWordByte(bytes[end]) { end += 1 }
            let token = String(decoding: bytes[position..<max(end, position + 1)], as: UTF8.self)
            throw error("invalid keyword '\(token)'", at: start)
        }
        position += n
        if let c = peek, Self.isWordByte(c) { throw error("invalid keyword", at: start) }
    }

    static func isWordByte(_ c: UInt8) -> Bool {
        (c >= UInt8(ascii: "a") && c <= UInt8(ascii: "z")) || (c >= UInt8(ascii: "A") && c <= UInt8(ascii: "Z"))
            || (c >= UInt8(ascii: "0") && c <= UInt8(ascii: "9")) || c == UInt8(ascii: "_")
    }

    static func isDigit(_ c: UInt8?) -> Bool { c.map { $0 >= 0x30 && $0 <= 0x39 } ?? false }

    mutating func parseNumber() throws(JSONParseError) -> JSONValue {
        let start = position
        if peek == UInt8(ascii: "-") { position += 1 }
        guard let first = peek, Self.isDigit(first) else { throw error("invalid number: expecting a digit", at: position) }
        if first == UInt8(ascii: "0") {
            position += 1
            if Self.isDigit(peek) { throw error("invalid number: leading zero", at: start) }
        } else {
            while Self.isDigit(peek) { position += 1 }
        }
        var integral = true
        if peek == UInt8(ascii: ".") {
            integral = false
            position += 1
            guard Self.isDigit(peek) else { throw error("invalid number: expecting a digit after '.'") }
            while Self.isDigit(peek) { position += 1 }
        }
        if peek == UInt8(ascii: "e") || peek == UInt8(ascii: "E") {
            integral = false
            position += 1
            if peek == UInt8(ascii: "+") || peek == UInt8(ascii: "-") { position += 1 }
            guard Self.isDigit(peek) else { throw error("invalid number: expecting a digit in the exponent") }
            while Self.isDigit(peek) { position += 1 }
        }
        if let c = peek, Self.isWordByte(c) || c == UInt8(ascii: ".") {
            throw error("invalid number: unexpected \(Self.describe(c))")
        }
        let text = String(decoding: bytes[start..<position], as: UTF8.self)
        if integral, let i = Int64(text) { return .int(i) }
        guard let d = Double(text), d.isFinite else { throw error("number out of range", at: start) }
        return .double(d)
    }

    mutating func parseArray(depth: Int) throws(JSONParseError) -> JSONValue {
        guard depth <= maxDepth else { throw error("nesting deeper than \(maxDepth) levels") }
        position += 1 // [
        var items: [JSONValue] = []
        skipWhitespace()
        if peek == UInt8(ascii: "]") { position += 1; return .array(items) }
        while true {
            skipWhitespace()
            items.append(try parseValue(depth: depth))
            skipWhitespace()
            guard let c = peek else { throw error("unexpected end of input in an array") }
            position += 1
            if c == UInt8(ascii: "]") { return .array(items) }
            guard c == UInt8(ascii: ",") else { throw error("expecting ',' or ']' in an array, found \(Self.describe(c))", at: position - 1) }
        }
    }

    mutating func parseObject(depth: Int) throws(JSONParseError) -> JSONValue {
        guard depth <= maxDepth else { throw error("nesting deeper than \(maxDepth) levels") }
        position += 1 // {
        var members: [JSONObject.Member] = []
        var seen = Set<String>()
        skipWhitespace()
        if peek == UInt8(ascii: "}") { position += 1; return .object(JSONObject(uniqueMembers: members)) }
        while true {
            skipWhitespace()
            guard let q = peek else { throw error("unexpected end of input in an object") }
            guard q == UInt8(ascii: "\"") else { throw error("key is not a string in object, found \(Self.describe(q))") }
            let keyStart = position
            let key = try parseString()
            guard seen.insert(key).inserted else { throw error("duplicate key '\(key)'", at: keyStart) }
            skipWhitespace()
            guard peek == UInt8(ascii: ":") else { throw error("missing ':' after key '\(key)' in object") }
            position += 1
            skipWhitespace()
            members.append((key: key, value: try parseValue(depth: depth)))
            skipWhitespace()
            guard let c = peek else { throw error("unexpected end of input in an object") }
            position += 1
            if c == UInt8(ascii: "}") { return .object(JSONObject(uniqueMembers: members)) }
            guard c == UInt8(ascii: ",") else { throw error("expecting ',' or '}' in an object, found \(Self.describe(c))", at: position - 1) }
        }
    }

    mutating func hex4() throws(JSONParseError) -> UInt32 {
        guard bytes.count - position >= 4 else { throw error("incomplete \\u escape") }
        var v: UInt32 = 0
        for _ in 0..<4 {
            let c = bytes[position]
            let d: UInt32
            switch c {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): d = UInt32(c - UInt8(ascii: "0"))
            case UInt8(ascii: "a")...UInt8(ascii: "f"): d = UInt32(c - UInt8(ascii: "a") + 10)
            case UInt8(ascii: "A")...UInt8(ascii: "F"): d = UInt32(c - UInt8(ascii: "A") + 10)
            default: throw error("invalid hex digit in \\u escape")
            }
            v = v << 4 | d
            position += 1
        }
        return v
    }

    /// Parses a string at `position` (which holds the opening quote), validating UTF-8.
    mutating func parseString() throws(JSONParseError) -> String {
        position += 1 // "
        var out: [UInt8] = []
        while true {
            guard let c = peek else { throw error("unexpected end of input in a string") }
            switch c {
            case UInt8(ascii: "\""):
                position += 1
                // Every byte appended was validated or produced from a scalar: decoding cannot repair.
                return String(decoding: out, as: UTF8.self)
            case UInt8(ascii: "\\"):
                let escapeStart = position
                position += 1
                guard let e = peek else { throw error("unexpected end of input in a string") }
                position += 1
                switch e {
                case UInt8(ascii: "\""): out.append(0x22)
                case UInt8(ascii: "\\"): out.append(0x5C)
                case UInt8(ascii: "/"): out.append(0x2F)
                case UInt8(ascii: "b"): out.append(0x08)
                case UInt8(ascii: "f"): out.append(0x0C)
                case UInt8(ascii: "n"): out.append(0x0A)
                case UInt8(ascii: "r"): out.append(0x0D)
                case UInt8(ascii: "t"): out.append(0x09)
                case UInt8(ascii: "u"):
                    var scalar = try hex4()
                    if scalar == 0 { throw error("\\u0000 is not supported", at: escapeStart) }
                    if (0xDC00...0xDFFF).contains(scalar) {
                        throw error("lone low surrogate in \\u escape", at: escapeStart)
                    }
                    if (0xD800...0xDBFF).contains(scalar) {
                        guard bytes.count - position >= 6, bytes[position] == UInt8(ascii: "\\"),
                              bytes[position + 1] == UInt8(ascii: "u") else {
                            throw error("lone high surrogate in \\u escape", at: escapeStart)
                        }
                        position += 2
                        let low = try hex4()
                        guard (0xDC00...0xDFFF).contains(low) else {
                            throw error("high surrogate not followed by a low surrogate", at: escapeStart)
                        }
                        scalar = 0x10000 + ((scalar - 0xD800) << 10) + (low - 0xDC00)
                    }
                    // Not a surrogate, so a valid scalar.
                    out += Array(String(Character(Unicode.Scalar(scalar)!)).utf8)
                default:
                    throw error("invalid escape sequence '\\\(Self.describe(e).trimmingQuotes)' in a string", at: escapeStart)
                }
            case 0x00..<0x20:
                throw error("control character \(Self.describe(c)) in a string (must be escaped)")
            case 0x20..<0x80:
                out.append(c)
                position += 1
            default:
                let n = try utf8SequenceLength()
                out += bytes[position..<position + n]
                position += n
            }
        }
    }

    /// Validates the multi-byte UTF-8 sequence at `position` (RFC 3629: no overlongs, no
    /// surrogates, nothing above U+10FFFF) and returns its length.
    func utf8SequenceLength() throws(JSONParseError) -> Int {
        let b0 = bytes[position]
        let n: Int
        var lo: UInt8 = 0x80, hi: UInt8 = 0xBF // allowed range of the second byte
        switch b0 {
        case 0xC2...0xDF: n = 2
        case 0xE0: n = 3; lo = 0xA0
        case 0xE1...0xEC, 0xEE...0xEF: n = 3
        case 0xED: n = 3; hi = 0x9F
        case 0xF0: n = 4; lo = 0x90
        case 0xF1...0xF3: n = 4
        case 0xF4: n = 4; hi = 0x8F
        default: throw error("invalid UTF-8 byte 0x\(String(b0, radix: 16, uppercase: true)) in a string")
        }
        guard bytes.count - position >= n else { throw error("truncated UTF-8 sequence in a string") }
        let b1 = bytes[position + 1]
        guard b1 >= lo && b1 <= hi else { throw error("invalid UTF-8 sequence in a string") }
        for i in 2..<max(2, n) where !(0x80...0xBF).contains(bytes[position + i]) {
            throw error("invalid UTF-8 sequence in a string")
        }
        return n
    }
}

private extension String {
    var trimmingQuotes: String {
        if hasPrefix("'") && hasSuffix("'") && count >= 2 { return String(dropFirst().dropLast()) }
        return self
    }
}
