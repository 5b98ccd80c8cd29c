import Devices
import Glibc
import KVM
import Logging
import Snapshot
import VMMCore
import VMMSys
import Virtio
import WireFormat

/// Builds a running-ready machine from a snapshot directory (`swiftvmm restore`), in this order:
/// read and check the container; decode and validate every vCPU, VM and configuration section;
/// build the machine with the memory file as its RAM; fit the saved CPU state to this host; apply
/// each device's state once; restore KVM's state; then the post-restore step (each device drives
/// its interrupt line again, the new generation ID is written and announced). The running machine
/// (`Machine`) knows nothing of it.
enum RestoreBuilder {
    /// Builds a machine from the snapshot in `directory`, ready to `run()`: guest memory is the
    /// snapshot's memory file mapped copy-on-write (it is never written), and every section is
    /// decoded and validated before any of it reaches KVM. With a new generation ID the guest is
    /// notified (GPE 5) as soon as its vCPUs run.
    static func restore(from directory: String, options: RestoreOptions, logger: Logger) throws(MachineError) -> Machine {
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
        // The guest found its TPM (or none) through the ACPI tables when it booted: a restore
        // brings back the same devices. A snapshot with a TPM needs --tpm, unless it holds the
        // TPM's own state: then, without --tpm, that state lives in memory only.
        let tpmSection = snapshot.section(named: TPMTIS.sectionName)
        if tpmSection == nil && options.tpm != nil {
            throw .invalidConfig("the snapshot's guest has no TPM, and one cannot be added to a booted guest: drop --tpm")
        }
        config.tpm = options.tpm
        if let tpmSection, options.tpm == nil {
            let format: TPMBackendState.Format?
            do { format = try TPMTIS.savedBackendStateFormat(tpmSection.payload, version: tpmSection.version) } catch {
                throw .snapshot(.section(name: TPMTIS.sectionName, error))
            }
            guard format != .swtpm else {
                throw .invalidConfig("the snapshot's TPM state comes from swtpm: restore it with --tpm swtpm,socket=PATH (a fresh swtpm)")
            }
            guard format == .libtpms, let make = options.inMemoryTPM else {
                throw .invalidConfig("the snapshot's guest has a TPM: restore it with --tpm builtin,state=PATH or --tpm swtpm,socket=PATH")
            }
            do { config.tpm = try make() } catch { throw .tpmState("\(error)") }
            logger.notice("the snapshot's TPM runs with its state in memory only (lost at exit); give --tpm builtin,state=NEWPATH to keep it in a file")
        }
        config.virtio = try virtioDevices(in: snapshot, drives: options.drives, nets: options.nets)
        guard config.memorySize >= MachineConfig.minimumMemory, config.memorySize % 4096 == 0,
              config.memorySize == header.memoryFileLength else {
            throw .snapshot(.invalid(file: SnapshotFormat.stateFile, part: "header", field: "guest memory size",
                                     reason: "\(config.memorySize) bytes is not a valid guest memory size"))
        }

        let machine = try Machine(building: config, memoryFile: snapshot.memoryFileDescriptor, logger: logger)
        machine.restoredFrom = snapshot
        machine.startWorkingSet(enabled: options.workingSet)
        var built = false
        defer { if !built { machine.abandonPrefetch() } }
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
                                                MachineSections.firmware, MemoryChunks.name])
        do {
            let skipped = try snapshot.unknownSections { known.contains($0) || MachineSections.isVCPU($0) }
            for section in skipped { logger.notice("snapshot section \"\(section.name)\" is unknown to this swiftvmm and optional: skipped") }
        } catch { throw .snapshot(error) }
        try restoreDevices(of: machine, from: snapshot)
        // The TPM continues from the state its section brought back (or, from an older snapshot
        // without it, powers on fresh), before any vCPU runs.
        if let tis = machine.tpm, let backend = config.tpm {
            do { try backend.resume(from: tis.takeRestoredBackendState()) } catch { throw .tpmState("\(error)") }
        }

        // The TSC rate the guest calibrated against, before the TSCs are set.
        try matchTSCRate(of: machine, saved: vmState.tscKHz, logger: logger)
        let advance = try clockAdvance(vmState, mode: options.clock, logger: logger)

        // KVM: vCPUs first, then the VM (its clock counts from the TSCs the vCPU restore set).
        do {
            for (vcpu, state) in zip(machine.vcpus, vcpuStates) { try vcpu.restoreState(state) }
            try machine.vm.restoreState(vmState, advance: advance)
        } catch { throw .kvm(error) }
        // After the restore: the irqchip's saved state does not hold the levels devices drive their
        // lines at, so each device drives its line again; then the generation ID changes.
        for device in machine.platform.all { device.afterRestore() }
        machine.vmcoreinfoState.withLock { $0 = machine.fwCfg.fileData("etc/vmcoreinfo") }

        // The new GUID is a change like any other: pending until the guest acknowledges it. Keeping
        // the GUID of a snapshot saved while a change was pending (GPE 5's status came back set,
        // the acknowledgement bookkeeping did not), that change is pending again.
        if let genid = machine.vmgenid {
            switch options.generationID {
            case .new(let guid): genid.setGUID(guid)
            case .keep:
                if machine.acpi.gpeStatus(byte: VMGenIDTable.gpe / 8) & 1 << (VMGenIDTable.gpe % 8) != 0 { genid.renotify() }
            }
        }
        logger.info("restored \(cpus) vCPU(s) and \(header.memorySize >> 20) MiB from \(directory)")
        built = true
        return machine
    }

    /// KVM's tolerance for a TSC rate that differs from the host's without scaling (its
    /// tsc_tolerance_ppm): within it the guest's clocks stay within NTP's reach.
    static let tscTolerancePPM: UInt64 = 250

    /// Runs the vCPUs' TSCs at the rate the guest was saved with (0: a layout-1 snapshot, which did
    /// not record it: left as it is). A rate within KVM's tolerance of this host's needs nothing;
    /// another one needs TSC scaling (KVM_CAP_TSC_CONTROL), and without it the restore is refused:
    /// the guest's TSC-based clocks would run at the wrong speed.
    static func matchTSCRate(of machine: Machine, saved: UInt32, logger: Logger) throws(MachineError) {
        guard saved != 0, let first = machine.vcpus.first else { return }
        let here: UInt32
        do { here = try first.tscKHz() } catch { throw .kvm(error) }
        let difference = UInt64(saved > here ? saved - here : here - saved)
        guard difference * 1_000_000 > UInt64(saved) * tscTolerancePPM else { return }
        guard machine.vm.canScaleTSC else {
            throw .invalidConfig("the snapshot's guest ran its TSC at \(saved) kHz and this host runs it at \(here) kHz; "
                                 + "this host's KVM cannot scale the TSC (no KVM_CAP_TSC_CONTROL), and the guest's clocks would run at the wrong speed")
        }
        do {
            for vcpu in machine.vcpus { try vcpu.setTSCKHz(saved) }
        } catch { throw .kvm(error) }
        logger.notice("the guest's TSC runs at its saved \(saved) kHz (this host's: \(here) kHz), by TSC scaling")
    }

    /// How far to move the kvmclock past its saved value: nothing with `.saved`; with `.host`, the
    /// host's CLOCK_REALTIME now minus at the save (refused for a layout-1 snapshot, which did not
    /// record it; 0 if the host's clock is now behind that instant).
    static func clockAdvance(_ state: VMState, mode: RestoreOptions.ClockMode, logger: Logger) throws(MachineError) -> UInt64 {
        guard mode == .host else { return 0 }
        guard state.savedRealtime != 0 else {
            throw .invalidConfig("--clock host: the snapshot does not record when it was saved (an older layout); restore it with --clock saved")
        }
        let now = realtimeNanoseconds()
        guard now > state.savedRealtime else {
            logger.notice("--clock host: the host's clock is before the snapshot's save time; the guest's clock continues from the save")
            return 0
        }
        let advance = now - state.savedRealtime
        logger.info("--clock host: the guest's clocks move \(advance / 1_000_000) ms forward (the time since the save)")
        return advance
    }

    /// The virtio devices the snapshot's guest found in its DSDT, in their order (from the names of
    /// their sections, `dev.virtio-KINDn`): each virtio-blk takes the next of `drives`, which must
    /// be exactly as many.
    static func virtioDevices(in snapshot: LoadedSnapshot, drives: [(store: any BlockStore, id: String)],
                              nets: [any NetBackend] = []) throws(MachineError) -> [VirtioDeviceSpec] {
        var kinds: [Int: String] = [:]
        for section in snapshot.sections where section.name.hasPrefix("dev.virtio-") {
            let rest = section.name.dropFirst("dev.virtio-".count)
            let kind = String(rest.prefix { $0.isLetter })
            guard let n = Int(rest.dropFirst(kind.count)), (0..<Layout.maxVirtioDevices).contains(n), kinds[n] == nil,
                  ["blk", "rng", "con", "net"].contains(kind) else {
                throw .snapshot(.section(name: section.name, .invalid(field: "name", reason: "not a virtio device this swiftvmm knows")))
            }
            kinds[n] = kind
        }
        guard kinds.keys.sorted() == Array(0..<kinds.count) else {
            throw .invalidConfig("the snapshot's virtio devices are not numbered 0 to \(kinds.count - 1)")
        }
        let blocks = kinds.values.filter { $0 == "blk" }.count
        guard blocks == drives.count else {
            throw .invalidConfig(blocks == 0
                ? "the snapshot's guest has no drive, and one cannot be added to a booted guest: drop --drive"
                : "the snapshot's guest has \(blocks) drive(s): restore it with \(blocks) --drive option(s), in the same order (got \(drives.count))")
        }
        let networks = kinds.values.filter { $0 == "net" }.count
        guard networks == nets.count else {
            throw .invalidConfig(networks == 0
                ? "the snapshot's guest has no network device, and one cannot be added to a booted guest: drop --net"
                : "the snapshot's guest has \(networks) network device(s): restore it with \(networks) --net option(s), in the same order (got \(nets.count))")
        }
        var nextNet = nets.makeIterator()
        var next = drives.makeIterator()
        return (0..<kinds.count).map { n in
            switch kinds[n] {
            case "blk": if let drive = next.next() { return .block(store: drive.store, id: drive.id) }
            case "con": return .console
            case "net": if let backend = nextNet.next() { return .net(backend: backend, mac: [0, 0, 0, 0, 0, 0]) }
            default: break
            }
            return .rng
        }
    }

    /// Each device's payload, validated whole, applied once (its interrupt line is driven later).
    private static func restoreDevices(of machine: Machine, from snapshot: LoadedSnapshot) throws(MachineError) {
        for (name, device) in machine.snapshotDevices {
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
