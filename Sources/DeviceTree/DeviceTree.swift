/// A device tree as values: nodes with properties and children, the way the machine's devices
/// describe themselves (`PlatformDevice.deviceTreeNodes`) and the machine assembles them. Pure: no
/// libfdt here. `resolved()` turns a tree into names and property bytes (big-endian cells, NUL-ended
/// strings, `reg` in the parent's address format, references as phandles), which the machine's
/// encoder writes as a flattened device tree (DTB) with libfdt.
///
/// Interrupt specifiers (`DeviceTreeValue.interrupts`) are those of the tree's one interrupt
/// controller, the IOAPIC (`intel,ce4100-ioapic`, `#interrupt-cells = <2>`): `<pin sense>`, with the
/// sense 0 edge rising, 1 level low, 2 level high, 3 edge falling.
public struct DeviceTreeNode: Equatable, Sendable {
    /// The node name without the unit address ("serial", "virtio").
    public var name: String
    /// The text after `@` ("feb00000", "i3f8" for an ISA I/O port); nil for a node without one.
    public var unitAddress: String?
    /// The name other nodes' `.reference` values use for this node (it then gets a `phandle`).
    public var label: String?
    public var properties: [DeviceTreeProperty]
    public var children: [DeviceTreeNode]
    /// How the `reg` of this node's children is written (and so its `#address-cells` and
    /// `#size-cells`); nil when no child has a `reg`.
    public var childAddressing: DeviceTreeAddressing?

    /// A node whose unit address, unless given, is the first address of its `reg` (lower-case hex;
    /// `i` + hex for an ISA I/O port, as the ISA binding writes them).
    public init(_ name: String, unitAddress: String? = nil, label: String? = nil, properties: [DeviceTreeProperty] = [],
                children: [DeviceTreeNode] = [], childAddressing: DeviceTreeAddressing? = nil) {
        self.name = name
        self.label = label
        self.properties = properties
        self.children = children
        self.childAddressing = childAddressing
        if let unitAddress {
            self.unitAddress = unitAddress
        } else if case .reg(let regions)? = properties.first(where: { $0.name == "reg" })?.value, let first = regions.first {
            self.unitAddress = (first.space == .io ? "i" : "") + String(first.base, radix: 16)
        } else {
            self.unitAddress = nil
        }
    }

    /// `name@unit-address`, or the name alone.
    public var fullName: String { unitAddress.map { "\(name)@\($0)" } ?? name }

    /// The value of property `name`, if the node has it.
    public subscript(property name: String) -> DeviceTreeValue? { properties.first { $0.name == name }?.value }

    /// The regions of its `reg` property (none without one).
    public var regions: [DeviceTreeRegion] {
        if case .reg(let r)? = self[property: "reg"] { return r }
        return []
    }
}

/// A named property.
public struct DeviceTreeProperty: Equatable, Sendable {
    public var name: String
    public var value: DeviceTreeValue
    public init(_ name: String, _ value: DeviceTreeValue) {
        self.name = name
        self.value = value
    }

    /// `compatible`: the most specific name first.
    public static func compatible(_ names: String...) -> DeviceTreeProperty { .init("compatible", .strings(names)) }
    /// `reg`: register windows, written in the parent's address format.
    public static func reg(_ regions: DeviceTreeRegion...) -> DeviceTreeProperty { .init("reg", .reg(regions)) }
    /// `interrupts`: lines of the IOAPIC.
    public static func interrupts(_ interrupts: DeviceTreeInterrupt...) -> DeviceTreeProperty { .init("interrupts", .interrupts(interrupts)) }
    /// A property that is there or not (`interrupt-controller`, `dma-coherent`).
    public static func flag(_ name: String) -> DeviceTreeProperty { .init(name, .empty) }
    /// One 32-bit cell.
    public static func u32(_ name: String, _ value: UInt32) -> DeviceTreeProperty { .init(name, .cells([value])) }
    public static func string(_ name: String, _ value: String) -> DeviceTreeProperty { .init(name, .string(value)) }
}

