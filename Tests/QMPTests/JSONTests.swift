import QMP
import Testing

@Suite("JSON parser and serializer")
struct JSONTests {
    func parsed(_ text: String, sourceLocation: SourceLocation = #_sourceLocation) -> JSONValue? {
        switch JSONValue.parse(text) {
        case .success(let v): return v
        case .failure(let e):
            Issue.record("rejected \(text): \(e)", sourceLocation: sourceLocation)
            return nil
        }
    }

    func rejection(_ bytes: [UInt8], limits: JSONLimits = JSONLimits()) -> String? {
        switch JSONValue.parse(bytes, limits: limits) {
        case .success: return nil
        case .failure(let e): return e.message
        }
    }

    func rejection(_ text: String, limits: JSONLimits = JSONLimits()) -> String? {
        rejection(Array(text.utf8), limits: limits)
    }

    @Test("QEMU-style compact output, members in insertion order")
    func serializerGolden() {
        #expect(JSONValue.object([:]).serialized == "{}")
        #expect(JSONValue.array([]).serialized == "[]")
        let empty: JSONValue = ["return": [:]]
        #expect(empty.serialized == #"{"return": {}}"#)
        let v: JSONValue = ["b": 1, "a": [true, false, nil], "c": ["z": "x", "y": -7]]
        #expect(v.serialized == #"{"b": 1, "a": [true, false, null], "c": {"z": "x", "y": -7}}"#)
        #expect(JSONValue.int(Int64.min).serialized == "-9223372036854775808")
    }

    @Test("strings are escaped: quotes, backslash, controls, non-ASCII as \\u (with surrogate pairs)")
    func stringEscapes() {
        let s: JSONValue = .string("a\"b\\c/\n\r\t\u{8}\u{C}\u{1}\u{7F}é€😀")
        #expect(s.serialized == #""a\"b\\c/\n\r\t\b\f\u0001\u007f\u00e9\u20ac\ud83d\ude00""#)
        #expect(JSONValue.parse(s.serialized) == .success(s))
    }

    @Test("doubles: shortest round-trip text, integral doubles stay doubles, non-finite becomes null")
    func doubles() {
        #expect(JSONValue.double(0.1).serialized == "0.1")
        #expect(JSONValue.double(1).serialized == "1.0")
        #expect(JSONValue.double(-2.5).serialized == "-2.5")
        #expect(JSONValue.double(1e20).serialized == "1e+20")
        #expect(JSONValue.double(1e-5).serialized == "1e-05")
        #expect(JSONValue.double(.infinity).serialized == "null")
        #expect(JSONValue.double(.nan).serialized == "null")
        for d in [0.1, 1.0, -2.5, 1e20, 1e-5, 123456789.125, Double.leastNonzeroMagnitude, Double.greatestFiniteMagnitude] {
            #expect(JSONValue.parse(JSONValue.double(d).serialized) == .success(.double(d)))
        }
    }

