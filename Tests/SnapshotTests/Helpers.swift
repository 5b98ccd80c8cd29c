import CLinux
import Glibc
import Testing
import Snapshot

/// A deterministic generator (SplitMix64), so that failures reproduce.
struct SeededRandom: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// Bitwise CRC32C, independent of the C code under test.
func referenceCRC32C(_ bytes: some Sequence<UInt8>, _ start: UInt32 = 0) -> UInt32 {
    var crc = ~start
    for b in bytes {
        crc ^= UInt32(b)
        for _ in 0..<8 { crc = crc & 1 != 0 ? (crc >> 1) ^ 0x82F6_3B78 : crc >> 1 }
    }
    return ~crc
}

func hex(_ v: UInt32) -> String {
    let d = String(v, radix: 16)
    return "0x" + String(repeating: "0", count: 8 - d.count) + d
}

func sampleHeader(memorySize: UInt64 = 256 << 20) -> SnapshotHeader {
    SnapshotHeader(created: 1_700_000_000_123_456_789, writerVersion: "0.1.0", memorySize: memorySize, vcpuCount: 2,
                   machineFlags: .acpi, memoryCRC32C: 0x1234_5678)
}

func sampleSections() -> [SnapshotSection] {
    [
        SnapshotSection(name: "vcpu.0", version: 3, minimumVersion: 2, required: true, payload: Array(0..<200).map { UInt8($0) }),
        SnapshotSection(name: "vcpu.1", version: 3, minimumVersion: 2, required: true, payload: Array(repeating: 0xAB, count: 13)),
        SnapshotSection(name: "irqchip", version: 1, minimumVersion: 1, required: true, payload: []),
        SnapshotSection(name: "dev.serial0", version: 1, minimumVersion: 1, required: false, payload: [1, 2, 3, 4, 5, 6, 7, 8]),
        SnapshotSection(name: "x_y-z", version: 7, minimumVersion: 0, required: false, payload: [0xFF]),
    ]
}

func sampleState() throws -> [UInt8] {
    try SnapshotFormat.encodeState(header: sampleHeader(), sections: sampleSections())
}

/// Little-endian access to a byte array, for building corrupt files.
extension Array where Element == UInt8 {
    func le(_ offset: Int, _ size: Int) -> UInt64 {
        var v: UInt64 = 0
        for i in 0..<size { v |= UInt64(self[offset + i]) << (8 * UInt64(i)) }
        return v
    }

    mutating func put(_ value: UInt64, at offset: Int, size: Int) {
        for i in 0..<size { self[offset + i] = UInt8(truncatingIfNeeded: value >> (8 * UInt64(i))) }
    }

    /// Recomputes the payload CRCs (when asked), the table CRC and the header CRC after a patch,
    /// so that a test reaches the check it aims at instead of a checksum mismatch.
    mutating func resign(payloads: Bool = false) {
        let h = Int(le(12, 4)), n = Int(le(120, 4)), e = Int(le(124, 4)), t = Int(le(128, 8))
        if payloads {
            for i in 0..<n {
                let entry = t + i * e
                let offset = Int(le(entry + 24, 8)), length = Int(le(entry + 32, 8))
                if offset + length <= count { put(UInt64(CRC32C.checksum(self[offset..<(offset + length)])), at: entry + 40, size: 4) }
            }
        }
        if t <= count && t + n * e <= count { put(UInt64(CRC32C.checksum(self[t..<(t + n * e)])), at: 136, size: 4) }
        put(0, at: 188, size: 4)
        put(UInt64(CRC32C.checksum(self[0..<Swift.min(Swift.max(h, 192), count)])), at: 188, size: 4)
    }
}

/// The error `body` throws, or nil.
func snapshotError(_ body: () throws -> Void) -> SnapshotError? {
    do {
        try body()
        return nil
    } catch let error as SnapshotError {
        return error
    } catch {
        Issue.record("not a SnapshotError: \(error)")
        return nil
    }
}

func decodeError(_ bytes: [UInt8]) -> String? {
    snapshotError { _ = try SnapshotFormat.decodeState(bytes) }?.description
}

/// A fresh directory under /tmp, removed (with everything in it) by `cleanup`.
struct TempDirectory: ~Copyable {
    let path: String

    init() {
        var template = Array("/tmp/swiftvmm-snapshot-test-XXXXXX".utf8CString)
        let p = mkdtemp(&template)!
        path = String(cString: p)
    }

    deinit { removeTree(path) }

    /// Names in the directory (without . and ..).
    func entries() -> [String] { listDirectory(path) }
}

func listDirectory(_ path: String) -> [String] {
    guard let d = opendir(path) else { return [] }
    defer { closedir(d) }
    var names: [String] = []
    while let e = readdir(d) {
        let name = withUnsafeBytes(of: e.pointee.d_name) { raw in
            String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
        }
        if name != "." && name != ".." { names.append(name) }
    }
    return names.sorted()
}

func removeTree(_ path: String) {
    var st = stat()
    guard lstat(path, &st) == 0 else { return }
    if st.st_mode & S_IFMT == S_IFDIR {
        for name in listDirectory(path) { removeTree(path + "/" + name) }
        rmdir(path)
    } else {
        unlink(path)
    }
}

func readFile(_ path: String) -> [UInt8] {
    let fd = open(path, O_RDONLY)
    precondition(fd >= 0, "open \(path)")
    defer { close(fd) }
    var st = stat()
    fstat(fd, &st)
    var bytes = [UInt8](repeating: 0, count: Int(st.st_size))
    var done = 0
    while done < bytes.count {
        let n = bytes.withUnsafeMutableBytes { pread(fd, $0.baseAddress! + done, $0.count - done, off_t(done)) }
        precondition(n > 0, "read \(path)")
        done += n
    }
    return bytes
}

func writeFile(_ path: String, _ bytes: [UInt8]) {
    let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
    precondition(fd >= 0, "create \(path)")
    defer { close(fd) }
    _ = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
}

/// Flips one byte of a file in place (xor 0xFF).
func flipByte(_ path: String, at offset: Int) {
    let fd = open(path, O_RDWR)
    precondition(fd >= 0, "open \(path)")
    defer { close(fd) }
    var b: UInt8 = 0
    _ = pread(fd, &b, 1, off_t(offset))
    b ^= 0xFF
    _ = pwrite(fd, &b, 1, off_t(offset))
}
