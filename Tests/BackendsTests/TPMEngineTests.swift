import Testing
@testable import Backends

@Suite struct TPMBackendErrorTests {
    @Test func describesItselfAsItsMessage() {
        #expect("\(TPMBackendError("swtpm at /x: gone"))" == "swtpm at /x: gone")
    }
}
