// Resource templates: the buffers returned by _CRS and friends (ACPI 6.x section 6.4).

extension AML {
    /// `ResourceTemplate () { descriptors }`: a Buffer holding the descriptors and an End Tag
    /// (checksum 0, "treat as valid").
    public static func resourceTemplate(_ descriptors: [[UInt8]]) -> AML {
        buffer(descriptors.joined() + [0x79, 0x00])
    }

    /// Resource descriptors, each as its bytes, for `resourceTemplate`.
    public enum Resource {
        /// `IO (Decode16/Decode10, min, max, alignment, length)`: small I/O port descriptor.
        public static func io(min: UInt16, max: UInt16, alignment: UInt8, length: UInt8, decode16: Bool = true) -> [UInt8] {
            var b: [UInt8] = [0x47, decode16 ? 1 : 0]
            b.appendLE(min)
            b.appendLE(max)
            return b + [alignment, length]
        }

        /// `IRQNoFlags () { irqs }`: small IRQ descriptor (ISA IRQs 0-15, edge, active high).
        public static func irqNoFlags(_ irqs: [UInt8]) -> [UInt8] {
            precondition(irqs.allSatisfy { $0 <= 15 }, "IRQNoFlags takes ISA IRQs 0-15: \(irqs)")
            var b: [UInt8] = [0x22]
            b.appendLE(irqs.reduce(UInt16(0)) { $0 | 1 << $1 })
            return b
        }

        /// `Memory32Fixed (ReadWrite/ReadOnly, base, length)`: large fixed 32-bit memory descriptor.
        public static func memory32Fixed(writable: Bool, base: UInt32, length: UInt32) -> [UInt8] {
            var b: [UInt8] = [0x86, 0x09, 0x00, writable ? 1 : 0]
            b.appendLE(base)
            b.appendLE(length)
            return b
        }

        /// `Interrupt (ResourceConsumer/Producer, Level/Edge, ActiveLow/High, Shared/Exclusive[AndWake]) { gsis }`:
        /// large extended interrupt descriptor with 1-255 interrupts and no resource source.
        public static func interrupt(consumer: Bool = true, levelTriggered: Bool, activeLow: Bool, shared: Bool,
                                     wakeCapable: Bool = false, _ gsis: [UInt32]) -> [UInt8] {
            precondition((1...255).contains(gsis.count), "an Interrupt descriptor lists 1-255 interrupts")
            var b: [UInt8] = [0x89]
            b.appendLE(UInt16(2 + 4 * gsis.count))
            let flags = (consumer ? 0x01 : 0) | (levelTriggered ? 0 : 0x02) | (activeLow ? 0x04 : 0)
                | (shared ? 0x08 : 0) | (wakeCapable ? 0x10 : 0)
            b += [UInt8(flags), UInt8(gsis.count)]
            for gsi in gsis { b.appendLE(gsi) }
            return b
        }

        /// The cacheability (_MEM) of an address space descriptor for memory.
        public enum Caching: UInt8, Sendable { case nonCacheable = 0, cacheable = 1, writeCombining = 2, prefetchable = 3 }

        /// `DWordMemory (ResourceConsumer/Producer, PosDecode, MinFixed, MaxFixed, caching, ReadWrite/ReadOnly,
        /// 0, min, max, 0, length)`: 32-bit memory range, no granularity or translation.
        public static func dwordMemory(consumer: Bool = true, writable: Bool = true, caching: Caching = .nonCacheable,
                                       min: UInt32, max: UInt32, length: UInt32) -> [UInt8] {
            var b = memoryDescriptorHead(tag: 0x87, length: 23, consumer: consumer, writable: writable, caching: caching)
            for field: UInt32 in [0, min, max, 0, length] { b.appendLE(field) }
            return b
        }

        /// `QWordMemory (ResourceConsumer/Producer, PosDecode, MinFixed, MaxFixed, caching, ReadWrite/ReadOnly,
        /// 0, min, max, 0, length)`: 64-bit memory range, no granularity or translation.
        public static func qwordMemory(consumer: Bool = true, writable: Bool = true, caching: Caching = .nonCacheable,
                                       min: UInt64, max: UInt64, length: UInt64) -> [UInt8] {
            var b = memoryDescriptorHead(tag: 0x8A, length: 43, consumer: consumer, writable: writable, caching: caching)
            for field: UInt64 in [0, min, max, 0, length] { b.appendLE(field) }
            return b
        }

        /// Tag, length, resource type 0 (memory), general flags (min and max fixed, positive decode),
        /// type-specific flags (_MEM, _RW).
        private static func memoryDescriptorHead(tag: UInt8, length: UInt16, consumer: Bool, writable: Bool,
                                                 caching: Caching) -> [UInt8] {
            var b = [tag]
            b.appendLE(length)
            return b + [0x00, 0x0C | (consumer ? 0x01 : 0), caching.rawValue << 1 | (writable ? 0x01 : 0)]
        }
    }
}