/// What a property holds.
public enum DeviceTreeValue: Equatable, Sendable {
    /// No bytes: a boolean property that is true by being there.
    case empty
    /// 32-bit cells, big-endian (`<a b c>`).
    case cells([UInt32])
    /// One 64-bit number as two cells (`/bits/ 64 <n>`; `linux,initrd-start`).
    case u64(UInt64)
    /// A NUL-terminated string.
    case string(String)
    /// NUL-terminated strings one after the other (`"a", "b"`).
    case strings([String])
    case bytes([UInt8])
    /// Register windows, in the address format of the node's parent (`DeviceTreeAddressing`).
    case reg([DeviceTreeRegion])
    /// Interrupt lines of the IOAPIC: `<pin sense>` each.
    case interrupts([DeviceTreeInterrupt])
    /// The phandle of the node with this label.
    case reference(String)
}

/// One register window of a `reg` property.
public struct DeviceTreeRegion: Equatable, Sendable {
    /// The address space: memory (MMIO, RAM) or I/O ports (only under an ISA bus).
    public enum Space: Equatable, Sendable { case memory, io }
    public var space: Space
    public var base: UInt64
    public var size: UInt64

    public static func memory(_ base: UInt64, _ size: UInt64) -> DeviceTreeRegion { .init(space: .memory, base: base, size: size) }
    public static func io(_ base: UInt64, _ size: UInt64) -> DeviceTreeRegion { .init(space: .io, base: base, size: size) }
    /// An identifier with no size (a CPU's APIC ID under `/cpus`).
    public static func id(_ id: UInt64) -> DeviceTreeRegion { .init(space: .memory, base: id, size: 0) }
}

/// How a node's children write their `reg`.
public enum DeviceTreeAddressing: Equatable, Sendable {
    /// `address` cells of address and `size` cells of size (0 to 2 each; a size of 0 cells for
    /// identifiers such as CPU numbers). Memory space only.
    case cells(address: Int, size: Int)
    /// The ISA bus binding: two address cells (the first 1 for I/O space, 0 for memory; then the
    /// address) and one size cell.
    case isa

    var addressCells: Int {
        switch self {
        case .cells(let a, _): a
        case .isa: 2
        }
    }

    var sizeCells: Int {
        switch self {
        case .cells(_, let s): s
        case .isa: 1
        }
    }
}

/// An interrupt line of the IOAPIC and how it is signalled.
public struct DeviceTreeInterrupt: Equatable, Sendable {
    public enum Sense: UInt32, Equatable, Sendable {
        case edgeRising = 0, levelLow = 1, levelHigh = 2, edgeFalling = 3
    }
    /// The cells of one specifier (the IOAPIC's `#interrupt-cells`).
    public static let cells: UInt32 = 2
    /// The IOAPIC pin (= GSI: the machine has one IOAPIC, from GSI 0).
    public var pin: UInt32
    public var sense: Sense
    public init(pin: UInt32, sense: Sense) {
        self.pin = pin
        self.sense = sense
    }

    /// An edge-triggered, active-high line (ISA devices, virtio-mmio).
    public static func edge(_ pin: UInt32) -> DeviceTreeInterrupt { .init(pin: pin, sense: .edgeRising) }
    /// A level-triggered, active-high line.
    public static func levelHigh(_ pin: UInt32) -> DeviceTreeInterrupt { .init(pin: pin, sense: .levelHigh) }
}

/// Why a tree cannot be flattened: each case names the node (its path) and what is wrong.
public struct DeviceTreeError: Error, Equatable, CustomStringConvertible, Sendable {
    public var path: String
    public var problem: String
    public init(_ path: String, _ problem: String) {
        self.path = path
        self.problem = problem
    }
    public var description: String { "device tree node \(path): \(problem)" }
}

/// A tree as it is written: names and property bytes.
public struct ResolvedDeviceTreeNode: Equatable, Sendable {
    public struct Property: Equatable, Sendable {
        public var name: String
        public var bytes: [UInt8]
        public init(_ name: String, _ bytes: [UInt8]) {
            self.name = name
            self.bytes = bytes
        }
    }
    /// The full name (`name@unit`; empty for the root).
    public var name: String
    public var properties: [Property]
    public var children: [ResolvedDeviceTreeNode]
    public init(name: String, properties: [Property], children: [ResolvedDeviceTreeNode]) {
        self.name = name
        self.properties = properties
        self.children = children
    }

    /// The bytes of property `name`, if the node has it.
    public subscript(property name: String) -> [UInt8]? { properties.first { $0.name == name }?.bytes }

