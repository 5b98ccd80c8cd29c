import Backends
import Glibc
import Testing
import VMMSys

/// The drive image behind virtio-blk: a request's segments go to the file in one vectored call
/// (more than IOV_MAX of them too), land at the right offsets, read as zeroes past the end, and a
/// read-only or locked image behaves as a user expects.
@Suite("file block store")
struct FileBlockStoreTests {
    static func image(size: Int) throws -> String {
        var template = Array("/tmp/blockstore-XXXXXX".utf8CString)
        let fd = template.withUnsafeMutableBufferPointer { mkstemp($0.baseAddress!) }
        #expect(fd >= 0)
        ftruncate(fd, off_t(size))
        Glibc.close(fd)
        return template.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
    }

    static func open(_ path: String, readOnly: Bool = false) throws -> FileBlockStore {
        try FileBlockStore.open(fd: try OwnedFD.open(path, flags: readOnly ? O_RDONLY : O_RDWR), path: path, readOnly: readOnly)
    }

    /// `count` buffers of uneven sizes (1 to 700 bytes) over one allocation; the caller frees it.
    static func segments(_ count: Int) -> (UnsafeMutableRawBufferPointer, [UnsafeMutableRawBufferPointer]) {
        let sizes = (0..<count).map { 1 + ($0 * 37) % 700 }
        let all = UnsafeMutableRawBufferPointer.allocate(byteCount: sizes.reduce(0, +), alignment: 8)
        var at = 0
        let parts = sizes.map { n in
            defer { at += n }
            return UnsafeMutableRawBufferPointer(rebasing: all[at..<at + n])
        }
        return (all, parts)
    }

    @Test("3000 segments written and read back in one request each, at an offset")
    func vectoredRoundTrip() throws {
        let path = try Self.image(size: 4 << 20)
        defer { unlink(path) }
        let store = try Self.open(path)
        let (source, parts) = Self.segments(3000)
        defer { source.deallocate() }
        for i in source.indices { source[i] = UInt8(truncatingIfNeeded: i &* 7 &+ 3) }
        #expect(store.write(parts.map { UnsafeRawBufferPointer($0) }, at: 4096))

        // The file holds the segments back to back from the offset.
        let fd = try OwnedFD.open(path, flags: O_RDONLY)
        let check = UnsafeMutableRawBufferPointer.allocate(byteCount: source.count, alignment: 8)
        defer { check.deallocate() }
        #expect(try fd.readFully(into: check, at: 4096) == source.count)
        #expect(check.elementsEqual(source))

        let (target, targetParts) = Self.segments(3000)
        defer { target.deallocate() }
        target.initializeMemory(as: UInt8.self, repeating: 0xEE)
        #expect(store.read(into: targetParts, at: 4096))
        #expect(target.elementsEqual(source))
    }

    @Test("a read past the end of a shortened image gives zeroes, not stale bytes")
    func readPastEnd() throws {
        let path = try Self.image(size: 8192)
        defer { unlink(path) }
        let store = try Self.open(path)
        let ones = [UInt8](repeating: 1, count: 8192)
        #expect(ones.withUnsafeBytes { store.write([$0], at: 0) })
        truncate(path, 5000)
        let (target, parts) = Self.segments(20)
        defer { target.deallocate() }
        target.initializeMemory(as: UInt8.self, repeating: 0xEE)
        #expect(store.read(into: parts, at: 4096))
        let valid = 5000 - 4096
        #expect(target[..<valid].allSatisfy { $0 == 1 })
        #expect(target[valid...].allSatisfy { $0 == 0 })
    }

    @Test("a read-only image refuses writes and leaves the file alone; a writable one is locked")
    func readOnlyAndLocked() throws {
        let path = try Self.image(size: 8192)
        defer { unlink(path) }
        let reader = try Self.open(path, readOnly: true)
        let bytes = [UInt8](repeating: 9, count: 512)
        #expect(!bytes.withUnsafeBytes { reader.write([$0, $0], at: 0) })
        let check = UnsafeMutableRawBufferPointer.allocate(byteCount: 1024, alignment: 8)
        defer { check.deallocate() }
        #expect(reader.read(into: [check], at: 0))
        #expect(check.allSatisfy { $0 == 0 })
        // A second reader shares the image; a writer is refused while readers hold it.
        let second = try Self.open(path, readOnly: true)
        #expect(throws: BlockStoreError.self) { _ = try Self.open(path) }
        _ = second
    }
}
