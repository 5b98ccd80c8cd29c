// swift-tools-version: 6.0
import PackageDescription

// Our own targets build with warnings as errors; dependencies do not.
let strict: [SwiftSetting] = [.unsafeFlags(["-warnings-as-errors"])]

let package = Package(
    name: "SwiftVMM",
    products: [
        .executable(name: "swiftvmm", targets: ["swiftvmm"]),
        // The fuzz entry points (Sources/FuzzEntries), for the libFuzzer targets of the separate Fuzz/
        // package: its only import.
        .library(name: "SwiftVMMFuzzEntries", targets: ["FuzzEntries"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.6.0"),
    ],
    targets: [
        // Level 0: C shims.
        .target(name: "CKVM", cSettings: [.unsafeFlags(["-Wall", "-Werror"])]),
        .target(name: "CLinux", cSettings: [.define("_GNU_SOURCE"), .unsafeFlags(["-Wall", "-Werror"])]),
        // Explicit little-endian encoding (snapshots, device and vCPU state); pure Swift.
        .target(name: "WireFormat", swiftSettings: strict),
        // Device trees as values (the devices' nodes, the machine's tree) resolved into names and
        // bytes; pure Swift, no libfdt.
        .target(name: "DeviceTree", swiftSettings: strict),
        // libfdt, linked statically (Debian's libfdt-dev), to write and read flattened device trees.
        // The archive is named, not -lfdt, which would pick libfdt.so (a run-time dependency).
        .target(name: "CFDT", cSettings: [.unsafeFlags(["-Wall", "-Werror"])],
                linkerSettings: [.unsafeFlags(["-Xlinker", "-l:libfdt.a"])]),
        // Level 1: system calls and owners of host resources.
        .target(name: "VMMSys", dependencies: ["CLinux"], swiftSettings: strict),
        // The snapshot container: state.bin (header, section table, payloads) and memory.bin, with
        // CRC32C checksums, validation on load and durable writing (docs/snapshot-format.md).
        .target(name: "Snapshot", dependencies: ["WireFormat", "VMMSys", "CLinux"], swiftSettings: strict),
        // Level 2: KVM API, guest memory and buses.
        .target(name: "KVM", dependencies: ["CKVM", "VMMSys", "WireFormat"], swiftSettings: strict),
        .target(name: "VMMCore", dependencies: ["VMMSys", "WireFormat"], swiftSettings: strict),
        // Level 3: boot protocol and device models (pure: no fds, no threads).
        .target(name: "BootLoader", dependencies: ["VMMCore"], swiftSettings: strict),
        .target(name: "Devices", dependencies: ["VMMCore", "WireFormat", "ACPI", "DeviceTree"], swiftSettings: strict),
        // virtio-mmio: the transport, split virtqueues and the device models (pure: their host I/O comes
        // through protocols; the machine's threads serve the queues).
        .target(name: "Virtio", dependencies: ["VMMCore", "VMMSys", "WireFormat", "ACPI", "Devices", "DeviceTree"], swiftSettings: strict),
        // ACPI tables and the AML encoder (pure byte builders, no dependencies).
        .target(name: "ACPI", swiftSettings: strict),
        // The QMP monitor: JSON, protocol, fd sets and the socket server (talks to the machine
        // through a protocol, so it does not depend on it).
        .target(name: "QMP", dependencies: ["VMMSys", "CLinux"], swiftSettings: strict),
        // libtpms, linked statically (Debian's libtpms-dev), for the in-process TPM backend.
        // The archives are named, not -ltpms: a plain -l would pick libtpms.so and tie swiftvmm to
        // the host's libtpms0 at run time.
        .target(name: "CLibtpms", cSettings: [.unsafeFlags(["-Wall", "-Werror"])],
                linkerSettings: [.unsafeFlags(["-Xlinker", "-l:libtpms.a", "-Xlinker", "-l:libcrypto.a"]),
                                 .linkedLibrary("dl"), .linkedLibrary("pthread")]),
        // libseccomp, linked statically (Debian's libseccomp-dev), and the SIGSYS handler.
        .target(name: "CSeccomp", cSettings: [.unsafeFlags(["-Wall", "-Werror"])],
                linkerSettings: [.unsafeFlags(["-Xlinker", "-l:libseccomp.a"])]),
        // The threads' seccomp filters: the lists (SeccompPolicy) and their loading.
        .target(name: "Sandbox", dependencies: ["CSeccomp", "VMMSys"], swiftSettings: strict),
        // Level 4: host-side backends of devices (the TPM worker thread, libtpms, swtpm).
        .target(name: "Backends",
                dependencies: ["VMMSys", "Devices", "Virtio", "CLibtpms", "CLinux", "WireFormat", "Snapshot", .product(name: "Logging", package: "swift-log")],
                swiftSettings: strict),
        // Level 5: the x86 machine.
        .target(
            name: "Machine",
            dependencies: ["KVM", "VMMCore", "BootLoader", "Devices", "Virtio", "ACPI", "VMMSys", "Snapshot", "WireFormat",
                           "DeviceTree", "CFDT", .product(name: "Logging", package: "swift-log")],
            swiftSettings: strict),
        // Level 6: the control plane (QMP commands on a machine).
        .target(name: "Control", dependencies: ["Machine", "QMP", "Devices", "Virtio"], swiftSettings: strict),
        // Level 7: the launcher: validated run/restore configurations and the commands' work, each
        // returning the exit status (no argument parsing, no exit()).
        .target(
            name: "Launcher",
            dependencies: ["Machine", "Control", "QMP", "Devices", "Virtio", "BootLoader", "ACPI", "VMMSys", "Snapshot", "Backends", "Sandbox",
                           .product(name: "Logging", package: "swift-log")],
            swiftSettings: strict),
        // Level 8: the executable: ArgumentParser commands mapped to the launcher's configurations, and main.
        .executableTarget(
            name: "swiftvmm",
            dependencies: ["Launcher", "Machine", "VMMSys", "Sandbox",
                           .product(name: "ArgumentParser", package: "swift-argument-parser"),
                           .product(name: "Logging", package: "swift-log")],
            swiftSettings: strict),
        // The logic of the libFuzzer targets in Fuzz/ (public API of the modules under test, plus a few
        // `package` constants); used by the fuzz package and the tests only.
        .target(name: "FuzzEntries", dependencies: ["BootLoader", "Devices", "Virtio", "VMMCore", "WireFormat", "Snapshot", "KVM", "QMP", "Backends", "VMMSys", "Control", "Machine"],
                swiftSettings: strict),
        // Test support: fakes and harnesses, used by test targets only.
        .target(name: "TestSupport", dependencies: ["VMMCore", "Devices", "VMMSys", "WireFormat", "Virtio", "CLinux"], swiftSettings: strict),
        .testTarget(name: "WireFormatTests", dependencies: ["WireFormat", "TestSupport"], swiftSettings: strict),
        .testTarget(name: "VMMSysTests", dependencies: ["VMMSys"], swiftSettings: strict),
        .testTarget(name: "SandboxTests", dependencies: ["Sandbox", "VMMSys", "CSeccomp"], swiftSettings: strict),
        .testTarget(name: "SnapshotTests", dependencies: ["Snapshot", "WireFormat", "CLinux", "VMMSys"], swiftSettings: strict),
        .testTarget(name: "VMMCoreTests", dependencies: ["VMMCore", "TestSupport"], swiftSettings: strict),
        .testTarget(name: "BootLoaderTests", dependencies: ["BootLoader", "VMMCore", "TestSupport"], swiftSettings: strict),
        .testTarget(name: "ACPITests", dependencies: ["ACPI", "Devices", "TestSupport"], swiftSettings: strict),
        .testTarget(name: "VirtioTests", dependencies: ["Virtio", "Devices", "VMMCore", "TestSupport", "WireFormat", "FuzzEntries"], swiftSettings: strict),
        .testTarget(name: "DevicesTests", dependencies: ["Devices", "DeviceTree", "TestSupport", "WireFormat", "FuzzEntries"], swiftSettings: strict),
        .testTarget(name: "FuzzEntriesTests", dependencies: ["FuzzEntries", "TestSupport"], swiftSettings: strict),
        .testTarget(name: "BackendsTests", dependencies: ["Backends", "Devices", "VMMSys", "TestSupport", "Snapshot", "Machine", "Control", "QMP", "Sandbox"], swiftSettings: strict),
        .testTarget(name: "QMPTests", dependencies: ["QMP", "VMMSys", "TestSupport"], swiftSettings: strict),
        .testTarget(name: "CLITests", dependencies: ["swiftvmm", "Launcher", "Machine", "TestSupport", "Snapshot", "VMMSys"], swiftSettings: strict),
        .testTarget(name: "ControlTests", dependencies: ["Control", "QMP", "Machine", "Devices", "VMMCore", "VMMSys", "CLinux", "TestSupport"], swiftSettings: strict),
        .testTarget(name: "KVMTests", dependencies: ["Machine", "KVM", "VMMCore", "Devices", "Virtio", "Control", "ACPI", "DeviceTree", "BootLoader", "TestSupport", "Snapshot", "VMMSys", "Backends"], swiftSettings: strict),
    ]
)
