import BootLoader
import Testing
import TestSupport

private func le(_ b: [UInt8], _ o: Int, _ n: Int) -> UInt64 {
    (0..<n).reduce(0) { $0 | UInt64(b[o + $1]) << (8 * $1) }
}

@Suite("boot_params and the load plan")
struct BootParamsTests {
    let image = try! BzImage(syntheticBzImage())
    let addresses = LinuxBootAddresses(kernel: 0x100000, bootParams: 0x7000, commandLine: 0x20000, commandLineLimit: 0x30000)

    @Test("zero page: header copied, loader fields set, sentinel zero")
    func layout() {
        var p = BootParams(image: image)
        p.setCommandLine(address: 0x20000)
        p.setInitrd(address: 0x1_2345_6000, size: 0x1_0000_0010)
        p.setACPIRSDP(address: 0xE0000)
        let b = p.bytes
        #expect(b.count == 4096)
        #expect(le(b, 0x202, 4) == 0x5372_6448)            // header copied to the same offset
        #expect(le(b, 0x206, 2) == 0x020F)
        #expect(b[0x210] == 0xFF)                            // type_of_loader
        #expect(le(b, 0x1FA, 2) == 0xFFFF)                   // vid_mode
        #expect(le(b, 0x228, 4) == 0x20000)                  // cmd_line_ptr
        #expect(le(b, 0x0C8, 4) == 0)                        // ext_cmd_line_ptr
        #expect(le(b, 0x218, 4) == 0x2345_6000)              // ramdisk_image low
        #expect(le(b, 0x0C0, 4) == 0x1)                      // ext_ramdisk_image
        #expect(le(b, 0x21C, 4) == 0x10)                     // ramdisk_size low
        #expect(le(b, 0x0C4, 4) == 0x1)                      // ext_ramdisk_size
        #expect(le(b, 0x070, 8) == 0xE0000)                  // acpi_rsdp_addr
        #expect(b[0x1EF] == 0)                               // sentinel
        #expect(b[0x26C..<0x290].allSatisfy { $0 == 0 })     // nothing past the header
    }

    @Test("e820 entries are packed 20-byte records with a count")
    func e820() {
        var p = BootParams(image: image)
        p.setE820([
            E820Entry(address: 0, size: 0x9FC00, kind: .ram),
            E820Entry(address: 0x9FC00, size: 0x400, kind: .reserved),
            E820Entry(address: 0x100000, size: 0xFF0_0000, kind: .ram),
        ])
        let b = p.bytes
        #expect(b[0x1E8] == 3)
        #expect(le(b, 0x2D0, 8) == 0 && le(b, 0x2D8, 8) == 0x9FC00 && le(b, 0x2E0, 4) == 1)
        #expect(le(b, 0x2E4, 8) == 0x9FC00 && le(b, 0x2EC, 8) == 0x400 && le(b, 0x2F4, 4) == 2)
        #expect(le(b, 0x2F8, 8) == 0x100000 && le(b, 0x300, 8) == 0xFF0_0000 && le(b, 0x308, 4) == 1)
    }

    @Test("more than 128 e820 entries are cut to what the zero page holds")
    func e820Overflow() {
        var p = BootParams(image: image)
        p.setE820((0..<200).map { E820Entry(address: UInt64($0) << 20, size: 4096, kind: .ram) })
        #expect(p.bytes[0x1E8] == 128)
    }

    @Test("plan: entry at +0x200, decompression at pref_address, initrd at the top of low RAM")
    func plan() throws {
        let plan = try LinuxLoader.plan(image: image, commandLineLength: 100, initrdSize: 0x10_0001,
                                        lowMemoryEnd: 256 << 20, addresses: addresses)
        #expect(plan.entryPoint == 0x100200)
        #expect(plan.decompressStart == 0x100_0000)
        #expect(plan.decompressEnd == 0x100_0000 + 0x0200_0000)
        let initrd = try #require(plan.initrdAddress)
        #expect(initrd % 4096 == 0)
        #expect(initrd + 0x10_0001 <= 256 << 20)
        #expect(initrd >= plan.decompressEnd)
        #expect(initrd == ((256 << 20) - 0x10_0001) & ~4095)
    }

