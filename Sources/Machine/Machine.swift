import ACPI
import BootLoader
import Devices
import Glibc
import KVM
import Logging
import Snapshot
import Synchronization
import VMMCore
import VMMSys
import Virtio
import WireFormat

/// An x86-64 KVM machine: guest memory, vCPUs, the in-kernel irqchip and PIT, and the devices of a
/// minimal PC (COM1, i8042 for reset, CMOS clock) with full fixed-hardware ACPI (PM1, PM timer,
/// GPE0, SCI on IRQ 9, reset register) described by generated tables.
public final class Machine: @unchecked Sendable {
    /// The version of SwiftVMM (written into snapshots).
    public static let version = "0.1.0"
    public let config: MachineConfig
    let kvm: KVMSystem
    let vm: VirtualMachine
    public let memory: GuestMemory
    let vcpus: [VCPU]
    let pio: Bus
    let mmio: Bus
    /// COM1, the guest's console.
    public var serial: Serial16550 { platform.serial }
    /// The ACPI fixed hardware: power button, GPEs (the vmgenid device raises GPE 5), S5 and reset.
    public var acpi: ACPIPowerManagement { platform.acpi }
    /// The tables the host placed in guest memory for a direct boot (nil with `acpi: false`, with
    /// firmware, which places them itself, and after a restore, where they come with guest memory).
    public internal(set) var acpiTables: ACPITableSet?
    /// The VM generation ID device (nil with `acpi: false`).
    public var vmgenid: VMGenID? { platform.vmgenid }
    /// The virtio devices, in their order (window and GSI n).
    public var virtioDevices: [VirtioMMIO] { platform.virtio }
    /// The virtio console (hvc0), nil without one: where the host's input goes instead of COM1.
    public var virtioConsole: VirtioConsole? { platform.virtio.lazy.compactMap { $0.model as? VirtioConsole }.first }
    /// The TPM's TIS front end (nil without `--tpm`).
    public var tpm: TPMTIS? { platform.tpm }
    /// Every platform device, registered once (the buses, snapshot sections and DSDT come from it).
    let platform: Platform
    /// The threads serving the virtio devices' queues (one per device, in `platform.virtio`'s order).
    let virtioWorkers: [VirtioWorker]
    /// QEMU's firmware configuration device: ACPI blobs and loader script, e820, writable files.
    public var fwCfg: FwCfg { platform.fwCfg }
    let vmcoreinfoState = Locked<[UInt8]?>(nil)
    private let gate = PauseGate()
    /// vCPUs that executed HLT with nothing to wake them (KVM_EXIT_HLT).
    private let haltedVCPUs = Atomic<Int>(0)
    private let vcpuThreads = Locked<[OSThread]>([])
    /// The snapshot whose memory file backs guest RAM (copy-on-write), for a restored machine, and
    /// that file as it was at the restore.
    var restoredFrom: LoadedSnapshot?
    /// A restored machine whose snapshot has no working set records one when it runs.
    var recordsWorkingSet = false
    /// The thread prefetching the working set (started while the restore builds the machine).
    let workingSetThread = Locked<OSThread?>(nil)
    var restoredMemoryFile: FileIdentity?
    /// The MSRs a snapshot saves (nil: every one KVM lists): a baseline machine's are the baseline
    /// list, a restored machine's those it was restored with, so its snapshots move as its parent's.
    var snapshotMSRs: [UInt32]?
    /// The CPUID each vCPU was given (by index): what a snapshot records as the guest's CPU model.
    /// (KVM_GET_CPUID2 reads back what was set on KVM proper, but kvm_pvm answers with the host's
    /// own features whatever was set, which would tie a baseline snapshot to the host that wrote it.)
    var guestCPUID: [[CPUIDEntry]] = []
    /// The firmware image's read-only mapping (kept alive while KVM maps it).
    private var firmwareROM: ROM?
    let lifecycle: Lifecycle
    let logger: Logger
    private let unhandled = Mutex(Set<String>())

