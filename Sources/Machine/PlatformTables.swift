import ACPI
import Devices
import VMMCore

/// The ACPI description of this machine: the FADT/MADT platform from `Layout`, a DSDT with the
/// legacy devices, fw_cfg, the S5 sleep type and the `\_GPE` scope, and how the tables reach guest
/// memory: as fw_cfg files plus an `etc/table-loader` script, which firmware runs for a firmware boot
/// and `load` runs on the host for a direct boot (one source of truth for both).
public enum PlatformTables {
    /// SLP_TYP for S5 in `\_S5` and in the PM1 control model.
    public static let s5SleepType: UInt8 = 5
    public static let loaderFile = TableLoader.fileName

    public static func platform(cpus: Int) -> ACPIPlatform {
        ACPIPlatform(
            cpus: cpus, sciIRQ: UInt8(Layout.sciIRQ),
            pm1aEventBlock: UInt16(Layout.pm1aEvent), pm1aControlBlock: UInt16(Layout.pm1aControl),
            pmTimerBlock: UInt16(Layout.pmTimer), gpe0Block: UInt16(Layout.gpe0), gpe0BlockLength: UInt8(Layout.gpe0Length),
            resetPort: UInt16(Layout.resetRegister), resetValue: Layout.resetValue,
            localAPICAddress: UInt32(Layout.localAPIC), ioAPICAddress: UInt32(Layout.ioAPIC), ioAPICID: 0,
            has8042: true, hasCMOSClock: true)
    }

    /// The DSDT: the platform devices' own entries (`PlatformDevice.dsdtAML`, in registration order)
    /// under `\_SB`, `\_S5`, and an empty `\_GPE` scope for SSDTs to extend.
    public static func dsdt(devices: [AML]) -> SDT {
        let body: [AML] = [
            .scope("\\_SB", devices),
            .name("\\_S5", .package([.integer(UInt64(s5SleepType)), .integer(UInt64(s5SleepType)), .integer(0), .integer(0)])),
            .scope("\\_GPE", []),
        ]
        return SDT(signature: "DSDT", revision: 2, oemTableID: "SWVMDSDT", body: AML.list(body).bytes)
    }

    /// Every table as relocatable fw_cfg blobs; with `vmgenid`, the VMGENID SSDT whose VGIA points
    /// into `etc/vmgenid_guid`.
    /// `devices`: the platform devices' DSDT entries (`Platform.dsdtDevices`); `tables`: their own
    /// tables (`Platform.deviceTables`), listed after the VMGENID SSDT.
    public static func blob(cpus: Int, devices: [AML], tables: [SDT] = [], vmgenid: Bool = true) -> ACPITableBlob {
        ACPITableBlob(platform: platform(cpus: cpus), dsdt: dsdt(devices: devices), ssdts: (vmgenid ? [VMGenIDTable.ssdt()] : []) + tables,
                      externalPointers: vmgenid ? [.init(ssdt: 0, offsetInTable: VMGenIDTable.vgiaOffset, size: 4, target: VMGenIDTable.guidFile)] : [])
    }

    /// The `etc/table-loader` script for `blob`: allocate the RSDP in the F segment and the tables in
    /// high memory, add the tables' address to every pointer, then fix every checksum.
    public static func loaderCommands(_ blob: ACPITableBlob) -> [LoaderCommand] {
        let rsdp = ACPITableBlob.File.rsdp.rawValue, tables = ACPITableBlob.File.tables.rawValue
        var cmds: [LoaderCommand] = [
            .allocate(file: rsdp, alignment: ACPITableBlob.rsdpAlignment, zone: .fseg),
            .allocate(file: tables, alignment: ACPITableBlob.tablesAlignment, zone: .high),
        ]
        let vmgenid = blob.pointers.contains { $0.target == VMGenIDTable.guidFile }
        if vmgenid { cmds.append(.allocate(file: VMGenIDTable.guidFile, alignment: 4096, zone: .high)) }
        for p in blob.pointers {
            cmds.append(.addPointer(destFile: p.file.rawValue, srcFile: p.target ?? tables, offset: UInt32(p.offset), size: p.size))
        }
        for c in blob.checksums {
            cmds.append(.addChecksum(file: c.file.rawValue, offset: UInt32(c.offset), start: UInt32(c.start), length: UInt32(c.length)))
        }
        if vmgenid {
            // Tell the VMM where the GUID is: the guest page + 40, into the writable etc/vmgenid_addr.
            cmds.append(.writePointer(destFile: VMGenIDTable.addressFile, srcFile: VMGenIDTable.guidFile, destOffset: 0,
                                      srcOffset: UInt32(VMGenIDTable.guidOffset), size: 8))
        }
        return cmds
    }

