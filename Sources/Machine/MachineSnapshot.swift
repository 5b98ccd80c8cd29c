import Devices
import Glibc
import KVM
import Logging
import Snapshot
import VMMCore
import VMMSys
import WireFormat

/// How `Machine.restore` sets up the clone.
public struct RestoreOptions: Sendable {
    public enum GenerationID: Sendable, Equatable {
        /// Keep the saved VM generation ID (the guest is not notified).
        case keep
        /// Give the clone this GUID (guest byte order) and notify the guest once it runs.
        case new([UInt8])
    }

    public var console: any ConsoleOutput
    public var generationID: GenerationID
    public var kvmPath = "/dev/kvm"
    public var handleSignals = false
    public var processStart: UInt64?

    public init(console: any ConsoleOutput, generationID: GenerationID) {
        self.console = console
        self.generationID = generationID
    }
}

/// What `Machine.createSnapshot` wrote.
public struct SnapshotSummary: Sendable {
    public var result: SnapshotWriteResult
    /// Whether the vCPUs were running before (and so were resumed after).
    public var wasRunning: Bool
}

/// The sections a snapshot of this machine holds, and the versions this build reads.
///
/// | section        | content                                                    |
/// |----------------|------------------------------------------------------------|
/// | vm             | irqchip (PIC, IOAPIC), PIT, kvmclock (`VMState`)           |
/// | vcpu.N         | every register, XSAVE, LAPIC, MSRs, events, CPUID (`VCPUState`) |
/// | dev.serial0 …  | one per device model (`SnapshotDevice`)                    |
/// | config.fwcfg   | the user's read-only fw_cfg files (`--fw-cfg`)             |
enum MachineSections {
    static let vm = "vm"
    static func vcpu(_ i: Int) -> String { "vcpu.\(i)" }
    static let fwCfgFiles = "config.fwcfg"
    static let fwCfgFilesVersion: UInt16 = 1
    static let maxFwCfgFiles = 256

    /// A firmware boot's legacy items (kernel, setup, initrd, command line and their sizes): the
    /// guest may be reading one when the snapshot is taken, or read one later.
    static let fwCfgBoot = "config.boot"
    static let fwCfgBootVersion: UInt16 = 1
    static let fwCfgBootKeys: [UInt16] = [
        FwCfgKeys.setupSize, FwCfgKeys.setupData, FwCfgKeys.kernelSize, FwCfgKeys.kernelData,
        FwCfgKeys.initrdSize, FwCfgKeys.initrdData, FwCfgKeys.commandLineSize, FwCfgKeys.commandLineData,
    ]

    /// The firmware image of a firmware boot (the vCPUs may still be running it).
    static let firmware = "config.rom"
    static let firmwareVersion: UInt16 = 1

    static func isVCPU(_ name: String) -> Bool { name.hasPrefix("vcpu.") }
}

extension Machine {
    /// The device models in a snapshot, by section name (from the platform's device list).
    var snapshotDevices: [(name: String, device: any SnapshotDevice)] { platform.snapshotSections }

    // MARK: Save

    /// Writes a snapshot of the machine to `directory` (which must not exist): the vCPUs are paused
    /// (each completes the I/O it was in), every piece of KVM and device state is saved with guest
    /// memory, and the vCPUs resume if they were running. The files are written under a temporary
    /// name, synced, then renamed, so `directory` is either complete or absent. When the machine
    /// ends meanwhile (a stop signal, `quit`), the write is rolled back and this throws.
    public func createSnapshot(at directory: String) throws(MachineError) -> SnapshotSummary {
        let wasRunning = !isPaused
        pause()
        defer { if wasRunning { resume() } }
        if let problem = memoryFileProblem() { throw .memoryFileChanged(problem) }
        let sections = try snapshotSections()
        var flags: SnapshotMachineFlags = []
        if config.acpi { flags.insert(.acpi) }
        let header = SnapshotHeader(created: SnapshotHeader.now(), writerVersion: Machine.version,
                                    memorySize: config.memorySize, vcpuCount: UInt32(config.cpus), machineFlags: flags)
        do throws(SnapshotError) {
            let knownZero = knownZeroPages()
            let result = try SnapshotWriter.write(directory: directory, header: header, sections: sections,
                                                  memory: memory.regions.map(\.contents),
                                                  knownZero: knownZero.map { map in { region, offset in map[region][offset / 4096] } },
                                                  isCancelled: { [self] in lifecycle.hasEnded || memoryFileProblem() != nil })
            logger.info("snapshot written to \(directory): \(result.diskBytes) bytes on disk in \(result.duration)")
            return SnapshotSummary(result: result, wasRunning: wasRunning)
        } catch {
            if let problem = memoryFileProblem() { throw .memoryFileChanged(problem) }
            throw .snapshot(error)
        }
    }