    /// The ACPI table blob and the vmgenid GUID blob published in fw_cfg (the host-side loader of a
    /// direct boot places them in guest memory).
    private(set) var publishedTables: (blob: ACPITableBlob, guid: [UInt8])?

    /// Builds the VM and loads `boot` into guest memory. The machine keeps no reference to the boot
    /// payload (kernel, initrd), so the caller's copy is the only one and is freed with it.
    public convenience init(_ config: MachineConfig, boot: BootSource, logger: Logger = Logger(label: "swiftvmm.machine")) throws(MachineError) {
        try self.init(building: config, memoryFile: nil, logger: logger)
        try BootBuilder(machine: self).load(boot)
    }

    /// Builds the VM, its memory and devices, in their power-on state, without writing guest memory
    /// or setting any vCPU register: a boot (`BootBuilder`) or a restore (`RestoreBuilder`) does that
    /// next. With `memoryFile`, guest
    /// RAM is that file mapped copy-on-write (a snapshot's memory).
    init(building config: MachineConfig, memoryFile: Int32?, logger: Logger) throws(MachineError) {
        self.config = config
        self.logger = logger
        if let problem = MachineConfig.memorySizeProblem(config.memorySize) { throw .invalidConfig(problem) }
        guard (1...MachineConfig.maximumCPUs).contains(config.cpus) else {
            throw .invalidConfig("--cpus must be between 1 and \(MachineConfig.maximumCPUs) (got \(config.cpus))")
        }
        guard config.acpi || config.tpm == nil else {
            throw .invalidConfig("a TPM needs ACPI (the guest finds it through the DSDT and the TPM2 table): drop --no-acpi or --tpm")
        }
        guard config.acpi || config.virtio.isEmpty else {
            throw .invalidConfig("virtio devices need ACPI (the guest finds them in the DSDT): drop --no-acpi, or the devices (--drive, and --no-rng)")
        }
        guard config.virtio.count <= Layout.maxVirtioDevices else {
            throw .invalidConfig("at most \(Layout.maxVirtioDevices) virtio devices (got \(config.virtio.count), counting the default virtio-rng)")
        }
        guard config.acpi || config.cpus == 1 else {
            throw .invalidConfig("more than one vCPU needs ACPI (the MADT is how the guest finds them); drop --no-acpi or use --cpus 1")
        }
        do {
            kvm = try KVMSystem(path: config.kvmPath)
            try kvm.requireCapabilities()
            vm = try kvm.createVM()
            try vm.setTSSAddress(Layout.tss)
            try vm.setIdentityMapAddress(Layout.identityMap)
            try vm.createIRQChip()
            try vm.createPIT2()
        } catch { throw .kvm(error) }
        if config.cpus > kvm.maxVCPUs {
            throw .kvm(.tooManyVCPUs(requested: config.cpus, max: kvm.maxVCPUs))
        }

        do {
            memory = try GuestMemory(ranges: Layout.ramRanges(size: config.memorySize).map { (GuestAddress($0.base), $0.size) },
                                     file: memoryFile)
        } catch { throw .system(error) }
        do {
            for region in memory.regions {
                try vm.setUserMemoryRegion(guestAddress: region.guestBase.rawValue, size: region.size, hostAddress: region.hostBase)
            }
        } catch { throw .kvm(error) }

        let lifecycle = Lifecycle()
        self.lifecycle = lifecycle
        do {
            virtioWorkers = try config.virtio.map { _ throws(SysError) in try VirtioWorker(logger: logger) }
        } catch { throw .system(error) }
        let platform: Platform
        do {
            platform = try Platform(Platform.Wiring(
                console: config.console, line: { [vm, logger] gsi in KVMInterruptLine(vm: vm, gsi: gsi, logger: logger) },
                memory: memory, generationID: config.acpi ? config.vmGenerationID : nil, tpm: config.tpm,
                virtio: Array(zip(config.virtio, virtioWorkers.map { Optional($0) })),
                onPowerOff: { lifecycle.finish(.poweredOff($0)) }, onReset: { lifecycle.finish(.reset($0)) }, logger: logger))
        } catch { throw .bus(error) }
        do {
            for worker in virtioWorkers { try worker.connect(to: vm) }
        } catch { throw .kvm(error) }
        self.platform = platform
        let fwCfg = platform.fwCfg
        pio = platform.pio
        mmio = platform.mmio

        let e820 = Machine.e820Map(memory: memory)
        let vmcoreinfo = vmcoreinfoState
        do {
            fwCfg.addItem(key: FwCfgKeys.cpuCount, data: littleEndianBytes(UInt16(config.cpus)))
            try fwCfg.addFile("etc/e820", data: e820.flatMap(\.fwCfgBytes))
            // QEMU's boot order list (device paths, one per line): nothing to choose from here.
            try fwCfg.addFile("bootorder", data: [0])
            // The guest kernel's qemu_fw_cfg driver writes its vmcoreinfo note address here.
            try fwCfg.addWritableFile("etc/vmcoreinfo", size: 16) { [logger] _, _, whole in
                vmcoreinfo.withLock { $0 = whole }
                logger.info("guest vmcoreinfo: \(VMCoreInfo(whole).description)")
            }
            try fwCfg.replaceFileData("etc/vmcoreinfo", VMCoreInfo.hostAnnouncement)
            for file in config.fwCfgFiles { try fwCfg.addFile(file.name, data: file.data) }
        } catch { throw .fwCfg(error) }
        if let genid = platform.vmgenid {
            let blob = PlatformTables.blob(cpus: config.cpus, devices: platform.dsdtDevices, tables: platform.deviceTables)
            do {
                try PlatformTables.publish(blob, to: fwCfg)
                try genid.publish(to: fwCfg) { [logger] in logger.warning("vmgenid: the guest reported an unusable GUID address") }
            } catch { throw .fwCfg(error) }
            publishedTables = (blob, VMGenIDTable.blob(config.vmGenerationID))
        }
        acpiTables = nil

        do {
            let supported = try kvm.supportedCPUID()
            let tscDeadline = kvm.hasTSCDeadlineTimer
            var made: [VCPU] = []
            for id in 0..<config.cpus {
                let vcpu = try vm.createVCPU(id: UInt32(id))
                let cpuid = CPUIDSetup.entries(from: supported, vcpuID: UInt32(id), vcpuCount: config.cpus,
                                               tscKHz: try? vcpu.tscKHz(), tscDeadline: tscDeadline, model: config.cpuModel)
                try vcpu.setCPUID(cpuid)
                guestCPUID.append(cpuid)
                made.append(vcpu)
            }
            vcpus = made
            if config.cpuModel == .baseline { snapshotMSRs = try kvm.msrIndexList().filter(CPUIDSetup.baselineMSRs.contains) }
        } catch { throw .kvm(error) }
    }