    @Test("initrd respects initrd_addr_max when RAM is larger")
    func initrdCeiling() throws {
        let small = try BzImage(syntheticBzImage { $0[0x22C] = 0xFF; $0[0x22D] = 0xFF; $0[0x22E] = 0xFF; $0[0x22F] = 0x0F })
        let plan = try LinuxLoader.plan(image: small, commandLineLength: 0, initrdSize: 4096,
                                        lowMemoryEnd: 0xC000_0000, addresses: addresses)
        #expect(plan.initrdAddress == 0x1000_0000 - 4096)
    }

    @Test("too little memory, too large an initrd, too long a command line: clear errors")
    func refusals() {
        #expect(throws: BootError.memoryTooSmall(needed: 0x300_0000, available: 32 << 20,
                                                 what: "the kernel (4 KiB, init_size 32768 KiB)")) {
            try LinuxLoader.plan(image: image, commandLineLength: 0, initrdSize: nil, lowMemoryEnd: 32 << 20, addresses: addresses)
        }
        #expect(throws: BootError.initrdTooLarge(size: 300 << 20, room: (256 << 20) - 0x300_0000)) {
            try LinuxLoader.plan(image: image, commandLineLength: 0, initrdSize: 300 << 20, lowMemoryEnd: 256 << 20, addresses: addresses)
        }
        #expect(throws: BootError.commandLineTooLong(length: 2049, max: 2048)) {
            try LinuxLoader.plan(image: image, commandLineLength: 2049, initrdSize: nil, lowMemoryEnd: 256 << 20, addresses: addresses)
        }
    }
}

@Suite("x86 long-mode setup")
struct X86SetupTests {
    @Test("identity page tables map 2 MiB pages linearly")
    func pageTables() {
        let base: UInt64 = 0x9000
        let t = X86Setup.identityPageTables(base: base, gigabytes: 4)
        #expect(t.count == 6 * 4096)
        #expect(le(t, 0, 8) == (base + 0x1000) | 0x3)                 // PML4[0] → PDPT
        #expect(le(t, 8, 8) == 0)                                      // PML4[1] empty
        for g in 0..<4 {
            #expect(le(t, 4096 + g * 8, 8) == (base + UInt64(2 + g) * 0x1000) | 0x3)
        }
        #expect(le(t, 4096 + 4 * 8, 8) == 0)                           // nothing past 4 GiB
        #expect(le(t, 2 * 4096, 8) == 0x83)                           // first 2 MiB page
        #expect(le(t, 2 * 4096 + 511 * 8, 8) == (511 << 21) | 0x83)   // last page of GiB 0
        #expect(le(t, 5 * 4096 + 511 * 8, 8) == (0xFFE0_0000 | 0x83)) // last page below 4 GiB
    }

    @Test("GDT descriptors decode to the segments KVM needs")
    func gdt() {
        let code = X86Setup.segment(descriptor: X86Setup.bootGDT[2], selector: 0x10)
        #expect(X86Setup.bootGDT[2] == 0x00AF_9B00_0000_FFFF)
        #expect(code.l == 1 && code.db == 0 && code.type == 0xB && code.present == 1 && code.s == 1)
        #expect(code.limit == 0xFFFF_FFFF && code.g == 1)
        let data = X86Setup.segment(descriptor: X86Setup.bootGDT[3], selector: 0x18)
        #expect(X86Setup.bootGDT[3] == 0x00CF_9300_0000_FFFF)
        #expect(data.l == 0 && data.db == 1 && data.type == 0x3)
        let tss = X86Setup.segment(descriptor: X86Setup.bootGDT[4], selector: 0x20)
        #expect(tss.type == 0xB && tss.s == 0 && tss.present == 1)
    }
}