    /// The child with this full name.
    public func child(_ name: String) -> ResolvedDeviceTreeNode? { children.first { $0.name == name } }

    /// The node at `path` ("/cpus/cpu@0"), from this node as the root.
    public func node(at path: String) -> ResolvedDeviceTreeNode? {
        var node = self
        for part in path.split(separator: "/") {
            guard let next = node.child(String(part)) else { return nil }
            node = next
        }
        return node
    }
}

extension DeviceTreeNode {
    /// The longest node or property name the flattened format's tools accept (the DT spec's 31
    /// characters for a node name without its unit address, and for a property name).
    public static let maxNameLength = 31

    /// This tree, as the root, resolved into names and bytes: `#address-cells`/`#size-cells` added
    /// where children are addressed, every `reg` written in its parent's format, every reference
    /// replaced by a phandle (numbered from 1 in tree order; a referenced node gets a `phandle`
    /// property, last). Throws for a name with characters the format does not allow, a name used
    /// twice among siblings or a property twice in a node, a string with a NUL, a `reg` whose
    /// parent has no addressing or whose numbers do not fit it, an I/O region outside an ISA bus,
    /// a reference to no label, and a label used twice.
    public func resolved() throws(DeviceTreeError) -> ResolvedDeviceTreeNode {
        var labels: [String: String] = [:] // label -> path
        try collectLabels(path: "/", into: &labels)
        var referenced: [String] = [] // labels in tree order of their nodes
        collectReferences(into: &referenced)
        for label in referenced where labels[label] == nil {
            throw DeviceTreeError(referencePath(label) ?? "/", "refers to the label \"\(label)\", which no node has")
        }
        // Phandles in tree order of the labelled nodes, for those that are referenced.
        var phandles: [String: UInt32] = [:]
        var order: [String] = []
        labelOrder(into: &order)
        for label in order where referenced.contains(label) { phandles[label] = UInt32(phandles.count + 1) }
        return try resolve(path: "/", isRoot: true, parentAddressing: nil, phandles: phandles)
    }

    private func collectLabels(path: String, into labels: inout [String: String]) throws(DeviceTreeError) {
        if let label {
            if let other = labels[label] { throw DeviceTreeError(path, "label \"\(label)\" is already the label of \(other)") }
            labels[label] = path
        }
        for child in children { try child.collectLabels(path: Self.join(path, child.fullName), into: &labels) }
    }

    private func collectReferences(into list: inout [String]) {
        for p in properties { if case .reference(let label) = p.value, !list.contains(label) { list.append(label) } }
        for child in children { child.collectReferences(into: &list) }
    }

    private func referencePath(_ label: String, path: String = "/") -> String? {
        if properties.contains(where: { $0.value == .reference(label) }) { return path }
        for child in children {
            if let found = child.referencePath(label, path: Self.join(path, child.fullName)) { return found }
        }
        return nil
    }

    private func labelOrder(into list: inout [String]) {
        if let label { list.append(label) }
        for child in children { child.labelOrder(into: &list) }
    }

    private static func join(_ path: String, _ name: String) -> String { path == "/" ? "/" + name : path + "/" + name }

    static let nodeNameCharacters = Set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789,._+-")
    static let propertyNameCharacters = nodeNameCharacters.union("?#")