    /// Maps `rom` read-only so that it ends at 4 GiB.
    func mapFirmware(_ rom: [UInt8]) throws(MachineError) {
        guard !rom.isEmpty, rom.count % 4096 == 0, UInt64(rom.count) <= Layout.firmwareMaxSize else {
            throw .invalidConfig("firmware images must be a multiple of 4 KiB and at most \(Layout.firmwareMaxSize >> 10) KiB (got \(rom.count) bytes)")
        }
        let mapped: ROM
        do { mapped = try ROM(rom) } catch { throw .system(error) }
        do {
            try vm.setUserMemoryRegion(guestAddress: Layout.fourGiB - UInt64(rom.count), size: UInt64(rom.count),
                                       hostAddress: mapped.mapping.base, readOnly: true)
        } catch { throw .kvm(error) }
        firmwareROM = mapped
    }

    /// The firmware image mapped below 4 GiB (nil without a firmware boot).
    var firmwareImage: [UInt8]? {
        firmwareROM.map { Array(UnsafeRawBufferPointer(start: $0.mapping.base, count: $0.mapping.size)) }
    }

    /// The guest's memory map: low RAM below the EBDA, the ACPI tables, the BIOS area reserved, RAM from 1 MiB.
    public func e820Map() -> [E820Entry] { Machine.e820Map(memory: memory) }