    /// Adds the ACPI files and the loader script to fw_cfg.
    public static func publish(_ blob: ACPITableBlob, to fwCfg: FwCfg) throws(FwCfgError) {
        for file in ACPITableBlob.File.allCases { try fwCfg.addFile(file.rawValue, data: blob.bytes(of: file)) }
        try fwCfg.addFile(loaderFile, data: TableLoader.encode(loaderCommands(blob)))
    }

    public enum LoadError: Error, CustomStringConvertible {
        case loader(String)
        case doesNotFit(needed: UInt64, available: UInt64)
        public var description: String {
            switch self {
            case .loader(let s): return "the ACPI table loader failed: \(s)"
            case .doesNotFit(let needed, let available):
                return "the ACPI tables need \(needed) bytes but their region has \(available)"
            }
        }
    }

    /// Runs the loader script on the host, as firmware would, for a direct boot: both zones are
    /// allocated upward inside the e820 ACPI region of `Layout`. `writeFile` receives WRITE_POINTER
    /// results (a DMA write into a writable fw_cfg file). Returns the tables where the guest finds them.
    public static func load(_ blob: ACPITableBlob, memory: GuestMemory, extraFiles: [String: [UInt8]] = [:],
                            writeFile: (String, Int, [UInt8]) throws -> Void = { _, _, _ in }) throws(LoadError) -> ACPITableSet {
        var files = Dictionary(uniqueKeysWithValues: ACPITableBlob.File.allCases.map { ($0.rawValue, blob.bytes(of: $0)) })
        files.merge(extraFiles) { a, _ in a }
        var next = Layout.acpiTables
        let end = Layout.acpiTables + Layout.acpiTablesSize
        let placed: [String: UInt64]
        do {
            placed = try TableLoaderExecutor.run(
                loaderCommands(blob), files: { files[$0] },
                allocate: { file, size, alignment, _ in
                    // The vmgenid page must be reserved memory, not ACPI or RAM: it has its own page.
                    if file == VMGenIDTable.guidFile { return Layout.vmgenidPage }
                    let at = (next + UInt64(alignment) - 1) & ~(UInt64(alignment) - 1)
                    guard at + UInt64(size) <= end else { throw LoadError.doesNotFit(needed: at + UInt64(size) - Layout.acpiTables, available: Layout.acpiTablesSize) }
                    next = at + UInt64(size)
                    return at
                },
                memory: memory, writeFile: writeFile)
        } catch let e as LoadError {
            throw e
        } catch {
            throw .loader("\(error)")
        }
        guard let rsdpAt = placed[ACPITableBlob.File.rsdp.rawValue], let tablesAt = placed[ACPITableBlob.File.tables.rawValue] else {
            throw .loader("the script did not allocate the RSDP and the tables")
        }
        do {
            var result = [ACPITableSet.Placed(name: "RSDP", address: rsdpAt, bytes: try memory.read(GuestAddress(rsdpAt), count: blob.rsdp.count))]
            for e in blob.entries {
                let at = tablesAt + UInt64(e.offset)
                result.append(ACPITableSet.Placed(name: e.name, address: at, bytes: try memory.read(GuestAddress(at), count: e.length)))
            }
            return ACPITableSet(tables: result)
        } catch {
            throw .loader("\(error)")
        }
    }

    /// The tables exactly as a direct boot loads them, without a VM (for `--dump-acpi`): the loader
    /// runs against scratch memory covering the first MiB. `tpm`: for a machine with a TPM;
    /// `virtio`: its virtio devices ("blk", "rng"), in order.
    public static func build(cpus: Int, tpm: Bool = false, virtio: [String] = []) throws -> ACPITableSet {
        let scratch = try GuestMemory(ranges: [(GuestAddress(0), Layout.highMemory)])
        let platform = try Platform.description(memory: scratch, tpm: tpm, virtio: virtio)
        return try load(blob(cpus: cpus, devices: platform.dsdtDevices, tables: platform.deviceTables), memory: scratch,
                        extraFiles: [VMGenIDTable.guidFile: VMGenIDTable.blob([UInt8](repeating: 0, count: 16)),
                                     VMGenIDTable.addressFile: [UInt8](repeating: 0, count: 8)])
    }
}
