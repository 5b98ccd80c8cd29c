import Foundation
import Glibc
import Testing
import TestSupport

/// `dtc -I dtb -O dts` of `file`: the source text, or a recorded issue. dtc is required (CI installs
/// device-tree-compiler): without it the test fails rather than skips.
private func decompile(_ file: String, sourceLocation: SourceLocation = #_sourceLocation) throws -> String {
    try #require(commandExists("dtc"), "dtc is needed: install Debian's device-tree-compiler", sourceLocation: sourceLocation)
    let out = runProcess(["dtc", "-I", "dtb", "-O", "dts", file])
    #expect(out.status == 0, "dtc: \(out.stderr)", sourceLocation: sourceLocation)
    #expect(out.stderr.isEmpty, "dtc warns: \(out.stderr)", sourceLocation: sourceLocation)
    return out.stdout
}

/// The text of node `name` (up to its closing brace at the same indentation) in dtc's output.
private func node(_ name: String, in dts: String) -> String? {
    let lines = dts.split(separator: "\n", omittingEmptySubsequences: false)
    guard let start = lines.firstIndex(where: { $0.trimmingCharacters(in: .whitespaces) == "\(name) {" }) else { return nil }
    let indent = lines[start].prefix { $0 == "\t" }
    guard let end = lines[start...].firstIndex(where: { $0 == indent + "};" }) else { return nil }
    return lines[start...end].joined(separator: "\n")
}

