import Glibc
import Testing
import VMMSys

/// The house rule: raw descriptors and system calls live in VMMSys. The QMP module's sources must
/// call none of them directly (nor the CLinux shims, nor anything through `Glibc.`); they use
/// VMMSys's owners (`UnixListener`, `UnixStream`, `PollSet`, `EventFD`) and descriptor functions.
/// Comments may name them; methods and declarations of our own that share a name
/// (`session.close()`, `func open(fdSetID:)`) are not calls of the C function.
@Suite("QMP sources make no raw system calls")
struct NoRawSyscallsTests {
    /// C functions the QMP sources must not call.
    static let forbidden: Set<String> = [
        "socket", "bind", "listen", "accept", "accept4", "connect", "shutdown",
        "recvmsg", "sendmsg", "send", "recv", "sendto", "recvfrom",
        "poll", "ppoll", "select", "epoll_wait", "epoll_ctl",
        "fcntl", "ioctl", "close", "dup", "dup2", "dup3", "pipe", "pipe2", "eventfd",
        "open", "openat", "read", "write", "pread", "pwrite",
        "unlink", "unlinkat", "rename", "renameat", "renameat2", "link", "linkat", "mkdir", "rmdir",
        "stat", "lstat", "fstat", "fstatat", "chmod", "fchmod", "fchmodat",
        "opendir", "fdopendir", "readdir", "closedir",
        "kill", "getpid", "clock_gettime", "pthread_self", "pthread_equal", "pthread_create",
    ]

    /// `source` with comments removed and string literals blanked (their interpolations kept, as
    /// they are code).
    static func code(of source: String) -> String {
        let s = Array(source.unicodeScalars)
        var out = String.UnicodeScalarView()
        var i = 0
        // Open string literals, innermost last: raw-string hashes, multi-line, and the paren depth of
        // the interpolation being read (nil while in the literal's text).
        var strings: [(hashes: Int, multiline: Bool, depth: Int?)] = []
        func at(_ k: Int, _ text: String) -> Bool {
            let t = Array(text.unicodeScalars)
            return k + t.count <= s.count && Array(s[k..<(k + t.count)]) == t
        }
        while i < s.count {
            let c = s[i]
            if let top = strings.last, top.depth == nil {
                // In a literal's text.
                let close = (top.multiline ? "\"\"\"" : "\"") + String(repeating: "#", count: top.hashes)
                if at(i, close) {
                    strings.removeLast()
                    out.append(contentsOf: close.unicodeScalars)
                    i += close.unicodeScalars.count
                } else if at(i, "\\" + String(repeating: "#", count: top.hashes) + "(") {
                    strings[strings.count - 1].depth = 1
                    i += top.hashes + 2
                    out.append(" ")
                    out.append("(")
                } else if c == "\\" && top.hashes == 0 {
                    out.append(" ")
                    out.append(" ")
                    i += 2
                } else {
                    out.append(c == "\n" ? "\n" : " ")
                    i += 1
                }
                continue
            }
            if at(i, "//") {
                while i < s.count && s[i] != "\n" { i += 1 }
                continue
            }
            if at(i, "/*") {
                var depth = 0
                repeat {
                    if at(i, "/*") { depth += 1; i += 2 } else if at(i, "*/") { depth -= 1; i += 2 } else {
                        if s[i] == "\n" { out.append("\n") }
                        i += 1
                    }
                } while depth > 0 && i < s.count
                out.append(" ")
                continue
            }
            var hashes = 0
            while at(i + hashes, "#") { hashes += 1 }
            if at(i + hashes, "\"") {
                let multiline = at(i + hashes, "\"\"\"")
                let open = String(repeating: "#", count: hashes) + (multiline ? "\"\"\"" : "\"")
                out.append(contentsOf: open.unicodeScalars)
                i += open.unicodeScalars.count
                strings.append((hashes, multiline, nil))
                continue
            }
            if !strings.isEmpty, let depth = strings.last!.depth {
                if c == "(" { strings[strings.count - 1].depth = depth + 1 }
                if c == ")" { strings[strings.count - 1].depth = depth == 1 ? nil : depth - 1 }
            }
            out.append(c)
            i += 1
        }
        return String(out)
    }

