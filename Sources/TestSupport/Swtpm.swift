import CLinux
import Glibc
import VMMSys

/// Why a swtpm could not be started for a test.
public struct SwtpmStartError: Error, CustomStringConvertible {
    public let description: String
}

/// A real `swtpm socket --tpm2` child process with its state directory and control socket in a
/// fresh temporary directory. `stop()` (and deinit) kills and reaps it and removes the directory.
public final class SwtpmProcess {
    public let directory: String
    public let socketPath: String
    public let pid: pid_t
    /// The wait status once reaped.
    public private(set) var waitStatus: Int32?
    private var removed = false

    /// Starts swtpm and waits (up to 10 s) until its control socket accepts connections. Fails
    /// with a message saying to install swtpm when it is not in PATH: these tests must not pass
    /// silently without it.
    public init() throws {
        guard commandExists("swtpm") else {
            throw SwtpmStartError(description: "swtpm is not installed: install it (Debian: apt-get install swtpm) to run the swtpm backend tests")
        }
        directory = makeTemporaryDirectory("swtpm-test")
        socketPath = directory + "/ctrl.sock"
        mkdir(directory + "/state", 0o700)
        let argv = ["swtpm", "socket", "--tpm2", "--tpmstate", "dir=\(directory)/state",
                    "--ctrl", "type=unixio,path=\(socketPath)", "--log", "file=\(directory)/swtpm.log"]
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, directory + "/stdout.log", O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        posix_spawn_file_actions_adddup2(&actions, 1, 2)
        // Nothing else of the test process: descriptors another test left inheritable (a state
        // file, and with it its lock) would otherwise live on in swtpm.
        clinux_spawn_addclosefrom(&actions, 3)
        // Signals as from a shell (the test runner blocks some).
        var attributes = shellLikeSpawnAttributes()
        let args = argv.map { strdup($0) } + [nil]
        var child: pid_t = 0
        let rc = posix_spawnp(&child, "swtpm", &actions, &attributes, args, environ)
        for p in args { free(p) }
        posix_spawn_file_actions_destroy(&actions)
        posix_spawnattr_destroy(&attributes)
        guard rc == 0 else {
            _ = runProcess(["rm", "-rf", directory])
            throw SwtpmStartError(description: "cannot start swtpm: posix_spawn: \(String(cString: strerror(rc)))")
        }
        pid = child
        let deadline = monotonicMilliseconds() + 10_000
        while true {
            if (try? UnixStream.connect(to: socketPath)) != nil { break }
            if let status = reap(waiting: false) {
                let log = self.log
                stop()
                throw SwtpmStartError(description: "swtpm exited at start (wait status \(status)): \(log)")
            }
            if monotonicMilliseconds() > deadline {
                stop()
                throw SwtpmStartError(description: "swtpm's control socket \(socketPath) did not accept connections within 10 s")
            }
            usleep(10_000)
        }
    }

    deinit { stop() }

    /// swtpm's log and output.
    public var log: String {
        ["swtpm.log", "stdout.log"].map { name in
            (try? OwnedFD.open(directory + "/" + name, flags: O_RDONLY).readAll(limit: 1 << 20)).map { String(decoding: $0, as: UTF8.self) } ?? ""
        }.joined()
    }

    public func signal(_ number: Int32) {
        if waitStatus == nil { kill(pid, number) }
    }

    /// Reaps swtpm if it has exited (or, `waiting`, once it exits); its wait status.
    @discardableResult
    public func reap(waiting: Bool) -> Int32? {
        if let waitStatus { return waitStatus }
        var status: Int32 = 0
        var rc: pid_t
        repeat { rc = waitpid(pid, &status, waiting ? 0 : WNOHANG) } while rc < 0 && errno == EINTR
        if rc == pid { waitStatus = status }
        return waitStatus
    }

    /// Waits up to `milliseconds` for swtpm to exit on its own; its wait status, nil if it did not.
    public func waitForExit(milliseconds: Int64) -> Int32? {
        let deadline = monotonicMilliseconds() + milliseconds
        while monotonicMilliseconds() < deadline {
            if let status = reap(waiting: false) { return status }
            usleep(10_000)
        }
        return reap(waiting: false)
    }

    /// Kills and reaps swtpm and removes the directory. Idempotent.
    public func stop() {
        if waitStatus == nil {
            kill(pid, SIGKILL)
            reap(waiting: true)
        }
        if !removed {
            removed = true
            _ = runProcess(["rm", "-rf", directory])
        }
    }
}

/// True when wait status `status` is a normal exit with code 0.
public func exitedCleanly(_ status: Int32) -> Bool { status & 0x7F == 0 && (status >> 8) & 0xFF == 0 }

