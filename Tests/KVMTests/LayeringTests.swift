import Foundation
import Testing

/// House rule: raw file descriptors and system calls live in VMMSys only (the layers above use its
/// types and functions). Reads the sources of the modules above it and looks for system calls.
@Suite("layering: system calls only in VMMSys")
struct LayeringTests {
    static let sources = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent("Sources")
    /// Modules that must make no system call themselves.
    static let modules = ["Machine", "Launcher", "Control", "Devices", "Virtio", "Sandbox", "KVM", "BootLoader", "ACPI", "VMMCore", "WireFormat", "swiftvmm"]
    static let calls = ["open", "close", "read", "write", "pread", "pwrite", "lseek", "mkdir", "rmdir", "unlink", "unlinkat",
                        "rename", "renameat", "fcntl", "socket", "bind", "listen", "accept", "accept4", "poll", "fstat", "lstat",
                        "fsync", "ftruncate", "dup", "dup2", "readlink", "access", "mmap", "munmap", "ioctl", "eventfd",
                        "signalfd", "recvmsg", "sendmsg", "pthread_sigmask", "sigprocmask", "kill"]

    /// Calls of a listed function in `text`: the bare name (or `Glibc.` + name) followed by `(`,
    /// not a method (`x.read(`), not a declaration (`func read(`) nor a call of a function the file
    /// declares itself (a device's own `read(...)`), not an enum case; comments ignored.
    static func rawCalls(in text: String) -> [String] {
        let declared = Set(try! NSRegularExpression(pattern: #"func (\w+)"#)
            .matches(in: text, range: NSRange(text.startIndex..., in: text))
            .map { String(text[Range($0.range(at: 1), in: text)!]) })
        let names = calls.filter { !declared.contains($0) }.joined(separator: "|")
        let pattern = try! NSRegularExpression(pattern: #"(?<![\w.])(?:Glibc\.)?("# + names + #")\("#)
        var found: [String] = []
        for line in text.split(separator: "\n", omittingEmptySubsequences: false) {
            var code = String(line)
            if let comment = code.range(of: "//") { code = String(code[..<comment.lowerBound]) }
            if code.contains("func ") || code.contains("case ") { continue }
            let range = NSRange(code.startIndex..., in: code)
            for m in pattern.matches(in: code, range: range) {
                found.append(String(code[Range(m.range(at: 1), in: code)!]))
            }
        }
        return found
    }

    @Test("the checker finds raw calls and ignores methods, declarations and comments")
    func checkerWorks() {
        #expect(Self.rawCalls(in: "let n = read(fd, p, 8)\n_ = Glibc.close(fd)") == ["read", "close"])
        #expect(Self.rawCalls(in: "bus.read(0x60, data: d)\nfunc write(offset: UInt64) {}\n// close(fd)\ncase ioctl(SysError)").isEmpty)
        #expect(Self.rawCalls(in: "func read(_ n: Int) {}\nlet x = read(4)").isEmpty, "the file's own function")
    }

    @Test("no module above VMMSys makes a system call", arguments: modules)
    func noRawCalls(_ module: String) throws {
        let dir = Self.sources.appendingPathComponent(module)
        let files = try FileManager.default.contentsOfDirectory(atPath: dir.path).filter { $0.hasSuffix(".swift") }
        #expect(!files.isEmpty)
        for file in files {
            let text = try String(contentsOf: dir.appendingPathComponent(file), encoding: .utf8)
            let calls = Self.rawCalls(in: text)
            #expect(calls.isEmpty, "\(module)/\(file) calls \(calls)")
        }
    }
}