    /// The forbidden calls in `source`, as "line: what".
    static func violations(in source: String) -> [String] {
        var found: [String] = []
        for (number, line) in code(of: source).split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            let chars = Array(line)
            var i = 0
            while i < chars.count {
                guard chars[i].isLetter || chars[i] == "_" else { i += 1; continue }
                let start = i
                while i < chars.count && (chars[i].isLetter || chars[i].isNumber || chars[i] == "_") { i += 1 }
                let word = String(chars[start..<i])
                var before = start - 1
                while before >= 0 && chars[before] == " " { before -= 1 }
                var after = i
                while after < chars.count && chars[after] == " " { after += 1 }
                let qualified = before >= 0 && chars[before] == "."
                let declared = String(chars[..<start]).split(separator: " ").last.map { ["func", "case", "var", "let"].contains($0) } ?? false
                let called = after < chars.count && chars[after] == "("
                if (start == 0 || !(chars[start - 1].isLetter || chars[start - 1].isNumber)) && !qualified {
                    if word == "Glibc" && after < chars.count && chars[after] == "." {
                        found.append("\(number + 1): Glibc.")
                    } else if word.hasPrefix("clinux_") || word.hasPrefix("CLINUX_") {
                        found.append("\(number + 1): \(word)")
                    } else if Self.forbidden.contains(word) && called && !declared {
                        found.append("\(number + 1): \(word)(")
                    }
                }
            }
        }
        return found
    }

    @Test("the detector finds raw calls and ignores comments, strings, methods and declarations")
    func detector() {
        let bad = """
        let fd = socket(AF_UNIX, 1, 0)
        _ = Glibc.close(fd)
        let n = clinux_recv_fds(fd, nil, 0, 0, nil, 0, nil)
        if poll (&p, 1, -1) < 0 {}
        let s = "at \\(fcntl(fd, F_GETFL)) now"
        """
        #expect(Self.violations(in: bad) == ["1: socket(", "2: Glibc.", "3: clinux_recv_fds", "4: poll(", "5: fcntl("])
        let fine = """
        // close(fd) once done; unlink(path)
        /* a block comment: rename(a, b) /* nested: open(x) */ still comment: send(x) */
        c.session.close()
        public func open(fdSetID: Int64) {}
        try self.open(fdSetID: 1)
        let message = "rename the QMP socket to (\\(path)) and close(it)"
        let raw = #"{"execute": "send(x)"}"#
        closeDescriptor(fd)
        let stream = try listener.accept()
        """
        #expect(Self.violations(in: fine) == [])
    }

    @Test("Sources/QMP and Sources/Backends call no system call and no C shim directly",
          arguments: [("QMP", ["QMPServer.swift", "FdSets.swift"]), ("Backends", ["SwtpmEngine.swift", "TPMStateStore.swift"])])
    func noRawCalls(module: String, expected: [String]) throws {
        // Tests/QMPTests/ThisFile.swift -> Sources/MODULE
        var parts = "\(#filePath)".split(separator: "/", omittingEmptySubsequences: false)
        parts.removeLast(3)
        let directory = parts.joined(separator: "/") + "/Sources/" + module
        guard let dir = opendir(directory) else {
            Issue.record("cannot list \(directory)")
            return
        }
        var names: [String] = []
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            if name.hasSuffix(".swift") { names.append(name) }
        }
        closedir(dir)
        #expect(expected.allSatisfy(names.contains), "\(names)")
        for name in names.sorted() {
            let file = try OwnedFD.open(directory + "/" + name, flags: O_RDONLY)
            let source = String(decoding: try file.readAll(limit: 1 << 22), as: UTF8.self)
            let found = Self.violations(in: source)
            #expect(found.isEmpty, "raw system calls in Sources/\(module)/\(name): \(found.joined(separator: ", "))")
        }
    }
}
