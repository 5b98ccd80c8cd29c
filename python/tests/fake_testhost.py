#!/usr/bin/env python3
"""A stand-in for guest-tests/testhost.sh in the plugin's tests: records its arguments in
$FAKE_TESTHOST_LOG, then runs COMMAND here with a clean environment plus the --env values (as the
real one does inside the nested test host), and exits with its status."""

import json
import os
import subprocess
import sys

args = sys.argv[1:]
with open(os.environ["FAKE_TESTHOST_LOG"], "a") as f:
    f.write(json.dumps(args) + "\n")
# FAKE_TESTHOST_FAIL_ONCE=FILE: the first session (the first FAKE_TESTHOST_FAILURES sessions, default
# 1; FILE counts them) fails as testhost.sh says when the test host itself failed (status 125), with
# the words in FAKE_TESTHOST_FAILURE (default "its kernel locked up (soft lockup)"), followed by its
# diagnostics.
# FAKE_TESTHOST_FAIL_AFTER_RUN=1: such a session runs COMMAND first (which may end early, as when the
# test host's kernel fails mid-test), and fails after it.
env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root")}
i = 0
while args[i] != "--":
    if args[i] == "--env":
        name, _, value = args[i + 1].partition("=")
        env[name] = value
    i += 2 if args[i] in ("--env", "--rw", "--timeout", "--mem", "--cpus") else 1
# The fake swiftvmm's knobs stay (the test says what KVM the "test host" has).
for name in ("FAKE_KVM_INSIDE",):
    if name in os.environ:
        env["FAKE_KVM"] = os.environ[name]
once = os.environ.get("FAKE_TESTHOST_FAIL_ONCE")
failed = os.path.getsize(once) if once and os.path.exists(once) else 0
if once and failed < int(os.environ.get("FAKE_TESTHOST_FAILURES", "1")):
    with open(once, "a") as f:
        f.write("x")
    if os.environ.get("FAKE_TESTHOST_FAIL_AFTER_RUN") == "1":
        subprocess.run(args[i + 1:], env=env)
    what = os.environ.get("FAKE_TESTHOST_FAILURE", "its kernel locked up (soft lockup)")
    # The inner pytest's progress dot, not ended by a newline when the test host fails (as in CI).
    print(".", end="", flush=True)
    print(f"testhost: TEST HOST FAILED: {what} after 61.0s; session ended", file=sys.stderr, flush=True)
    for n in range(300):
        print(f"testhost-l1: diagnostics line {n}", file=sys.stderr)
    sys.exit(125)
sys.exit(subprocess.run(args[i + 1:], env=env).returncode)