    @Test("accepted documents")
    func accepted() {
        #expect(parsed(#"  {"a": [1, 2.5, true, false, null, "x"], "b": {}}  "#)
                == ["a": [1, 2.5, true, false, nil, "x"], "b": [:]])
        #expect(parsed("\n\t\r 7 \n") == 7)
        #expect(parsed(#""\ud83d\ude00 \u00e9\u20AC \/""#) == "😀 é€ /")
        #expect(parsed("\"h\u{e9}llo \u{1F600}\"") == "héllo 😀") // raw UTF-8
        #expect(parsed(#"[[], {}, [{}], {"": ""}]"#) == [[], [:], [[:]], ["": ""]])
    }

    @Test("numbers: integers that fit are .int, the rest .double")
    func numbers() {
        #expect(parsed("0") == .int(0))
        #expect(parsed("-0") == .int(0))
        #expect(parsed("123") == .int(123))
        #expect(parsed("-9223372036854775808") == .int(.min))
        #expect(parsed("9223372036854775807") == .int(.max))
        #expect(parsed("9223372036854775808") == .double(9223372036854775808))
        #expect(parsed("1.5") == .double(1.5))
        #expect(parsed("1e3") == .double(1000))
        #expect(parsed("1E-2") == .double(0.01))
        #expect(parsed("-0.5e+1") == .double(-5))
        #expect(parsed("1.0") == .double(1))
    }

    @Test("rejected numbers", arguments: [
        "01", "-01", "1.", ".5", "+1", "1e", "1e+", "--1", "0x10", "NaN", "Infinity", "-Infinity",
        "1e400", "-1e400", "1.5.2", "1a", "- 1", "00",
    ])
    func badNumbers(_ text: String) {
        #expect(rejection(text) != nil, "\(text) was accepted")
    }

    @Test("rejected syntax", arguments: [
        "", "   ", "[1,]", #"{"a":1,}"#, "{'a':1}", "[1 2]", #"{"a" 1}"#, "{1:2}", #"{"a":}"#, "[", "]",
        "{", "}", "tru", "nul", "truex", "True", "nulll", "[1]]", "{}}", "{} x", "{}{}", "/* c */ {}",
        "// c\n{}", "[1,,2]", "[,1]", #"{"a":1 "b":2}"#, #"{,"a":1}"#, "\u{FEFF}{}", "'x'", "undefined",
    ])
    func badSyntax(_ text: String) {
        #expect(rejection(text) != nil, "\(text) was accepted")
    }

    @Test("trailing garbage is named")
    func trailingGarbage() {
        #expect(rejection(#"{"a": 1} x"#) == "unexpected data after the value")
        #expect(rejection("{}{}") == "unexpected data after the value")
    }

    @Test("bad strings: escapes, surrogates, control characters")
    func badStrings() {
        #expect(rejection(#""abc"#)?.contains("end of input") == true)
        #expect(rejection(#""\x""#)?.contains("invalid escape") == true)
        #expect(rejection(#""\'""#)?.contains("invalid escape") == true)
        #expect(rejection(#""\u12""#) != nil)
        #expect(rejection(#""\u12G4""#)?.contains("hex digit") == true)
        #expect(rejection(#""\ud800""#)?.contains("lone high surrogate") == true)
        #expect(rejection(#""\ud800x""#)?.contains("lone high surrogate") == true)
        #expect(rejection(#""\udc00""#)?.contains("lone low surrogate") == true)
        #expect(rejection(#""\ud800\u0041""#)?.contains("not followed by a low surrogate") == true)
        #expect(rejection(#""\ud800\ud800""#) != nil)
        #expect(rejection(#""\u0000""#)?.contains("\\u0000") == true)
        #expect(rejection("\"a\u{1}b\"")?.contains("control character") == true)
        #expect(rejection("\"a\nb\"")?.contains("control character") == true)
        #expect(rejection("\"a\tb\"")?.contains("control character") == true)
    }

    @Test("invalid UTF-8 is rejected", arguments: [
        [0x22, 0xFF, 0x22],                   // never valid
        [0x22, 0x80, 0x22],                   // lone continuation byte
        [0x22, 0xC0, 0xAF, 0x22],             // overlong '/'
        [0x22, 0xE0, 0x80, 0xAF, 0x22],       // overlong, 3 bytes
        [0x22, 0xED, 0xA0, 0x80, 0x22],       // UTF-16 surrogate encoded
        [0x22, 0xE2, 0x82, 0x22],             // truncated
        [0x22, 0xF4, 0x90, 0x80, 0x80, 0x22], // above U+10FFFF
        [0x22, 0xC3, 0x22],                   // cut by the closing quote
        [0xC3, 0xA9],                         // outside a string
        [0x22, 0xF0, 0x9F, 0x98],             // truncated at the end
    ] as [[UInt8]])
    func invalidUTF8(_ bytes: [UInt8]) {
        #expect(rejection(bytes) != nil)
    }

    @Test("valid UTF-8 at the edges of each range is accepted")
    func validUTF8Edges() {
        let samples: [[UInt8]] = [
            [0xC2, 0x80], [0xDF, 0xBF], [0xE0, 0xA0, 0x80], [0xED, 0x9F, 0xBF], [0xEE, 0x80, 0x80],
            [0xEF, 0xBF, 0xBF], [0xF0, 0x90, 0x80, 0x80], [0xF4, 0x8F, 0xBF, 0xBF],
        ]
        for s in samples {
            let r = JSONValue.parse([0x22] + s + [0x22])
            #expect(r == .success(.string(String(decoding: s, as: UTF8.self))))
        }
    }

    @Test("nesting: 64 levels pass, 65 do not, and 100000 fail cleanly without recursion trouble")
    func nesting() {
        let ok = String(repeating: "[", count: 64) + String(repeating: "]", count: 64)
        #expect(rejection(ok) == nil)
        let objects = String(repeating: #"{"a":"#, count: 64) + "1" + String(repeating: "}", count: 64)
        #expect(rejection(objects) == nil)
        let deep = String(repeating: "[", count: 65) + String(repeating: "]", count: 65)
        #expect(rejection(deep)?.contains("nesting") == true)
        let deeper = String(repeating: #"{"a":["#, count: 50_000) + String(repeating: "]}", count: 50_000)
        #expect(rejection(deeper, limits: JSONLimits(maxBytes: 1 << 20, maxDepth: 64))?.contains("nesting") == true)
    }

    @Test("size limit")
    func sizeLimit() {
        let big = "\"" + String(repeating: "x", count: 64 * 1024) + "\""
        #expect(rejection(big)?.contains("larger than") == true)
        let fits = "\"" + String(repeating: "x", count: 64 * 1024 - 2) + "\""
        #expect(rejection(fits) == nil)
    }

    @Test("duplicate keys are rejected")
    func duplicateKeys() {
        #expect(rejection(#"{"a": 1, "a": 2}"#)?.contains("duplicate key 'a'") == true)
        #expect(rejection(#"{"a": 1, "b": {"a": 2}}"#) == nil)
    }

    @Test("objects compare without regard to member order; the order is kept")
    func objectOrder() {
        let a = json(#"{"x": 1, "y": 2}"#)
        let b = json(#"{"y": 2, "x": 1}"#)
        #expect(a == b)
        #expect(a.serialized == #"{"x": 1, "y": 2}"#)
        #expect(b.serialized == #"{"y": 2, "x": 1}"#)
        #expect(a != json(#"{"x": 1, "y": 3}"#))
        #expect(a != json(#"{"x": 1}"#))
        var o = JSONObject()
        o["k"] = 1
        o["j"] = 2
        o["k"] = 3
        #expect(o.keys == ["k", "j"] && o["k"] == 3)
        o["k"] = nil
        #expect(o.keys == ["j"])
    }

    @Test("round trip of a mixed document")
    func roundTrip() {
        let v: JSONValue = ["return": ["list": [1, -2, 3.25, nil, "q\"uote", ["nested": [[:]]]], "b": false],
                            "id": ["complex": [1, "two"]]]
        #expect(JSONValue.parse(v.serialized) == .success(v))
    }
}