    static func e820Map(memory: GuestMemory) -> [E820Entry] {
        e820Map(ram: memory.regions.map { ($0.guestBase.rawValue, $0.size) })
    }

    /// The e820 map of a machine whose guest RAM is `ram` (`Layout.ramRanges`).
    static func e820Map(ram: [(base: UInt64, size: UInt64)]) -> [E820Entry] {
        var map = [
            E820Entry(address: 0, size: Layout.lowRAMEnd, kind: .ram),
            E820Entry(address: Layout.ebda, size: 0xA0000 - Layout.ebda, kind: .reserved),
            E820Entry(address: Layout.acpiTables, size: Layout.acpiTablesSize, kind: .acpi),
            E820Entry(address: Layout.biosArea, size: Layout.highMemory - Layout.biosArea, kind: .reserved),
        ]
        for region in ram {
            let base = max(region.base, Layout.highMemory)
            let end = region.base + region.size
            if end > base { map.append(E820Entry(address: base, size: end - base, kind: .ram)) }
        }
        return map
    }

    // MARK: Running

    /// Runs the machine until the guest powers off or resets, a vCPU fails, or (with `handleSignals`)
    /// SIGINT/SIGTERM/SIGHUP arrives. Blocks the calling thread.
    /// The signals that stop a machine run with `handleSignals` (exit status 128 + N). A process
    /// that runs a machine should block them on its main thread before it starts any thread, so
    /// that none arrives before `run()` reads them (threads inherit the mask).
    public static let stopSignals: [Int32] = [SIGINT, SIGTERM, SIGHUP]

    public func run() -> MachineExit {
        let stopSignals = Machine.stopSignals
        if config.handleSignals { setSignalsBlocked(stopSignals, true) }
        KickSignal.install()
        for worker in virtioWorkers {
            do { try worker.start() } catch {
                lifecycle.finish(.failed("cannot start the thread of \(worker.device?.name ?? "a virtio device"): \(error)"))
            }
        }
        defer { for worker in virtioWorkers { worker.stop() } }
        var threads: [OSThread] = []
        let start = StartLatch()
        for vcpu in vcpus {
            do {
                threads.append(try OSThread(name: "vcpu\(vcpu.id)", role: .vcpu) { [self] in
                    start.wait()
                    self.vcpuLoop(vcpu)
                })
            } catch {
                lifecycle.finish(.failed("cannot start a thread for vCPU \(vcpu.id): \(error)"))
                break
            }
        }
        vcpuThreads.withLock { $0 = threads }
        start.release()
        if let start = config.processStart {
            let ms = Double(monotonicNanoseconds() &- start) / 1e6
            logger.info("vCPUs entering the guest \(formatMilliseconds(ms)) ms after process start")
        }
        let recorder = startWorkingSetRecorder()
        defer {
            recorder?.join()
            workingSetThread.withLock { $0 }?.join()
        }

        let signals: SignalFD? = config.handleSignals ? try? SignalFD(stopSignals) : nil
        // Everything this thread starts is running: from here on it is the run loop's sandbox.
        ThreadSandbox.enter(.main)
        var fds = [lifecycle.event.fd.rawValue]
        if let signals { fds.append(signals.fd.rawValue) }
        // A restored machine's RAM is its snapshot's memory file, mapped: look at that file every
        // second, in case someone writes or truncates it under the running guest.
        let timeout: Int32 = restoredFrom == nil ? -1 : 1000
        while !lifecycle.hasEnded {
            guard let ready = try? waitReadable(fds, timeoutMilliseconds: timeout) else { continue }
            if ready.contains(1), let signals, let signo = try? signals.next() {
                lifecycle.finish(.signalled(signo))
            }
            if let problem = memoryFileProblem() { lifecycle.finish(.failed(problem)) }
        }
        // Stop every vCPU: immediate_exit makes a pending or future KVM_RUN return, the signal
        // interrupts one in progress.
        for vcpu in vcpus { vcpu.requestImmediateExit() }
        gate.release()
        for t in threads { t.kick(signal: KickSignal.number) }
        for t in threads { t.join() }
        // What the guest printed last reaches the host, unless its reader has stalled.
        config.console.drain(timeoutMilliseconds: 1000)
        return lifecycle.outcome ?? .failed("no outcome")
    }

