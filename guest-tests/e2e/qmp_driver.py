"""A GuestRun driver (see guestrun.GuestRun.driver): runs VMM-COMMAND as a swiftvmm-kit VM (its QMP
socket is the kit's; the real QEMU QMP client library, qemu.qmp, underneath), passes the VMM's console
through in whole lines, and talks to it while the guest runs. What it does is chosen by the guest: a console line `swiftvmm-qmp: ACTION` asks for one
action, and the driver prints its results as `driver: KEY=VALUE` lines for the tests to read.

Actions:
  query-guid      query-vm-generation-id → driver: guid=...
  change-guid     set-vm-generation-id {"guid": "auto"} → driver: new-guid=...
  query-ack       query-vm-generation-id → driver: ack={"pending": ..., "acknowledged": ..., ...} (the reply
                  without its guid, as JSON; printed after every event received so far)
  powerdown       system_powerdown
  stop-cont       stop, 1 s paused (query-status → driver: status-while-stopped=...), cont
Every event: driver: event NAME {DATA as JSON} (printed before each action's results and at the end).
At the end: driver: events=NAME,NAME,... (every event received, in order) and the VMM's exit status.
"""

import json
import re
import sys
import time

from guestrun import vm_from_command
from swiftvmm_kit import ExpectTimeout, KitError, VMExited

ACTION = re.compile(r"^swiftvmm-qmp: (\S+)$", re.M)


def main(cmd: list[str]) -> int:
    vm = vm_from_command(cmd, name="vm", echo=sys.stdout)
    printed = 0

    def events() -> None:
        nonlocal printed
        new = vm.events.all[printed:]
        printed += len(new)
        for ev in new:
            print(f"driver: event {ev['event']} {json.dumps(ev['data'], sort_keys=True)}", flush=True)

    def query_ack() -> None:
        r = vm.generation_id_state()
        time.sleep(0.1)  # an event sent before the reply has been printed by then
        events()
        ack = {k: v for k, v in r.items() if k != "guid"}
        print(f"driver: ack={json.dumps(ack, sort_keys=True)}", flush=True)

    def stop_cont() -> None:
        vm.pause()
        time.sleep(1.0)
        st = vm.qmp("query-status")
        print(f"driver: status-while-stopped={st['status']},running={st['running']}", flush=True)
        vm.resume()
        print(f"driver: status-after-cont={vm.status}", flush=True)

    actions = {
        "query-guid": lambda: print(f"driver: guid={vm.generation_id}", flush=True),
        "change-guid": lambda: print(f"driver: new-guid={vm.set_generation_id('auto')}", flush=True),
        "query-ack": query_ack,
        "powerdown": lambda: (vm.qmp("system_powerdown"), print("driver: powerdown-sent", flush=True)),
        "stop-cont": stop_cont,
    }
    try:
        vm.start()
        while True:
            try:
                action = vm.console.expect(ACTION, timeout=3600).group(1)
            except (VMExited, ExpectTimeout):
                break
            events()
            try:
                actions.get(action, lambda: print(f"driver: error=unknown action {action}", flush=True))()
            except KitError as e:  # reported to the test
                print(f"driver: error={type(e).__name__}: {str(e).splitlines()[0]}", flush=True)
        status = vm.wait(60)
        time.sleep(0.2)  # the last events
    except KitError as e:
        print(f"driver: error={type(e).__name__}: {str(e).splitlines()[0]}", flush=True)
        status = vm.exit_status() if vm.exit_status() is not None else 1
    finally:
        vm.close()
    events()
    print(f"driver: events={','.join(vm.events.names())}", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