@Suite("swiftvmm run --dump-dtb and --dtb")
struct DumpDTBTests {
    @Test("--dump-dtb writes a tree dtc reads back without warnings: memory, one cpu per vCPU, the devices with their windows and interrupts, bootargs")
    func dump() throws {
        let dir = makeTemporaryDirectory("swiftvmm-dtb")
        defer { _ = runProcess(["rm", "-rf", dir]) }
        let image = dir + "/disk.img"
        try Data(count: 1 << 20).write(to: URL(fileURLWithPath: image))
        let file = dir + "/machine.dtb"
        let r = Invocation(["run", "--dump-dtb", file, "--cpus", "3", "--memory", "512M", "--cmdline", "console=ttyS0 root=/dev/vda",
                            "--tpm", "swtpm,socket=\(dir)/no-such-socket", "--drive", "file=\(image)"])
        #expect(r.status == 0, "stderr: \(r.stderr)")
        #expect(r.stdout.isEmpty)
        #expect(r.stderr.contains("wrote the device tree ("), "\(r.stderr)")
        let dts = try decompile(file)
        #expect(node("memory@0", in: dts)?.contains("reg = <0x00 0x00 0x00 0x20000000>;") == true, "\(dts)")
        let cpus = try #require(node("cpus", in: dts))
        #expect(cpus.components(separatedBy: "device_type = \"cpu\";").count - 1 == 3)
        for i in 0..<3 { #expect(node("cpu@\(i)", in: cpus)?.contains("reg = <0x0\(i)>;") == true, "\(cpus)") }
        #expect(node("chosen", in: dts)?.contains("bootargs = \"console=ttyS0 root=/dev/vda\";") == true)
        #expect(node("chosen", in: dts)?.contains("linux,initrd") == false, "no kernel given: no initrd placed")
        let tpm = try #require(node("tpm@fed40000", in: dts))
        #expect(tpm.contains("compatible = \"tcg,tpm-tis-mmio\";") && tpm.contains("reg = <0x00 0xfed40000 0x00 0x5000>;"))
        // The drive, then the default virtio-rng: windows and GSIs n of the layout.
        let blk = try #require(node("virtio@feb00000", in: dts))
        #expect(blk.contains("compatible = \"virtio,mmio\";") && blk.contains("reg = <0x00 0xfeb00000 0x00 0x200>;"))
        #expect(blk.contains("interrupts = <0x10 0x00>;"))
        #expect(node("virtio@feb00200", in: dts)?.contains("interrupts = <0x11 0x00>;") == true)
        #expect(node("virtio@feb00400", in: dts) == nil)
        let serial = try #require(node("serial@i3f8", in: dts))
        #expect(serial.contains("compatible = \"ns16550a\";") && serial.contains("reg = <0x01 0x3f8 0x08>;") && serial.contains("interrupts = <0x04 0x00>;"))
        #expect(node("fw-cfg@fef00000", in: dts)?.contains("qemu,fw-cfg-mmio") == true)
        #expect(node("interrupt-controller@fec00000", in: dts)?.contains("intel,ce4100-ioapic") == true)
    }

    @Test("without --tpm there is no TPM node, with --no-rng no virtio node; the same options write the same bytes")
    func exactlyTheDevices() throws {
        let dir = makeTemporaryDirectory("swiftvmm-dtb")
        defer { _ = runProcess(["rm", "-rf", dir]) }
        let r = Invocation(["run", "--dump-dtb", dir + "/a.dtb", "--no-rng"])
        try #require(r.status == 0, "stderr: \(r.stderr)")
        let dts = try decompile(dir + "/a.dtb")
        #expect(!dts.contains("tpm@") && !dts.contains("virtio@"), "\(dts)")
        #expect(Invocation(["run", "--dump-dtb", dir + "/b.dtb", "--no-rng"]).status == 0)
        #expect(FileManager.default.contents(atPath: dir + "/a.dtb") == FileManager.default.contents(atPath: dir + "/b.dtb"))
    }

    @Test("with --kernel and --initrd the tree says where the boot puts the initrd; nothing boots")
    func initrd() throws {
        let dir = makeTemporaryDirectory("swiftvmm-dtb")
        defer { _ = runProcess(["rm", "-rf", dir]) }
        let kernel = dir + "/bzImage", initrd = dir + "/initrd.img"
        try Data(syntheticBzImage()).write(to: URL(fileURLWithPath: kernel))
        try Data(count: 0x12345).write(to: URL(fileURLWithPath: initrd))
        // No KVM device is needed: the dump does not build a VM.
        let r = Invocation(["run", "--dump-dtb", dir + "/k.dtb", "--kernel", kernel, "--initrd", initrd, "--memory", "128M",
                            "--kvm-device", "/nonexistent/kvm"])
        #expect(r.status == 0, "stderr: \(r.stderr)")
        let chosen = try #require(node("chosen", in: try decompile(dir + "/k.dtb")))
        // The initrd goes to the top of low RAM, page-aligned down (LinuxLoader.plan).
        let start: UInt64 = ((128 << 20) - 0x12345) & ~4095
        #expect(chosen.contains("linux,initrd-start = <0x00 0x\(String(start, radix: 16))>;"), "\(chosen)")
        #expect(chosen.contains("linux,initrd-end = <0x00 0x\(String(start + 0x12345, radix: 16))>;"), "\(chosen)")
    }

    @Test("the file is replaced whole; an unwritable path or a directory is a one-line error and leaves nothing behind")
    func writing() throws {
        let dir = makeTemporaryDirectory("swiftvmm-dtb")
        defer { _ = runProcess(["rm", "-rf", dir]) }
        let file = dir + "/m.dtb"
        try Data("old".utf8).write(to: URL(fileURLWithPath: file))
        #expect(Invocation(["run", "--dump-dtb", file]).status == 0)
        let bytes = try #require(FileManager.default.contents(atPath: file))
        #expect(bytes.prefix(4) == Data([0xD0, 0x0D, 0xFE, 0xED]))
        for bad in ["/nonexistent-dir/m.dtb", dir] {
            let r = Invocation(["run", "--dump-dtb", bad])
            #expect(r.status == 1)
            #expect(r.stderr.hasPrefix("swiftvmm: error: cannot write the device tree to \(bad): "), "\(r.stderr)")
            #expect(r.stderr.split(separator: "\n").count == 1, "\(r.stderr)")
        }
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir) == ["m.dtb"], "no temporary file left")
    }

    @Test("--dtb and --dump-dtb with --firmware, --dump-dtb with --initrd alone, or an empty name: one-line usage errors")
    func usage() {
        for (args, needle) in [
            (["run", "--kernel", "/nonexistent/bzImage", "--dtb", "--firmware", "builtin"], "--dtb and --dump-dtb describe a direct boot"),
            (["run", "--dump-dtb", "/tmp/x.dtb", "--firmware", "builtin"], "--dtb and --dump-dtb describe a direct boot"),
            (["run", "--dump-dtb", "/tmp/x.dtb", "--initrd", "/etc/hostname"], "--dump-dtb with --initrd needs --kernel"),
            (["run", "--dump-dtb", ""], "--dump-dtb needs a file name"),
        ] {
            let r = Invocation(args)
            #expect(r.status == 1, "\(args): \(r.stderr)")
            #expect(r.stderr.contains(needle) && r.stderr.split(separator: "\n").count == 1, "\(args): \(r.stderr)")
        }
    }

    @Test("the help text documents both options")
    func help() {
        let r = Invocation(["run", "--help"])
        #expect(r.status == 0)
        #expect(r.stdout.contains("--dump-dtb <FILE>") && r.stdout.contains("--dtb"), "\(r.stdout)")
        #expect(r.stdout.contains("setup_data"))
    }
}