    /// Why guest memory is no longer what was restored, for a machine restored from a snapshot
    /// whose memory file was written, truncated or extended since (guest RAM maps it copy-on-write,
    /// so pages the guest has not written yet come from the file as it is now); nil when the file
    /// is unchanged or the machine was not restored.
    public func memoryFileProblem() -> String? {
        guard let backing = restoredFrom, let before = restoredMemoryFile else { return nil }
        let now = FileIdentity(fd: backing.memoryFileDescriptor)
        guard now != before else { return nil }
        return "the memory file \(backing.memoryPath) this VM was restored from changed under it (was \(before), now \(now.map { "\($0)" } ?? "unreadable")): guest memory is no longer what was saved"
    }

    /// Whether the vCPUs are paused (QMP `stop`).
    public var isPaused: Bool { gate.isPaused }

    /// Pauses every vCPU: each is kicked out of KVM_RUN and parks; returns once all are parked (or
    /// the machine ended). Devices keep their state; host-side events (a power-button press, a
    /// generation ID change) stay pending in the device registers until the guest runs again.
    public func pause() {
        guard !gate.isPaused else { return }
        gate.setPaused()
        let threads = vcpuThreads.withLock { $0 }
        func kick() -> Bool {
            guard !lifecycle.hasEnded else { return false }
            for vcpu in vcpus { vcpu.requestImmediateExit() }
            for t in threads { t.kick(signal: KickSignal.number) }
            return true
        }
        _ = kick()
        gate.waitForParked(threads.count, kick: kick)
    }

    /// Resumes vCPUs paused by `pause()`.
    public func resume() {
        guard gate.isPaused else { return }
        for vcpu in vcpus { vcpu.requestImmediateExit(false) }
        gate.resume()
    }

    /// What the guest last wrote to fw_cfg `etc/vmcoreinfo` (nil until it writes).
    public var vmcoreinfo: VMCoreInfo? { vmcoreinfoState.withLock { $0.map(VMCoreInfo.init) } }

    /// Changes the VM generation ID: guest memory first, then GPE 5 and the SCI. Returns false when
    /// the machine has no vmgenid device (no ACPI); a change before the guest's loader reported the
    /// GUID's address is kept and written when it does.
    @discardableResult
    public func setGenerationID(_ guid: [UInt8]) -> Bool {
        guard let vmgenid else { return false }
        vmgenid.setGUID(guid)
        return true
    }

    /// Where the latest generation ID change stands: pending until the guest's OSPM clears GPE0_STS
    /// bit 5, then acknowledged (see `VMGenID`); nil without the vmgenid device.
    public var generationIDChange: VMGenID.ChangeStatus? { vmgenid?.changeStatus }

    /// Sets who hears of the guest acknowledging a generation ID change (once per change, the
    /// latest one when several were made before the guest's clear; also the change a restore makes).
    /// The handler runs on the vCPU thread of the guest's write: it must only record or queue, never
    /// block (queueing a QMP event is fine: `QMPServer.emit` takes a lock briefly and signals an
    /// eventfd). Nothing happens without the vmgenid device.
    public func onGenerationIDAcknowledged(_ handler: (@Sendable (VMGenID.Acknowledgement) -> Void)?) {
        vmgenid?.onAcknowledged(handler)
    }

    /// Presses the ACPI fixed power button: the guest's ACPI button driver sees PWRBTN_STS with the
    /// SCI and, with an init that handles it, shuts down cleanly (ending the VM through S5).
    public func pressPowerButton() {
        acpi.pressPowerButton()
    }