    /// For a machine restored from a snapshot: per RAM region and 4 KiB page, whether the page is
    /// known to be zero without reading it, because the guest never wrote it (no private copy in
    /// /proc/self/pagemap) and the snapshot's memory file has a hole there. Reading such pages would
    /// fault them in for nothing (and on tmpfs fill the file's holes). Nil when not restored or when
    /// pagemap cannot be read: then every page is read.
    public func knownZeroPages() -> [[Bool]]? {
        guard let backing = restoredFrom else { return nil }
        let dataRanges = VMMSys.dataRanges(fd: backing.memoryFileDescriptor)
        var result: [[Bool]] = []
        var fileOffset: UInt64 = 0
        var rangeIndex = 0
        for region in memory.regions {
            let pages = Int(region.size / 4096)
            guard let entries = pagemapEntries(base: region.hostBase, pages: pages) else { return nil }
            var zero = [Bool](repeating: false, count: pages)
            for page in 0..<pages {
                let entry = entries[page]
                let present = entry >> 63 & 1 == 1, swapped = entry >> 62 & 1 == 1, filePage = entry >> 61 & 1 == 1
                // A private copy (anonymous page, in memory or swapped out) means the guest wrote it.
                if swapped || (present && !filePage) { continue }
                let pageOffset = fileOffset + UInt64(page) * 4096
                while rangeIndex < dataRanges.count && dataRanges[rangeIndex].end <= pageOffset { rangeIndex += 1 }
                let inData = rangeIndex < dataRanges.count && dataRanges[rangeIndex].start < pageOffset + 4096
                zero[page] = !inData
            }
            result.append(zero)
            fileOffset += region.size
        }
        return result
    }

    /// Every section of a snapshot of the (paused) machine.
    func snapshotSections() throws(MachineError) -> [SnapshotSection] {
        var sections: [SnapshotSection] = []
        do {
            for vcpu in vcpus {
                var w = LEWriter()
                var state = try vcpu.saveState(msrIndices: snapshotMSRs)
                state.cpuid = guestCPUID[Int(vcpu.id)]
                state.encode(to: &w)
                sections.append(SnapshotSection(name: MachineSections.vcpu(Int(vcpu.id)), version: VCPUState.version,
                                                minimumVersion: VCPUState.version, required: true, payload: w.bytes))
            }
            var w = LEWriter()
            try vm.saveState().encode(to: &w)
            sections.append(SnapshotSection(name: MachineSections.vm, version: VMState.version,
                                            minimumVersion: VMState.version, required: true, payload: w.bytes))
        } catch { throw .kvm(error) }
        for (name, device) in snapshotDevices {
            let type = Swift.type(of: device)
            sections.append(SnapshotSection(name: name, version: type.snapshotVersion, minimumVersion: type.snapshotVersion,
                                            required: true, payload: device.saveSnapshot()))
        }
        var files = LEWriter()
        files.u32(UInt32(config.fwCfgFiles.count))
        for file in config.fwCfgFiles {
            files.string(file.name)
            files.blob(file.data)
        }
        sections.append(SnapshotSection(name: MachineSections.fwCfgFiles, version: MachineSections.fwCfgFilesVersion,
                                        minimumVersion: MachineSections.fwCfgFilesVersion, required: true, payload: files.bytes))
        if let rom = firmwareImage {
            var w = LEWriter()
            w.blob(rom)
            sections.append(SnapshotSection(name: MachineSections.firmware, version: MachineSections.firmwareVersion,
                                            minimumVersion: MachineSections.firmwareVersion, required: true, payload: w.bytes))
        }
        let bootItems = MachineSections.fwCfgBootKeys.compactMap { key in fwCfg.itemData(key: key).map { (key, $0) } }
        if !bootItems.isEmpty {
            var w = LEWriter()
            w.u32(UInt32(bootItems.count))
            for (key, data) in bootItems {
                w.u16(key)
                w.blob(data)
            }
            sections.append(SnapshotSection(name: MachineSections.fwCfgBoot, version: MachineSections.fwCfgBootVersion,
                                            minimumVersion: MachineSections.fwCfgBootVersion, required: true, payload: w.bytes))
        }
        return sections
    }

