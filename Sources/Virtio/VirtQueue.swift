import Synchronization
import VMMCore

/// Why a virtqueue cannot be used: the driver broke the split-ring rules (virtio 1.2, 2.7). Every
/// such error puts the device into DEVICE_NEEDS_RESET; none traps or touches memory outside guest RAM.
public struct VirtQueueError: Error, Equatable, Sendable, CustomStringConvertible {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// One buffer of a descriptor chain: guest RAM the device reads (driver → device) or writes.
public struct DescriptorSegment: Equatable, Sendable {
    public var address: GuestAddress
    public var length: UInt32
    public var writable: Bool
    public init(address: GuestAddress, length: UInt32, writable: Bool) {
        self.address = address
        self.length = length
        self.writable = writable
    }
}

/// A validated descriptor chain: the head's index (what the used ring reports) and its buffers, the
/// device-readable ones first, then the device-writable ones (indirect tables already followed).
/// Every segment lies inside guest RAM.
public struct DescriptorChain: Equatable, Sendable {
    public var head: UInt16
    public var segments: [DescriptorSegment]

    public var readable: ArraySlice<DescriptorSegment> { segments.prefix { !$0.writable } }
    public var writable: ArraySlice<DescriptorSegment> { segments.drop { !$0.writable } }
    public var readableLength: UInt64 { readable.reduce(0) { $0 + UInt64($1.length) } }
    public var writableLength: UInt64 { writable.reduce(0) { $0 + UInt64($1.length) } }
}

/// A split virtqueue (virtio 1.2, 2.7) as the device sees it: the three areas the driver set up,
/// and the device's own two indexes. Plain state, copied out of the transport's lock by the thread
/// that serves the queue and written back after; a snapshot saves it field by field.
///
/// Everything it reads from guest memory is untrusted: ring indexes that run ahead by more than
/// the queue size, heads and `next` links out of range, chains longer than the queue (which is how
/// a loop shows), indirect tables that are empty, misaligned, nested or too long, buffers outside
/// RAM or whose address and length wrap, a readable buffer after a writable one: each is a
/// `VirtQueueError`, never a trap, a hang, or an access outside guest RAM.
public struct VirtQueue: Equatable, Sendable {
    /// The largest size the device offers (QueueNumMax).
    public let maxSize: UInt16
    /// QueueNum: the driver's size (a power of two up to `maxSize`).
    public var size: UInt16
    public var ready = false
    public var descriptorTable: UInt64 = 0
    /// The driver area ("avail" ring).
    public var availRing: UInt64 = 0
    /// The device area ("used" ring).
    public var usedRing: UInt64 = 0
    /// The next avail ring index the device will take.
    public var nextAvail: UInt16 = 0
    /// The used ring index the device will write next (what used.idx holds after each push).
    public var nextUsed: UInt16 = 0
    /// VIRTIO_F_EVENT_IDX was negotiated: used_event/avail_event replace the flags.
    public var eventIndex = false

    public static let descriptorSize: UInt64 = 16
    static let flagNext: UInt16 = 1, flagWrite: UInt16 = 2, flagIndirect: UInt16 = 4
    static let availNoInterrupt: UInt16 = 1

    public init(maxSize: UInt16) {
        self.maxSize = maxSize
        size = maxSize
    }

    /// Back to the state after a device reset (not ready, no rings, indexes 0).
    public mutating func reset() {
        self = VirtQueue(maxSize: maxSize)
    }

    /// Why the queue as set up cannot work with `memory` (nil: it can): the size, the areas'
    /// alignment (16, 2 and 4 bytes) and that each area lies in guest RAM.
    public func problem(in memory: GuestMemory) -> String? {
        guard size > 0, size <= maxSize, size & (size - 1) == 0 else {
            return "queue size \(size) is not a power of two between 1 and \(maxSize)"
        }
        let n = UInt64(size)
        let areas: [(String, UInt64, UInt64, UInt64)] = [
            ("descriptor table", descriptorTable, Self.descriptorSize * n, 16),
            ("driver area", availRing, 6 + 2 * n, 2),
            ("device area", usedRing, 6 + 8 * n, 4),
        ]
        for (name, address, length, alignment) in areas {
            guard address % alignment == 0 else { return "\(name) at 0x\(String(address, radix: 16)) is not \(alignment)-byte aligned" }
            guard memory.isRAM(GuestAddress(address), length: length) else {
                return "\(name) at 0x\(String(address, radix: 16)) (\(length) bytes) is not in guest RAM"
            }
        }
        return nil
    }

