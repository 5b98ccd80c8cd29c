import Glibc
import Testing
import TestSupport
import VMMSys

/// `--tpm` errors: one line on stderr, exit status 1, nothing written.
@Suite("swiftvmm --tpm: errors")
struct TPMCLITests {
    @Test("an unknown backend or option, a missing path, a duplicate key: one line each", arguments: [
        (["--tpm", "tpm2"], "unknown backend \"tpm2\""),
        (["--tpm", "swtpm,path=/run/x"], "unknown option path="),
        (["--tpm", "builtin,state=/tmp/x,socket=/run/y"], "unknown option socket="),
        (["--tpm", "swtpm"], "swtpm needs socket=PATH"),
        (["--tpm", "builtin,state="], "builtin needs state=PATH"),
        (["--tpm", "swtpm,socket=/a,socket=/b"], "socket= is given twice"),
        (["--tpm", ""], "a backend is needed"),
        (["--tpm", "swtpm,socket=/" + String(repeating: "s", count: 120)], "longer than the 107-byte limit"),
    ])
    func badArguments(args: [String], message: String) {
        expectOneErrorLine(Invocation(["run", "--kernel", "/boot/none"] + args), containing: message)
        expectOneErrorLine(Invocation(["restore", "/tmp/none"] + args), containing: message)
    }

    @Test("swtpm: a socket that does not exist, and one whose server is not swtpm", .enabled(if: installedDebianKernel() != nil, "needs a Debian kernel image"))
    func swtpmSocketProblems() throws {
        let kernel = try #require(installedDebianKernel())
        let dir = makeTemporaryDirectory("swiftvmm-tpm-cli")
        defer { _ = runProcess(["rm", "-rf", dir]) }
        expectOneErrorLine(Invocation(["run", "--kernel", kernel, "--tpm", "swtpm,socket=\(dir)/none.sock"]),
                           containing: "swtpm at \(dir)/none.sock: cannot connect (No such file or directory): start `swtpm socket --tpm2")

        // A server that answers like a web server and hangs up.
        let path = dir + "/http.sock"
        let listener = try UnixListener(path: path, description: "test server", temporaryPrefix: ".test")
        let server = try OSThread(name: "not-swtpm") { [listener] in
            if let client = try? listener.accept() {
                let reply = Array("HTTP/1.0 400 Bad Request\r\n\r\n".utf8)
                _ = reply.withUnsafeBytes { try? client.send($0) }
            }
        }
        let r = Invocation(["run", "--kernel", kernel, "--tpm", "swtpm,socket=\(path)"], timeoutSeconds: 30)
        server.join()
        expectOneErrorLine(r, containing: "swtpm at \(path)")
        #expect(r.stderr.contains("swtpm"), "\(r.stderr)")
    }
}
