// swift-tools-version: 6.0
// libFuzzer targets for the parsers of untrusted input: each calls one entry of the main package's
// FuzzEntries module. Build and run them with Fuzz/run.sh, which
// links `.deps/swiftvmm` to the repository (a path dependency's identity is its directory name).
import PackageDescription

let package = Package(
    name: "SwiftVMMFuzz",
    dependencies: [.package(path: ".deps/swiftvmm")],
    targets: ["fuzz-bzimage", "fuzz-device-state", "fuzz-fwcfg-dma", "fuzz-kvm-state", "fuzz-qmp-commands", "fuzz-qmp-stream", "fuzz-snapshot", "fuzz-table-loader", "fuzz-tpm-state", "fuzz-tpm-tis", "fuzz-virtqueue"].map { name in
        .executableTarget(
            name: name,
            dependencies: [.product(name: "SwiftVMMFuzzEntries", package: "swiftvmm")],
            swiftSettings: [.unsafeFlags(["-parse-as-library"])])
    }
)