    /// Ends the run from another thread (a control socket, a test).
    public func requestExit(_ exit: MachineExit) {
        lifecycle.finish(exit)
    }

    private func vcpuLoop(_ vcpu: VCPU) {
        // Threads inherit their creator's signal mask, and runtime worker threads block everything:
        // the kick must get through or KVM_RUN cannot be interrupted.
        setSignalsBlocked([KickSignal.number], false)
        while !lifecycle.hasEnded {
            if gate.isPaused {
                // Finish the instruction of the last exit (an IN's data, an MMIO read) so that the
                // state a snapshot reads while parked is consistent.
                do { try vcpu.completePendingExit { [self] in handleExit($0, vcpu: vcpu) } } catch {
                    lifecycle.finish(.failed("\(error)\n\(vcpu.registerDump())"))
                    return
                }
                gate.park()
                continue
            }
            let exit: VCPUExit
            do { exit = try vcpu.run() } catch {
                lifecycle.finish(.failed("\(error)\n\(vcpu.registerDump())"))
                return
            }
            if case .hlt = exit {
                haltedForGood(vcpu)
                return
            }
            handleExit(exit, vcpu: vcpu)
        }
    }

    /// KVM_EXIT_HLT: this vCPU halted and nothing in KVM will wake it (KVM reports HLT only when
    /// it does not handle it itself). The vCPU stays stopped; the machine goes on with the others
    /// and ends when every vCPU has halted. Until then the stopped vCPU still parks for a pause, so
    /// that `pause()` (a snapshot) finds every thread parked.
    private func haltedForGood(_ vcpu: VCPU) {
        let halted = haltedVCPUs.wrappingAdd(1, ordering: .acquiringAndReleasing).newValue
        logger.info("vCPU \(vcpu.id) halted for good (\(halted) of \(vcpus.count))")
        if halted == vcpus.count {
            lifecycle.finish(.poweredOff("all work done: every vCPU halted"))
            return
        }
        while !lifecycle.hasEnded {
            if gate.isPaused { gate.park(); continue }
            usleep(20_000)
        }
    }

    private func handleExit(_ exit: VCPUExit, vcpu: VCPU) {
        switch exit {
        case .io(let port, let size, let isWrite, let count, let data):
            handleIO(port: UInt64(port), size: size, isWrite: isWrite, count: count, data: data)
        case .mmio(let address, let isWrite, let data):
            let handled = isWrite ? mmio.write(address, data: UnsafeRawBufferPointer(data)) : mmio.read(address, data: data)
            if !handled { noteUnhandled("MMIO", address: address, size: data.count, isWrite: isWrite) }
        case .interrupted:
            break
        case .hlt:
            break // handled by the run loop (haltedForGood)
        case .shutdown:
            // KVM_EXIT_SHUTDOWN: a triple fault. Not a reset the guest asked for: something went
            // wrong in it (bad RIP, garbage memory, a broken IDT), so it ends as a crash, with the
            // registers of the vCPU it happened on.
            lifecycle.finish(.guestCrashed("triple fault on vCPU \(vcpu.id)\n\(vcpu.registerDump())"))
        case .systemEvent(let event):
            switch event {
            case .shutdown: lifecycle.finish(.poweredOff("KVM system event: shutdown"))
            case .reset: lifecycle.finish(.reset("KVM system event: reset"))
            case .crash: lifecycle.finish(.guestCrashed("KVM system event: crash"))
            case .other(let type): lifecycle.finish(.failed("unknown KVM system event \(type) on vCPU \(vcpu.id)"))
            }
        case .failEntry(let reason, let cpu):
            lifecycle.finish(.failed("KVM_EXIT_FAIL_ENTRY on vCPU \(vcpu.id) (hardware reason 0x\(String(reason, radix: 16)), host CPU \(cpu))\n\(vcpu.registerDump())"))
        case .internalError(let suberror, let data):
            let words = data.map { "0x" + String($0, radix: 16) }.joined(separator: " ")
            lifecycle.finish(.failed("KVM_EXIT_INTERNAL_ERROR on vCPU \(vcpu.id) (suberror \(suberror), data \(words))\n\(vcpu.registerDump())"))
        case .exception(let number, let code):
            lifecycle.finish(.failed("unhandled guest exception \(number) (error code \(code)) on vCPU \(vcpu.id)\n\(vcpu.registerDump())"))
        case .unexpected(let reason):
            lifecycle.finish(.failed("unexpected KVM exit reason \(reason) on vCPU \(vcpu.id)\n\(vcpu.registerDump())"))
        }
    }

