import Devices
import Glibc
import KVM
import Logging
import Snapshot
import VMMCore
import VMMSys
import Virtio
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
    /// The guest's clocks after the restore: `.saved` (default) continues them from the instant of
    /// the save; `.host` advances the kvmclock by the time since the save, so the guest's wall clock
    /// reads the host's time (and its monotonic clock jumps by as much).
    public var clock: ClockMode = .saved
    /// Use the working set kept beside the snapshot (`WorkingSet`): prefetch it while the vCPUs
    /// start, or, when there is none, record the pages the guest touches in its first second.
    public var workingSet = true
    public enum ClockMode: String, Sendable, Equatable, CaseIterable {
        case saved, host
    }
    public var kvmPath = "/dev/kvm"
    public var handleSignals = false
    public var processStart: UInt64?
    /// The TPM backend of a snapshot whose guest has a TPM (`--tpm`); such a snapshot needs one,
    /// and one without a TPM takes none (the guest found its devices when it booted).
    public var tpm: (any TPMBackend)?
    /// Makes a TPM whose state lives in memory only, for a snapshot that holds its TPM's state and
    /// is restored without `--tpm` (nil: such a restore is refused).
    public var inMemoryTPM: (@Sendable () throws(TPMStateError) -> any TPMBackend)?
    /// The drives for the snapshot's virtio-blk devices, in their order (the user's images: a
    /// snapshot holds no disk content).
    public var drives: [(store: any BlockStore, id: String)] = []
    /// The network backends for the snapshot's virtio-net devices, in their order (the guest keeps
    /// the MAC addresses it had).
    public var nets: [any NetBackend] = []

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
    /// How long the snapshot kept running vCPUs out of the guest (zero when they were paused before).
    public var pause: Duration = .zero
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
    ///
    /// With `live`, memory is written by a child process that sees it as it was at the pause, and
    /// the vCPUs resume as soon as that process exists: the guest is paused only while its state is
    /// saved, not while memory is written (`SnapshotSummary.pause`).
    ///
    /// With `copyDrives`, each virtio-blk drive's image is copied into the snapshot as
    /// `drive<N>.img` (N counting the drives from 0) while the guest is paused, after its requests
    /// in flight completed: a reflink where the file system has them, else a full copy (which
    /// lengthens the pause). Without it the drives stay the user's files, which the user snapshots.
    public func createSnapshot(at directory: String, live: Bool = false, copyDrives: Bool = false) throws(MachineError) -> SnapshotSummary {
        let wasRunning = !isPaused
        let clock = ContinuousClock()
        let pauseStart = clock.now
        pause()
        var pauseDuration: Duration?
        func resumeGuest() {
            guard pauseDuration == nil else { return }
            pauseDuration = clock.now - pauseStart
            if wasRunning { resume() }
        }
        defer { resumeGuest() }
        if let problem = memoryFileProblem() { throw .memoryFileChanged(problem) }
        // A TPM command in flight: wait until its response is in the TIS buffer (the paused guest
        // cannot start another), so that the TIS is saved between commands.
        if let backend = config.tpm, !backend.waitUntilIdle(timeoutMilliseconds: config.tpmDrainTimeoutMilliseconds) {
            throw .tpmBusy(timeoutMilliseconds: config.tpmDrainTimeoutMilliseconds)
        }
        // The TPM's own state goes into its section with the TIS registers.
        if let backend = config.tpm, let tis = platform.tpm {
            do { tis.attachBackendState(try backend.exportState()) } catch { throw .tpmState("\(error)") }
        }
        defer { platform.tpm?.attachBackendState(nil) }
        // virtio requests in flight complete (their data in guest memory, their used entries
        // published) before the devices' queues are saved; the threads then wait until the save
        // is done.
        defer { for worker in virtioWorkers { worker.release() } }
        for worker in virtioWorkers where !worker.hold(timeoutMilliseconds: config.virtioDrainTimeoutMilliseconds) {
            throw .invalidConfig("\(worker.device?.name ?? "a virtio device") did not finish its request in flight within \(config.virtioDrainTimeoutMilliseconds) ms (host I/O stuck?); no snapshot was written")
        }
        let sections = try snapshotSections()
        var flags: SnapshotMachineFlags = []
        if config.acpi { flags.insert(.acpi) }
        let header = SnapshotHeader(created: SnapshotHeader.now(), writerVersion: Machine.version,
                                    memorySize: config.memorySize, vcpuCount: UInt32(config.cpus), machineFlags: flags)
        do throws(SnapshotError) {
            let parent = restoredFrom.map { MemoryImageParent(fd: $0.memoryFileDescriptor, chunkCRCs: $0.memoryChunkCRCs) }
            let result = try SnapshotWriter.write(directory: directory, header: header, sections: sections,
                                                  memory: memory.regions.map(\.contents), parent: parent,
                                                  live: live ? { resumeGuest() } : nil,
                                                  isCancelled: { [self] in lifecycle.hasEnded || memoryFileProblem() != nil },
                                                  extraFiles: copyDrives ? driveCopies : [])
            resumeGuest()
            let paused = wasRunning ? pauseDuration ?? .zero : .zero
            logger.info("snapshot written to \(directory): \(result.diskBytes) bytes on disk in \(result.duration), guest paused \(paused); memory: \(result.memoryBytesWritten) bytes written, \(result.memoryBytesCopied) copied from the parent snapshot, \(result.memoryBytesRead) read")
            return SnapshotSummary(result: result, wasRunning: wasRunning, pause: paused)
        } catch {
            if let problem = memoryFileProblem() { throw .memoryFileChanged(problem) }
            throw .snapshot(error)
        }
    }

    /// The drive images as files of a snapshot: `drive<N>.img`, in the drives' order.
    var driveCopies: [SnapshotExtraFile] {
        platform.virtio.compactMap { ($0.model as? VirtioBlock)?.store }.enumerated().map { n, store in
            SnapshotExtraFile(name: Self.driveCopyName(n)) { fd throws(SysError) in try store.copyImage(into: fd) }
        }
    }

    /// The name of drive `n`'s copy in a snapshot made with `copyDrives`.
    public static func driveCopyName(_ n: Int) -> String { "drive\(n).img" }

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
            var vmState = try vm.saveState()
            vmState.tscKHz = (try? vcpus.first?.tscKHz()) ?? 0
            vmState.encode(to: &w)
            // Layout 2 only appends fields: a layout-1 reader still loads it (without them).
            sections.append(SnapshotSection(name: MachineSections.vm, version: VMState.version,
                                            minimumVersion: 1, required: true, payload: w.bytes))
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

    /// Builds a machine from the snapshot in `directory`, ready to `run()` (see `RestoreBuilder`).
    public static func restore(from directory: String, options: RestoreOptions,
                               logger: Logger = Logger(label: "swiftvmm.machine")) throws(MachineError) -> Machine {
        try RestoreBuilder.restore(from: directory, options: options, logger: logger)
    }
}
