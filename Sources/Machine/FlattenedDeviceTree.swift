import CFDT
import DeviceTree

/// Flattened device trees (DTB, version 17) through libfdt (`CFDT`): `encode` writes a resolved
/// tree with libfdt's sequential-write calls, `decode` reads a blob back after libfdt has checked
/// all of it. The same tree always gives the same bytes.
public enum FlattenedDeviceTree {
    /// Why a tree could not be written or a blob read.
    public struct Error: Swift.Error, Equatable, CustomStringConvertible, Sendable {
        public var message: String
        init(_ message: String) { self.message = message }
        init(_ what: String, code: Int32) { self.message = "\(what): \(String(cString: cfdt_strerror(code)))" }
        public var description: String { "device tree: \(message)" }
    }

    /// A blob is never larger than this (a machine's tree is a few KiB).
    public static let maximumSize = 1 << 20
    static let initialCapacity = 4096

    /// `tree` (a root, from `DeviceTreeNode.resolved()`) as a DTB. The buffer starts at 4 KiB and
    /// doubles while libfdt runs out of room (-FDT_ERR_NOSPACE), up to `maximumSize`.
    public static func encode(_ tree: ResolvedDeviceTreeNode) throws(Error) -> [UInt8] {
        var capacity = initialCapacity
        while true {
            var buffer = [UInt8](repeating: 0, count: capacity)
            // SAFETY: libfdt writes only inside the buffer of `capacity` bytes it is given.
            let rc: Int32 = buffer.withUnsafeMutableBytes { b in write(tree, into: b.baseAddress!, capacity: Int32(capacity)) }
            if rc == 0 {
                // SAFETY: after fdt_finish the header at the start holds the blob's total size.
                let total = buffer.withUnsafeBytes { Int(cfdt_totalsize($0.baseAddress!)) }
                guard total <= capacity else { throw Error("libfdt reported \(total) bytes in a \(capacity)-byte buffer") }
                return Array(buffer[..<total])
            }
            guard rc == cfdt_err_nospace else { throw Error("writing the tree", code: rc) }
            guard capacity < maximumSize else { throw Error("the tree is larger than \(maximumSize) bytes") }
            capacity *= 2
        }
    }

    /// The sequential writes for the whole tree; 0 or the first libfdt error.
    private static func write(_ tree: ResolvedDeviceTreeNode, into fdt: UnsafeMutableRawPointer, capacity: Int32) -> Int32 {
        var rc = cfdt_create(fdt, capacity)
        if rc == 0 { rc = cfdt_finish_reservemap(fdt) }
        if rc == 0 { rc = writeNode(tree, fdt) }
        if rc == 0 { rc = cfdt_finish(fdt) }
        return rc
    }

    private static func writeNode(_ node: ResolvedDeviceTreeNode, _ fdt: UnsafeMutableRawPointer) -> Int32 {
        var rc = cfdt_begin_node(fdt, node.name)
        for p in node.properties where rc == 0 {
            // SAFETY: libfdt copies `count` bytes from the array's storage before returning.
            rc = p.bytes.withUnsafeBytes { cfdt_property(fdt, p.name, $0.baseAddress, Int32($0.count)) }
        }
        for child in node.children where rc == 0 { rc = writeNode(child, fdt) }
        return rc == 0 ? cfdt_end_node(fdt) : rc
    }

    /// The tree in `blob`, after libfdt checked its header and whole structure (`fdt_check_full`)
    /// and that it is exactly `blob.count` bytes long. Untrusted input is fine: nothing is read
    /// outside the blob, and the depth is bounded.
    public static func decode(_ blob: [UInt8]) throws(Error) -> ResolvedDeviceTreeNode {
        guard blob.count >= 40, blob.count <= maximumSize else { throw Error("a blob of \(blob.count) bytes is not a device tree") }
        // SAFETY: every libfdt call gets the blob's own storage and reads inside it (checked first).
        let result: Result<ResolvedDeviceTreeNode, Error> = blob.withUnsafeBytes { b in
            let fdt = b.baseAddress!
            let rc = cfdt_check(fdt, b.count)
            guard rc == 0 else { return .failure(Error("checking the blob", code: rc)) }
            let total = Int(cfdt_totalsize(fdt))
            guard total == b.count else { return .failure(Error("the header says \(total) bytes, the blob has \(b.count)")) }
            return Result { () throws(Error) in try readNode(fdt, offset: 0, depth: 0) }
        }
        return try result.get()
    }

    static let maximumDepth = 32

    private static func readNode(_ fdt: UnsafeRawPointer, offset: Int32, depth: Int) throws(Error) -> ResolvedDeviceTreeNode {
        guard depth < maximumDepth else { throw Error("nodes nested deeper than \(maximumDepth)") }
        var length: Int32 = 0
        guard let namePointer = cfdt_get_name(fdt, offset, &length) else { throw Error("a node's name", code: length) }
        let name = String(decoding: UnsafeRawBufferPointer(start: namePointer, count: Int(length)), as: UTF8.self)
        var properties: [ResolvedDeviceTreeNode.Property] = []
        var p = cfdt_first_property(fdt, offset)
        while p >= 0 {
            var propertyName: UnsafePointer<CChar>?
            var size: Int32 = 0
            guard let value = cfdt_property_at(fdt, p, &propertyName, &size), let propertyName else {
                throw Error("a property of \(name)", code: size)
            }
            properties.append(.init(String(cString: propertyName), Array(UnsafeRawBufferPointer(start: value, count: Int(size)))))
            p = cfdt_next_property(fdt, p)
        }
        var children: [ResolvedDeviceTreeNode] = []
        var c = cfdt_first_subnode(fdt, offset)
        while c >= 0 {
            children.append(try readNode(fdt, offset: c, depth: depth + 1))
            c = cfdt_next_subnode(fdt, c)
        }
        return ResolvedDeviceTreeNode(name: name, properties: properties, children: children)
    }
}
