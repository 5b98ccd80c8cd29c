/// The logic of the libFuzzer targets in Fuzz/ (each is a two-line `LLVMFuzzerTestOneInput` that
/// calls one of these), kept in this package so that `swift test` runs them on seeded inputs too.
/// Not part of the VMM: nothing but the fuzz package and the tests depend on this module.
///
/// Each entry takes any bytes and must never trap, except by the `precondition`s that state what it
/// checks (a trap is a bug the fuzzer reports).
public enum Fuzz {}
