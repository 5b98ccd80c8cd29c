import Glibc
import VMMSys

/// A fresh directory under /tmp, removed with what a test put in it when the value goes.
final class TempDir {
    let path: String

    init(prefix: String = "vmmsys-test") {
        var template = Array("/tmp/\(prefix)-XXXXXX".utf8CString)
        path = template.withUnsafeMutableBufferPointer { String(cString: mkdtemp($0.baseAddress!)!) }
    }

    deinit {
        let fd = try? OwnedFD.openDirectory(path)
        for name in fd?.directoryEntries() ?? [] {
            try? fd?.remove(at: name, directory: (try? fd?.status(at: name))??.kind == .directory)
        }
        rmdir(path)
    }
}