    /// How many chains the driver has made available that the device has not taken.
    public func pending(in memory: GuestMemory) throws(VirtQueueError) -> UInt16 {
        let availIndex = try load(UInt16.self, availRing + 2, memory, "avail.idx")
        let pending = availIndex &- nextAvail
        guard pending <= size else {
            throw VirtQueueError("avail.idx \(availIndex) runs \(pending) entries ahead of the device's \(nextAvail) in a queue of \(size)")
        }
        return pending
    }

    /// Takes the next available chain (nil when there is none), validated.
    public mutating func pop(_ memory: GuestMemory) throws(VirtQueueError) -> DescriptorChain? {
        guard try pending(in: memory) > 0 else { return nil }
        // The ring entry is read after avail.idx (acquire: what the driver wrote before publishing the index).
        atomicMemoryFence(ordering: .acquiring)
        let slot = availRing + 4 + 2 * UInt64(nextAvail % size)
        let head = try load(UInt16.self, slot, memory, "avail.ring[\(nextAvail % size)]")
        let chain = try walk(head: head, memory)
        nextAvail &+= 1
        return chain
    }

    /// Follows the chain at `head` (and an indirect table it names) into segments.
    func walk(head: UInt16, _ memory: GuestMemory) throws(VirtQueueError) -> DescriptorChain {
        guard head < size else { throw VirtQueueError("chain head \(head) is outside a queue of \(size)") }
        var segments: [DescriptorSegment] = []
        var index = head
        var table = descriptorTable
        var tableLength = UInt64(size)
        var inIndirect = false
        var seen = 0
        while true {
            seen += 1
            // A chain visits each descriptor at most once, so a longer walk is a loop.
            guard seen <= Int(tableLength) else {
                throw VirtQueueError("descriptor chain at head \(head) is longer than its table (\(tableLength)): a loop")
            }
            let d = try descriptor(table: table, index: index, memory)
            if d.flags & Self.flagIndirect != 0 {
                guard !inIndirect else { throw VirtQueueError("an indirect table names another indirect table (head \(head))") }
                guard d.flags & Self.flagNext == 0 else {
                    throw VirtQueueError("descriptor \(index) has both INDIRECT and NEXT (head \(head))")
                }
                guard d.length > 0, UInt64(d.length) % Self.descriptorSize == 0, d.address % 16 == 0 else {
                    throw VirtQueueError("indirect table at 0x\(String(d.address, radix: 16)) of \(d.length) bytes is empty, misaligned or not whole descriptors")
                }
                let count = UInt64(d.length) / Self.descriptorSize
                guard count <= UInt64(size) else {
                    throw VirtQueueError("indirect table of \(count) descriptors is longer than the queue (\(size))")
                }
                guard memory.isRAM(GuestAddress(d.address), length: UInt64(d.length)) else {
                    throw VirtQueueError("indirect table at 0x\(String(d.address, radix: 16)) (\(d.length) bytes) is not in guest RAM")
                }
                table = d.address
                tableLength = count
                inIndirect = true
                index = 0
                seen = 0
                continue
            }
            let writable = d.flags & Self.flagWrite != 0
            if !writable, segments.last?.writable == true {
                throw VirtQueueError("a device-readable buffer follows a device-writable one (head \(head))")
            }
            guard memory.isRAM(GuestAddress(d.address), length: UInt64(d.length)) else {
                throw VirtQueueError("buffer at 0x\(String(d.address, radix: 16)) (\(d.length) bytes) of chain \(head) is not in guest RAM")
            }
            if d.length > 0 {
                segments.append(DescriptorSegment(address: GuestAddress(d.address), length: d.length, writable: writable))
            }
            guard d.flags & Self.flagNext != 0 else { break }
            guard UInt64(d.next) < tableLength else {
                throw VirtQueueError("descriptor \(index) links to \(d.next), outside its table of \(tableLength)")
            }
            index = d.next
        }
        return DescriptorChain(head: head, segments: segments)
    }

    private func descriptor(table: UInt64, index: UInt16, _ memory: GuestMemory) throws(VirtQueueError)
        -> (address: UInt64, length: UInt32, flags: UInt16, next: UInt16) {
        let base = table + Self.descriptorSize * UInt64(index)
        // One bounds check for the whole descriptor, and loads of concrete types: GuestMemory's
        // generic read<T> is not specialized across the module boundary, and its generic-metadata
        // lookups cost more than the rest of a request's handling (per segment).
        guard let p = try? memory.hostPointer(GuestAddress(base), length: Self.descriptorSize) else {
            throw VirtQueueError("descriptor \(index) at 0x\(String(base, radix: 16)) is not in guest RAM")
        }
        // SAFETY: hostPointer validated 16 bytes at p.
        return (UInt64(littleEndian: p.loadUnaligned(as: UInt64.self)),
                UInt32(littleEndian: p.loadUnaligned(fromByteOffset: 8, as: UInt32.self)),
                UInt16(littleEndian: p.loadUnaligned(fromByteOffset: 12, as: UInt16.self)),
                UInt16(littleEndian: p.loadUnaligned(fromByteOffset: 14, as: UInt16.self)))
    }

