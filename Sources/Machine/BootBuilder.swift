import ACPI
import BootLoader
import Devices
import KVM
import Logging
import VMMCore

/// Loads a boot source into a machine fresh from `Machine.init(building:)`: the ACPI tables (run
/// on the host for a direct boot; firmware runs the loader itself), the boot MSRs, FPU and local
/// APIC of every vCPU, then the kernel, initrd and command line (or the firmware image and fw_cfg's
/// boot items) and the boot vCPU's entry state. The running machine (`Machine`) knows nothing of it.
struct BootBuilder {
    let machine: Machine

    func load(_ boot: BootSource) throws(MachineError) {
        var firmwareBoot = false
        if case .firmware = boot { firmwareBoot = true }
        if !firmwareBoot { try loadTables() } // the firmware runs etc/table-loader itself
        do {
            for vcpu in machine.vcpus {
                try vcpu.setMSRs(VCPUSetup.bootMSRs)
                try VCPUSetup.setFPU(vcpu)
                try VCPUSetup.setLocalAPIC(vcpu)
            }
        } catch { throw .kvm(error) }
        try loadBoot(boot)
    }

    /// Runs the ACPI table-loader script on the host: the tables (and the vmgenid page) go into
    /// guest memory exactly where firmware would put them, and the loader's WRITE_POINTERs land in
    /// the writable fw_cfg files.
    private func loadTables() throws(MachineError) {
        guard let (blob, guidBlob) = machine.publishedTables else { return }
        let fwCfg = machine.fwCfg
        do {
            machine.acpiTables = try PlatformTables.load(blob, memory: machine.memory, extraFiles: [VMGenIDTable.guidFile: guidBlob,
                                                                                     VMGenIDTable.addressFile: [UInt8](repeating: 0, count: 8)]) { file, offset, bytes in
                try fwCfg.writeFile(file, offset: offset, bytes)
            }
        } catch { throw .acpi(error) }
    }

    private func loadBoot(_ boot: BootSource) throws(MachineError) {
        do {
            // GDT and identity-mapped page tables: the same long-mode start for every boot source.
            for (i, d) in X86Setup.bootGDT.enumerated() { try machine.memory.write(d, at: GuestAddress(Layout.gdt + UInt64(i) * 8)) }
            try machine.memory.write(X86Setup.identityPageTables(base: Layout.pageTables, gigabytes: Layout.identityMappedGiB),
                             at: GuestAddress(Layout.pageTables))
        } catch { throw .memory(error) }

        let entry: UInt64
        let rsi: UInt64
        switch boot {
        case .program64(let code, let address):
            do { try machine.memory.write(code, at: GuestAddress(address)) } catch { throw .memory(error) }
            entry = address
            rsi = 0
        case .firmware(let rom, let image, let initrd, let commandLine):
            try loadFirmware(rom: rom, image: image, initrd: initrd, commandLine: commandLine)
            return
        case .linux(let image, let initrd, let commandLine):
            let plan = try Machine.linuxBootPlan(image: image, commandLine: commandLine, initrdSize: initrd.map { UInt64($0.count) },
                                                 memorySize: machine.config.memorySize)
            var params = BootParams(image: image)
            params.setCommandLine(address: plan.commandLineAddress)
            if let initrd, let at = plan.initrdAddress {
                params.setInitrd(address: at, size: UInt64(initrd.count))
            }
            params.setE820(Machine.e820Map(memory: machine.memory))
            if let acpiTables = machine.acpiTables { params.setACPIRSDP(address: acpiTables.rsdpAddress) }
            var setupData: [UInt8] = []
            if machine.config.deviceTree {
                let boot = PlatformDeviceTree.Boot(commandLine: commandLine, initrd: plan.initrdRange(size: initrd.map { UInt64($0.count) }))
                let blob: [UInt8]
                do {
                    blob = try PlatformDeviceTree.blob(memorySize: machine.config.memorySize, cpus: machine.config.cpus, boot: boot,
                                                       devices: machine.platform.deviceTreeNodes)
                } catch { throw .invalidConfig("cannot make the device tree: \(error)") }
                do {
                    setupData = try SetupData.chain([SetupDataEntry(type: SetupDataEntry.deviceTree, payload: blob)],
                                                    at: Layout.setupData, limit: Layout.setupDataLimit)
                } catch { throw .boot(error) }
                params.setSetupData(address: Layout.setupData)
            }
            do {
                if !setupData.isEmpty { try machine.memory.write(setupData, at: GuestAddress(Layout.setupData)) }
                try machine.memory.write(image.protectedModeKernel, at: GuestAddress(plan.kernelAddress))
                try machine.memory.write(Array(commandLine.utf8) + [0], at: GuestAddress(plan.commandLineAddress))
                if let initrd, let at = plan.initrdAddress { try machine.memory.write(initrd, at: GuestAddress(at)) }
                try machine.memory.write(params.bytes, at: GuestAddress(plan.bootParamsAddress))
            } catch { throw .memory(error) }
            machine.logger.debug("linux boot plan", metadata: [
                "kernel": "\(plan.kernelAddress)", "decompress": "\(plan.decompressStart)-\(plan.decompressEnd)",
                "initrd": "\(plan.initrdAddress.map { String($0, radix: 16) } ?? "none")",
            ])
            entry = plan.entryPoint
            rsi = plan.bootParamsAddress
        }
        do {
            try VCPUSetup.setLongMode(machine.vcpus[0])
            try VCPUSetup.setEntryRegisters(machine.vcpus[0], rip: entry, rsi: rsi)
        } catch { throw .kvm(error) }
    }