    // MARK: Restore

    /// Builds a machine from the snapshot in `directory`, ready to `run()`: guest memory is the
    /// snapshot's memory file mapped copy-on-write (it is never written), and every section is
    /// decoded and validated before any of it reaches KVM. With a new generation ID the guest is
    /// notified (GPE 5) as soon as its vCPUs run.
    public static func restore(from directory: String, options: RestoreOptions,
                               logger: Logger = Logger(label: "swiftvmm.machine")) throws(MachineError) -> Machine {
        let snapshot: LoadedSnapshot
        do { snapshot = try SnapshotReader.open(directory: directory) } catch { throw .snapshot(error) }
        let header = snapshot.header
        let cpus = Int(header.vcpuCount)

        // Everything that does not need the machine: decoded and checked first.
        func decodeSection<T>(_ name: String, support: SectionSupport,
                              _ body: (inout LEReader, UInt16) throws(LEDecodeError) -> T) throws(MachineError) -> T {
            do { return try snapshot.requireSection(named: name).load(support, body) } catch { throw .snapshot(error) }
        }
        let vcpuSupport = SectionSupport(current: VCPUState.version, oldest: 1)
        var vcpuStates: [VCPUState] = []
        for i in 0..<cpus {
            vcpuStates.append(try decodeSection(MachineSections.vcpu(i), support: vcpuSupport) { (r: inout LEReader, v: UInt16) throws(LEDecodeError) in
                try VCPUState(from: &r, version: v)
            })
        }
        let vmState = try decodeSection(MachineSections.vm, support: SectionSupport(current: VMState.version, oldest: 1)) {
            (r: inout LEReader, v: UInt16) throws(LEDecodeError) in try VMState(from: &r, version: v)
        }
        let fwCfgFiles = try decodeSection(MachineSections.fwCfgFiles,
                                           support: SectionSupport(current: MachineSections.fwCfgFilesVersion, oldest: 1)) {
            (r: inout LEReader, _: UInt16) throws(LEDecodeError) -> [(name: String, data: [UInt8])] in
            let n = try r.count("config.fwcfg count", limit: MachineSections.maxFwCfgFiles, minimumItemSize: 8)
            var files: [(name: String, data: [UInt8])] = []
            for _ in 0..<n {
                let name = try r.string("config.fwcfg name", limit: 55)
                guard name.hasPrefix("opt/") else { throw .invalid(field: "config.fwcfg name", reason: "\"\(name)\" is not under opt/") }
                files.append((name, try r.blob("config.fwcfg data", limit: 16 << 20)))
            }
            return files
        }

        var bootItems: [(UInt16, [UInt8])] = []
        if snapshot.section(named: MachineSections.fwCfgBoot) != nil {
            bootItems = try decodeSection(MachineSections.fwCfgBoot,
                                          support: SectionSupport(current: MachineSections.fwCfgBootVersion, oldest: 1)) {
                (r: inout LEReader, _: UInt16) throws(LEDecodeError) -> [(UInt16, [UInt8])] in
                let n = try r.count("config.boot count", limit: MachineSections.fwCfgBootKeys.count, minimumItemSize: 6)
                var items: [(UInt16, [UInt8])] = []
                for _ in 0..<n {
                    let key = try r.u16("config.boot key")
                    guard MachineSections.fwCfgBootKeys.contains(key), !items.contains(where: { $0.0 == key }) else {
                        throw .invalid(field: "config.boot key", reason: "0x\(String(key, radix: 16)) is not a boot item or appears twice")
                    }
                    items.append((key, try r.blob("config.boot data", limit: 512 << 20)))
                }
                return items
            }
        }

        var rom: [UInt8]?
        if snapshot.section(named: MachineSections.firmware) != nil {
            rom = try decodeSection(MachineSections.firmware, support: SectionSupport(current: MachineSections.firmwareVersion, oldest: 1)) {
                (r: inout LEReader, _: UInt16) throws(LEDecodeError) -> [UInt8] in
                let bytes = try r.blob("config.rom image", limit: Int(Layout.firmwareMaxSize))
                guard !bytes.isEmpty, bytes.count % 4096 == 0 else {
                    throw .invalid(field: "config.rom image", reason: "\(bytes.count) bytes is not a whole number of 4 KiB pages")
                }
                return bytes
            }
        }

        var config = MachineConfig(memorySize: header.memorySize, cpus: cpus, console: options.console,
                                   kvmPath: options.kvmPath, handleSignals: options.handleSignals,
                                   acpi: header.machineFlags.contains(.acpi))
        config.fwCfgFiles = fwCfgFiles
        config.processStart = options.processStart
        guard config.memorySize >= MachineConfig.minimumMemory, config.memorySize % 4096 == 0,
              config.memorySize == header.memoryFileLength else {
            throw .snapshot(.invalid(file: SnapshotFormat.stateFile, part: "header", field: "guest memory size",
                                     reason: "\(config.memorySize) bytes is not a valid guest memory size"))
        }

        let machine = try Machine(building: config, memoryFile: snapshot.memoryFileDescriptor, logger: logger)
        machine.restoredFrom = snapshot
        machine.restoredMemoryFile = FileIdentity(fd: snapshot.memoryFileDescriptor)

        // The saved CPU state against this host's (it may come from another CPU): adapted where it
        // can be, refused naming the feature where it cannot, before any of it reaches KVM.
        do {
            let host = HostCPU(supportedCPUID: try machine.kvm.supportedCPUID(), msrIndices: Set(try machine.kvm.msrIndexList()),
                               xsaveSize: machine.vm.xsaveSize)
            for (vcpu, state) in zip(machine.vcpus, vcpuStates) {
                // What this host gives a fresh vCPU of this machine, the most a saved one may have:
                // the CPUID it was given, and what KVM reads back (kvm_pvm answers with the host's
                // own features rather than what was set).
                let reference = machine.guestCPUID[Int(vcpu.id)] + (try vcpu.getCPUID())
                let (fitted, notes) = try state.fitted(to: host, reference: reference, vcpu: vcpu.id)
                for note in notes { logger.notice("vCPU \(vcpu.id): \(note)") }
                vcpuStates[Int(vcpu.id)] = fitted
            }
        } catch { throw .kvm(error) }
        machine.snapshotMSRs = vcpuStates.first.map { $0.msrs.map(\.index) }
        machine.guestCPUID = vcpuStates.map(\.cpuid)

        // The device models: each payload is validated as a whole before the device changes, and
        // applied once, before any state reaches KVM (their interrupt lines are driven after it).
        let devices = machine.snapshotDevices
        for (key, data) in bootItems { machine.fwCfg.addItem(key: key, data: data) }
        if let rom { try machine.mapFirmware(rom) }
        let known = Set(devices.map(\.name) + [MachineSections.vm, MachineSections.fwCfgFiles, MachineSections.fwCfgBoot,
                                                MachineSections.firmware])
        do {
            let skipped = try snapshot.unknownSections { known.contains($0) || MachineSections.isVCPU($0) }
            for section in skipped { logger.notice("snapshot section \"\(section.name)\" is unknown to this swiftvmm and optional: skipped") }
        } catch { throw .snapshot(error) }
        try machine.restoreDevices(from: snapshot)

        // KVM: vCPUs first, then the VM (its clock counts from the TSCs the vCPU restore set).
        do {
            for (vcpu, state) in zip(machine.vcpus, vcpuStates) { try vcpu.restoreState(state) }
            try machine.vm.restoreState(vmState)
        } catch { throw .kvm(error) }
        // After the restore: the irqchip's saved state does not hold the levels devices drive their
        // lines at, so each device drives its line again; then the generation ID changes.
        for device in machine.platform.all { device.afterRestore() }
        machine.vmcoreinfoState.withLock { $0 = machine.fwCfg.fileData("etc/vmcoreinfo") }

        if case .new(let guid) = options.generationID, let genid = machine.vmgenid {
            genid.setGUID(guid)
        }
        logger.info("restored \(cpus) vCPU(s) and \(header.memorySize >> 20) MiB from \(directory)")
        return machine
    }

    private func restoreDevices(from snapshot: LoadedSnapshot) throws(MachineError) {
        for (name, device) in snapshotDevices {
            let type = Swift.type(of: device)
            do throws(SnapshotError) {
                let section = try snapshot.requireSection(named: name)
                _ = try section.loadDecision(SectionSupport(current: type.snapshotVersion, oldest: type.oldestSnapshotVersion))
                do { try device.restoreSnapshot(section.payload, version: section.version) } catch {
                    throw SnapshotError.section(name: name, error)
                }
            } catch { throw .snapshot(error) }
        }
    }
}