    private func resolve(path: String, isRoot: Bool, parentAddressing: DeviceTreeAddressing?,
                         phandles: [String: UInt32]) throws(DeviceTreeError) -> ResolvedDeviceTreeNode {
        if !isRoot {
            guard (1...Self.maxNameLength).contains(name.count), name.allSatisfy(Self.nodeNameCharacters.contains) else {
                throw DeviceTreeError(path, "the name \"\(name)\" is not 1 to \(Self.maxNameLength) of the characters a-z, A-Z, 0-9, ',._+-'")
            }
            if let unit = unitAddress {
                guard !unit.isEmpty, unit.allSatisfy(Self.nodeNameCharacters.contains) else {
                    throw DeviceTreeError(path, "the unit address \"\(unit)\" is empty or has characters other than a-z, A-Z, 0-9, ',._+-'")
                }
            }
        }
        var out: [ResolvedDeviceTreeNode.Property] = []
        func add(_ name: String, _ bytes: [UInt8]) throws(DeviceTreeError) {
            guard (1...Self.maxNameLength).contains(name.count), name.allSatisfy(Self.propertyNameCharacters.contains) else {
                throw DeviceTreeError(path, "the property name \"\(name)\" is not 1 to \(Self.maxNameLength) of the characters a-z, A-Z, 0-9, ',._+?#-'")
            }
            guard !out.contains(where: { $0.name == name }) else { throw DeviceTreeError(path, "has the property \(name) twice") }
            out.append(.init(name, bytes))
        }
        for p in properties {
            try add(p.name, try Self.bytes(of: p, path: path, parentAddressing: parentAddressing, phandles: phandles))
        }
        if let a = childAddressing {
            try add("#address-cells", Self.cell(UInt32(a.addressCells)))
            try add("#size-cells", Self.cell(UInt32(a.sizeCells)))
        }
        if let label, let phandle = phandles[label] { try add("phandle", Self.cell(phandle)) }
        var resolvedChildren: [ResolvedDeviceTreeNode] = []
        for child in children {
            let childPath = Self.join(path, child.fullName)
            guard !resolvedChildren.contains(where: { $0.name == child.fullName }) else {
                throw DeviceTreeError(childPath, "two nodes of \(path) have this name")
            }
            resolvedChildren.append(try child.resolve(path: childPath, isRoot: false, parentAddressing: childAddressing, phandles: phandles))
        }
        return ResolvedDeviceTreeNode(name: isRoot ? "" : fullName, properties: out, children: resolvedChildren)
    }

    static func cell(_ v: UInt32) -> [UInt8] { [UInt8(v >> 24), UInt8(v >> 16 & 0xFF), UInt8(v >> 8 & 0xFF), UInt8(v & 0xFF)] }

    /// `count` (0 to 2) cells of `value`, or nil when it does not fit.
    static func cells(_ value: UInt64, count: Int) -> [UInt8]? {
        guard count >= 2 || value >> (32 * count) == 0 else { return nil }
        return (0..<count).reversed().flatMap { i in cell(UInt32(truncatingIfNeeded: value >> (32 * i))) }
    }

    private static func bytes(of p: DeviceTreeProperty, path: String, parentAddressing: DeviceTreeAddressing?,
                              phandles: [String: UInt32]) throws(DeviceTreeError) -> [UInt8] {
        func string(_ s: String) throws(DeviceTreeError) -> [UInt8] {
            guard !s.utf8.contains(0) else { throw DeviceTreeError(path, "property \(p.name) has a string with a NUL byte") }
            return Array(s.utf8) + [0]
        }
        switch p.value {
        case .empty: return []
        case .cells(let cells): return cells.flatMap(cell)
        case .u64(let v): return cell(UInt32(v >> 32)) + cell(UInt32(truncatingIfNeeded: v))
        case .string(let s): return try string(s)
        case .strings(let list):
            var b: [UInt8] = []
            for s in list { b += try string(s) }
            return b
        case .bytes(let b): return b
        case .interrupts(let list): return list.flatMap { cell($0.pin) + cell($0.sense.rawValue) }
        case .reference(let label):
            // resolved() checked every reference before this runs.
            return cell(phandles[label] ?? 0)
        case .reg(let regions):
            guard let a = parentAddressing else {
                throw DeviceTreeError(path, "has a reg but its parent says nothing of its children's addresses (no addressing)")
            }
            var b: [UInt8] = []
            for r in regions {
                let what = "\(r.space == .io ? "I/O " : "")0x\(String(r.base, radix: 16)) size 0x\(String(r.size, radix: 16))"
                switch a {
                case .isa:
                    guard let address = cells(r.base, count: 1), let size = cells(r.size, count: 1) else {
                        throw DeviceTreeError(path, "reg \(what) does not fit the ISA bus's 32-bit cells")
                    }
                    b += cell(r.space == .io ? 1 : 0) + address + size
                case .cells(let ac, let sc):
                    guard r.space == .memory else { throw DeviceTreeError(path, "reg \(what) is in I/O space, which only an ISA bus has") }
                    guard (1...2).contains(ac), (0...2).contains(sc), let address = cells(r.base, count: ac),
                          let size = cells(r.size, count: sc) else {
                        throw DeviceTreeError(path, "reg \(what) does not fit \(ac) address and \(sc) size cells")
                    }
                    b += address + size
                }
            }
            return b
        }
    }
}