    /// Maps `rom` read-only so that it ends at 4 GiB and hands the kernel, initrd and command line to
    /// it through fw_cfg (QEMU's legacy items). The boot vCPU stays in its reset state: real mode at
    /// 0xFFFFFFF0, the first instruction of the firmware.
    private func loadFirmware(rom: [UInt8], image: BzImage, initrd: [UInt8]?, commandLine: String) throws(MachineError) {
        let commandLineBytes = Array(commandLine.utf8) + [0]
        guard commandLineBytes.count <= Int(image.commandLineSizeMax) + 1 else {
            throw .boot(.commandLineTooLong(length: commandLineBytes.count - 1, max: Int(image.commandLineSizeMax)))
        }
        try machine.mapFirmware(rom)
        let items: [(UInt16, [UInt8])] = [
            (FwCfgKeys.setupSize, le32Bytes(image.setupCode.count)), (FwCfgKeys.setupData, Array(image.setupCode)),
            (FwCfgKeys.kernelSize, le32Bytes(image.protectedModeKernel.count)), (FwCfgKeys.kernelData, Array(image.protectedModeKernel)),
            (FwCfgKeys.initrdSize, le32Bytes(initrd?.count ?? 0)), (FwCfgKeys.initrdData, initrd ?? []),
            (FwCfgKeys.commandLineSize, le32Bytes(commandLineBytes.count)), (FwCfgKeys.commandLineData, commandLineBytes),
        ]
        for (key, data) in items { machine.fwCfg.addItem(key: key, data: data) }
    }
}

extension Machine {
    /// Where a direct boot puts the kernel, its decompression area, boot_params, the command line and
    /// the initrd in a machine of `memorySize` bytes, checked to fit (also for `--dump-dtb`, whose
    /// tree says where the initrd will be).
    public static func linuxBootPlan(image: BzImage, commandLine: String, initrdSize: UInt64?,
                                     memorySize: UInt64) throws(MachineError) -> LinuxBootPlan {
        do {
            return try LinuxLoader.plan(
                image: image, commandLineLength: commandLine.utf8.count, initrdSize: initrdSize,
                lowMemoryEnd: min(memorySize, Layout.mmioHoleStart),
                addresses: LinuxBootAddresses(kernel: Layout.kernel, bootParams: Layout.bootParams,
                                              commandLine: Layout.commandLine, commandLineLimit: Layout.commandLineLimit))
        } catch { throw .boot(error) }
    }
}