    /// Puts chain `head` in the used ring with `written` bytes, publishes it, and says whether the
    /// driver wants an interrupt for it (its flags or used_event, read after the publication).
    public mutating func push(head: UInt16, written: UInt32, _ memory: GuestMemory) throws(VirtQueueError) -> Bool {
        let previous = nextUsed
        let slot = usedRing + 4 + 8 * UInt64(nextUsed % size)
        try store(UInt32(head), slot, memory, "used.ring")
        try store(written, slot + 4, memory, "used.ring")
        nextUsed &+= 1
        // The entry is visible before the index that publishes it (release)...
        atomicMemoryFence(ordering: .releasing)
        try store(nextUsed, usedRing + 2, memory, "used.idx")
        // ...and the driver's suppression fields are read after the index is (a full fence: a store
        // then a load).
        atomicMemoryFence(ordering: .sequentiallyConsistent)
        if eventIndex {
            let usedEvent = try load(UInt16.self, availRing + 4 + 2 * UInt64(size), memory, "avail.used_event")
            return (nextUsed &- usedEvent &- 1) < (nextUsed &- previous)
        }
        return try load(UInt16.self, availRing, memory, "avail.flags") & Self.availNoInterrupt == 0
    }

    /// With EVENT_IDX, asks the driver to notify when it makes entry `nextAvail` available (call
    /// before waiting; then check `pending` again, since the driver may have added one meanwhile).
    public func requestNotification(_ memory: GuestMemory) throws(VirtQueueError) {
        guard eventIndex else { return }
        try store(nextAvail, usedRing + 4 + 8 * UInt64(size), memory, "used.avail_event")
        atomicMemoryFence(ordering: .sequentiallyConsistent)
    }

    private func load<T: FixedWidthInteger>(_ type: T.Type, _ address: UInt64, _ memory: GuestMemory,
                                            _ what: @autoclosure () -> String) throws(VirtQueueError) -> T {
        do { return try memory.read(T.self, at: GuestAddress(address)) } catch {
            throw VirtQueueError("\(what()) at 0x\(String(address, radix: 16)) is not in guest RAM")
        }
    }

    private func store<T: FixedWidthInteger>(_ value: T, _ address: UInt64, _ memory: GuestMemory,
                                             _ what: @autoclosure () -> String) throws(VirtQueueError) {
        do { try memory.write(value, at: GuestAddress(address)) } catch {
            throw VirtQueueError("\(what()) at 0x\(String(address, radix: 16)) is not in guest RAM")
        }
    }
}

extension GuestMemory {
    /// Copies the readable bytes of `chain` from offset `skip` on into `into` (at most its count);
    /// returns how many it copied.
    public func gather(_ chain: DescriptorChain, skip: UInt64 = 0, into: UnsafeMutableRawBufferPointer) -> Int {
        var skip = skip, copied = 0
        for s in chain.readable where copied < into.count {
            if skip >= UInt64(s.length) { skip -= UInt64(s.length); continue }
            let n = min(Int(UInt64(s.length) - skip), into.count - copied)
            // The chain's segments were checked to lie in guest RAM when it was walked.
            guard let p = try? hostPointer(GuestAddress(s.address.rawValue + skip), length: UInt64(n)) else { break }
            // SAFETY: hostPointer validated n bytes at p; into has room for n more bytes after copied.
            (into.baseAddress! + copied).copyMemory(from: p, byteCount: n)
            copied += n
            skip = 0
        }
        return copied
    }

    /// Copies `from` into the writable buffers of `chain` from offset `skip` on; returns how many
    /// bytes fitted.
    public func scatter(_ chain: DescriptorChain, skip: UInt64 = 0, from: UnsafeRawBufferPointer) -> Int {
        var skip = skip, copied = 0
        for s in chain.writable where copied < from.count {
            if skip >= UInt64(s.length) { skip -= UInt64(s.length); continue }
            let n = min(Int(UInt64(s.length) - skip), from.count - copied)
            guard let p = try? hostPointer(GuestAddress(s.address.rawValue + skip), length: UInt64(n)) else { break }
            // SAFETY: hostPointer validated n bytes at p; from has n bytes after copied.
            p.copyMemory(from: from.baseAddress! + copied, byteCount: n)
            copied += n
            skip = 0
        }
        return copied
    }
}