    private func handleIO(port: UInt64, size: Int, isWrite: Bool, count: Int, data: UnsafeMutableRawBufferPointer) {
        for i in 0..<count {
            let chunk = UnsafeMutableRawBufferPointer(rebasing: data[(i * size)..<((i + 1) * size)])
            let handled = isWrite ? pio.write(port, data: UnsafeRawBufferPointer(chunk)) : pio.read(port, data: chunk)
            if !handled {
                noteUnhandled("port", address: port, size: size, isWrite: isWrite)
            }
        }
    }

    /// Logs an access nobody answers, once per address and direction, at debug level.
    private func noteUnhandled(_ space: String, address: UInt64, size: Int, isWrite: Bool) {
        let key = "\(space) \(isWrite ? "write" : "read") 0x\(String(address, radix: 16))"
        let first = unhandled.withLock { $0.insert(key).inserted }
        if first { logger.debug("unhandled \(key) (size \(size)); reads return all-ones, writes are dropped") }
    }
}

/// The outcome of a run, set once, with an eventfd that wakes the thread waiting in `run()`.
final class Lifecycle: Sendable {
    private let state = Mutex<MachineExit?>(nil)
    /// Set with the outcome: what the vCPU loops check on every exit (one atomic load, no lock).
    private let ended = Atomic<Bool>(false)
    let event: EventFD

    init() {
        // An eventfd can only fail when the process is out of descriptors, before any VM exists.
        event = try! EventFD()
    }

    var outcome: MachineExit? { state.withLock { $0 } }

    /// Whether an outcome is recorded.
    var hasEnded: Bool { ended.load(ordering: .acquiring) }

    /// Records the first outcome; later ones are ignored.
    func finish(_ exit: MachineExit) {
        let first = state.withLock { s -> Bool in
            guard s == nil else { return false }
            s = exit
            return true
        }
        if first {
            ended.store(true, ordering: .releasing)
            event.signal()
        }
    }
}

/// A firmware image in a read-only anonymous mapping.
final class ROM: @unchecked Sendable {
    let mapping: MemoryMapping
    init(_ bytes: [UInt8]) throws(SysError) {
        mapping = try MemoryMapping.anonymous(size: bytes.count)
        bytes.withUnsafeBytes { mapping.base.copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
    }
}

/// A value behind a mutex that closures can share (a `Mutex` itself cannot be captured).
final class Locked<Value: Sendable>: Sendable {
    private let mutex: Mutex<Value>
    init(_ value: Value) { mutex = Mutex(value) }
    func withLock<R>(_ body: (inout Value) -> R) -> R { mutex.withLock { body(&$0) } }
}

/// `ms` with three decimals.
func formatMilliseconds(_ ms: Double) -> String {
    let micro = Int((ms * 1000).rounded())
    let frac = String(micro % 1000)
    return "\(micro / 1000)." + String(repeating: "0", count: 3 - frac.count) + frac
}

/// A GSI on the in-kernel irqchip.
struct KVMInterruptLine: InterruptLine {
    let vm: VirtualMachine
    let gsi: UInt32
    let logger: Logger

    func setLevel(_ high: Bool) {
        do { try vm.setIRQLine(gsi, level: high) } catch {
            logger.error("cannot set interrupt line \(gsi): \(error)")
        }
    }
}
