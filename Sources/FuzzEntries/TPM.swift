import Backends
import Devices
import Glibc
import VMMSys

extension Fuzz {
    // `fuzz-tpm-tis`: a guest's register accesses to the TPM's TIS, with the backend's responses.

    /// Answers each command when the input says so, with bytes from the input.
    final class ScriptedTPM: TPMBackend, @unchecked Sendable {
        let info = TPMBackendInfo(kind: .builtin, path: "fuzz")
        let bufferSize: Int
        var pending: [@Sendable ([UInt8]) -> Void] = []
        var submitted = 0
        init(bufferSize: Int) { self.bufferSize = bufferSize }
        func submit(_ command: [UInt8], locality: UInt8, complete: @escaping @Sendable ([UInt8]) -> Void) {
            precondition(command.count >= 10 && command.count <= bufferSize, "the TIS handed over a command of \(command.count) bytes")
            precondition(TPMTIS.sizeField(command) == command.count, "the TIS handed over a command whose header lies")
            submitted += 1
            pending.append(complete)
        }
        func cancel() {}
        func waitUntilIdle(timeoutMilliseconds: Int) -> Bool { pending.isEmpty }
    }

    /// Byte 0 picks the buffer size (10 + byte × 17, up to 4096). Then 4-byte operations:
    /// [kind, offset low, offset high | locality << 4, value]: kind % 4 = 0 read, 1 write, 2 the
    /// backend answers with the next `value` input bytes, 3 save → restore → save. Sizes come from
    /// kind's bits 2-3. Checks, by trapping, that the TIS never hands over a malformed command, that
    /// its state never holds more than its buffer, that a non-active locality reads STS as ones,
    /// and that its snapshot round-trips; must never trap otherwise.
    public static func tpmTIS(_ data: [UInt8]) {
        guard let first = data.first else { return }
        let backend = ScriptedTPM(bufferSize: min(4096, 10 + Int(first) * 17))
        let tis = TPMTIS(backend: backend, placement: .init(base: 0))
        var i = 1
        while i + 4 <= data.count {
            let kind = data[i], value = data[i + 3]
            let locality = UInt64(data[i + 2] >> 4) % 5
            let offset = locality << 12 | UInt64(data[i + 2] & 0x0F) << 8 | UInt64(data[i + 1])
            let size = [1, 2, 4, 8][Int(kind >> 2) & 3]
            i += 4
            switch kind % 4 {
            case 0:
                var out = [UInt8](repeating: 0, count: size)
                out.withUnsafeMutableBytes { tis.read(offset: offset, data: $0) }
                if offset & 0xFFF == 0x18 && size == 4 && Int(tis.saveState().activeLocality) != Int(locality) {
                    precondition(out == [0xFF, 0xFF, 0xFF, 0xFF], "STS of an inactive locality reads \(out)")
                }
            case 1:
                let bytes = (0..<size).map { value &+ UInt8($0) }
                bytes.withUnsafeBytes { tis.write(offset: offset, data: $0) }
            case 2:
                guard !backend.pending.isEmpty else { continue }
                let n = min(Int(value) * 4, data.count - i)
                let response = Array(data[i..<(i + n)])
                i += n
                backend.pending.removeFirst()(response)
            default:
                let saved = tis.saveSnapshot()
                let copy = TPMTIS(backend: ScriptedTPM(bufferSize: backend.bufferSize), placement: .init(base: 0))
                if (try? copy.restoreSnapshot(saved, version: TPMTIS.snapshotVersion)) != nil {
                    precondition(copy.saveSnapshot() == saved, "a TIS snapshot does not round-trip")
                } else {
                    precondition(tis.commandInFlight, "a TIS snapshot between commands was refused")
                }
            }
            let s = tis.saveState()
            precondition(s.buffer.count <= tis.bufferSize && Int(s.offset) <= max(s.buffer.count, 0), "TIS buffer \(s.buffer.count)/\(s.offset)")
        }
    }

    // `fuzz-tpm-state`: TPM state files (a file written by anyone) opened and read.

    static let tpmStateEntries = [TPMStateStore.Entry(name: "permall", maxSize: 200), TPMStateStore.Entry(name: "volatilestate", maxSize: 64)]

    /// A valid state file of `tpmStateEntries` with both entries written twice (a seed to mutate).
    public static func tpmStateSeed() -> [UInt8] {
        let path = "/tmp/.swiftvmm-fuzz-tpm-seed.\(getpid())"
        defer { try? FileSystem.removeFile(path) }
        do {
            let store = try TPMStateStore.open(path: path, entries: tpmStateEntries).store
            try store.write("permall", Array(0..<150))
            try store.write("permall", Array(10..<190))
            try store.write("volatilestate", [1, 2, 3])
            try store.write("volatilestate", [4, 5, 6, 7])
        } catch { return [] }
        return (try? OwnedFD.open(path, flags: O_RDONLY | O_CLOEXEC).readAll(limit: 1 << 20)) ?? []
    }

    /// The input is written to a scratch file, which `swiftvmm nvram inspect` describes (its text
    /// must name the file) and which is then opened as a TPM state store of small entries and every
    /// entry read; a read that succeeds is written back and must read back equal. Must never trap.
    public static func tpmState(_ data: [UInt8]) {
        let path = "/tmp/.swiftvmm-fuzz-tpm-state.\(getpid())"
        defer { try? FileSystem.removeFile(path) }
        do {
            let fd = try OwnedFD.open(path, flags: O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, mode: 0o600)
            try data.withUnsafeBytes { try fd.writeAll($0) }
        } catch { return }
        let described = TPMStateStore.inspect(path: path)
        precondition(described.text.hasPrefix(path), "nvram inspect's text does not start with the file's path")
        guard let store = try? TPMStateStore.open(path: path, entries: tpmStateEntries).store else { return }
        for e in tpmStateEntries {
            let value: [UInt8]?
            do { value = try store.read(e.name) } catch { continue }
            let bytes = value ?? [9]
            do { try store.write(e.name, bytes) } catch { continue }
            let back: [UInt8]??
            do { back = .some(try store.read(e.name)) } catch { back = nil }
            precondition(back == .some(.some(bytes)), "entry \(e.name) did not read back what was written")
        }
    }
}
