#!/usr/bin/env python3
"""One live migration of the test guest driven directly over QMP, with no Tern
in the way: the baseline of benches/qemu_migration.rs.

It mirrors what Tern's QEMU backend (src/hypervisor/qemu.rs) does: the same
QEMU command line (`arguments()`), the same capabilities and parameters on
both ends (`configure_migration()`), the same 100 ms `query-migrate` poll.

    python3 benches/qmp-migrate.py --kernel tern-guest.elf --memory-mib 512 \\
        --ws-mib 64 --accel kvm --max-bandwidth 1073741824 \\
        --downtime-limit 300 --auto-converge 1 --multifd-channels 0 --dir /tmp/x

1. Untimed: starts the source QEMU running the guest and waits until the
   guest says "ready" on its serial port (every page of its RAM holds
   data). With --warm-up 1 it lets the guest run --settle-ms and migrates it
   once, the same way as step 2, so that the timed migration starts from a
   guest that arrived by migration (as Tern's do after their first); with
   --stop-ms N that guest is then stopped (SIGSTOP) for N ms, like a guest
   paused meanwhile. With --go-on-stdin it then prints {"ready": true} and
   waits for a line "go" (the warm-up's source exits after that). Then it
   lets the guest run --settle-ms.
2. Timed from here: starts the destination QEMU with `-incoming defer -S`,
   sets the capabilities and parameters on both, `migrate-incoming` on port 0
   of 127.0.0.1 (the port comes from `query-migrate`), `migrate` on the
   source, polls the source's `query-migrate` until `completed`, waits for
   the destination's `query-migrate` to say `completed`, `cont` on the
   destination, `quit` on the source and waits for that process to exit.
   Timed until here.
3. Prints one JSON line: wall_ms (step 2), QEMU's total_time_ms, downtime_ms
   and setup_time_ms, bytes_transferred, dirty_sync_count, and steps_ms
   (where the wall time went).

Every QEMU it started is killed when it exits, on an error or on SIGINT,
SIGTERM or SIGHUP. QEMU stays in this script's process group, so killing the
group also takes them. Python 3 standard library only.
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time

VM = "direct"


class QmpError(Exception):
    pass


class Qmp:
    """A minimal synchronous QMP client on a unix socket."""

    def __init__(self, path, timeout):
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError) as e:
                sock.close()
                if time.monotonic() > deadline:
                    raise QmpError(f"QMP socket {path} not ready within {timeout} s: {e}")
                time.sleep(0.005)
        sock.settimeout(timeout)
        self.sock = sock
        self.reader = sock.makefile("rb")
        greeting = self._read()
        if "QMP" not in greeting:
            raise QmpError(f"not a QMP greeting: {greeting}")
        self.execute("qmp_capabilities")

    def _read(self):
        line = self.reader.readline()
        if not line:
            raise QmpError("QMP connection closed")
        return json.loads(line)

    def execute(self, command, arguments=None):
        message = {"execute": command}
        if arguments is not None:
            message["arguments"] = arguments
        self.sock.sendall(json.dumps(message).encode() + b"\n")
        while True:
            reply = self._read()
            if "event" in reply:
                continue
            if "error" in reply:
                raise QmpError(f"{command}: {reply['error'].get('desc', reply['error'])}")
            if "return" in reply:
                return reply["return"]

    def close(self):
        try:
            self.reader.close()
            self.sock.close()
        except OSError:
            pass


class Qemu:
    """One qemu-system-x86_64 process with its files in `dir`, started with
    the command line Tern's `QemuHypervisor::arguments()` builds."""

    def __init__(self, args, dir, role, incoming):
        self.args = args
        self.role = role
        self.qmp_path = os.path.join(dir, f"{role}.qmp")
        self.serial = os.path.join(dir, f"{role}.serial")
        self.log = os.path.join(dir, f"{role}.log")
        for path in (self.qmp_path, self.serial):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        command = [
            args.qemu,
            "-name", f"guest={VM}",
            "-machine", f"{args.machine},accel={args.accel}",
            "-m", str(args.memory_mib),
            "-smp", str(max(args.vcpus, 1)),
            "-nodefaults",
            "-no-user-config",
            "-display", "none",
            # As Tern runs every QEMU (src/hypervisor/qemu/mod.rs, sandbox).
            "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            "-pidfile", os.path.join(dir, f"{role}.pid"),
            "-serial", f"file:{self.serial}",
            "-kernel", args.kernel,
            "-append", f"ws={args.ws_mib}",
        ]
        if incoming:
            command += ["-incoming", "defer", "-S"]
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        self.qmp = None

    def connect(self):
        try:
            self.qmp = Qmp(self.qmp_path, timeout=15)
        except QmpError as e:
            self.check_alive()
            raise e
        return self.qmp

    def check_alive(self):
        code = self.process.poll()
        if code is not None:
            with open(self.log, "rb") as f:
                tail = f.read().decode(errors="replace").strip().splitlines()[-3:]
            raise QmpError(f"{self.role} QEMU exited ({code}): {' / '.join(tail)}")

    def wait_exit(self, timeout):
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self):
        if self.qmp is not None:
            self.qmp.close()
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def configure(qmp, args):
    """Tern's `configure_migration()`: the same on both ends."""
    qmp.execute(
        "migrate-set-capabilities",
        {
            "capabilities": [
                {"capability": "auto-converge", "state": args.auto_converge},
                {"capability": "multifd", "state": args.multifd_channels > 0},
                {"capability": "events", "state": True},
            ]
        },
    )
    parameters = {"max-bandwidth": args.max_bandwidth, "downtime-limit": args.downtime_limit}
    if args.multifd_channels > 0:
        parameters["multifd-channels"] = args.multifd_channels
    qmp.execute("migrate-set-parameters", parameters)


def wait_ready(qemu, timeout):
    """Until the guest printed "ready" on its serial port."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(qemu.serial, "rb") as f:
                if b"ready" in f.read():
                    return
        except FileNotFoundError:
            pass
        qemu.check_alive()
        if time.monotonic() > deadline:
            raise QmpError(f"the guest did not become ready within {timeout} s")
        time.sleep(0.02)


def ms(seconds):
    return round(seconds * 1000.0, 1)


def migrate(args, started):
    source = Qemu(args, args.dir, "source", incoming=False)
    started.append(source)
    source.connect()
    wait_ready(source, timeout=120)
    if args.warm_up:
        # Untimed: the timed migration then starts from a guest that arrived
        # by migration, like every Tern migration after the first.
        time.sleep(args.settle_ms / 1000.0)

        def before_quit(destination):
            if args.stop_ms > 0:
                os.kill(destination.process.pid, signal.SIGSTOP)
                time.sleep(args.stop_ms / 1000.0)
                os.kill(destination.process.pid, signal.SIGCONT)
            go(args)

        _, source = hop(args, source, "warm-up", started, before_quit)
    else:
        go(args)
    time.sleep(args.settle_ms / 1000.0)
    result, _ = hop(args, source, "destination", started)
    return result


def go(args):
    """With --go-on-stdin: say so and wait for "go"."""
    if args.go_on_stdin:
        print(json.dumps({"ready": True}), flush=True)
        if sys.stdin.readline().strip() != "go":
            raise QmpError('stdin closed before "go"')


def hop(args, source, role, started, before_quit=None):
    """One migration from `source` to a new QEMU named `role`, timed from
    starting that QEMU to the source's exit; returns (result, destination).
    `before_quit(destination)` runs after `cont`, before the source exits
    and frees its memory (for the warm-up hop, which is not timed)."""
    src = source.qmp

    # ---- timed from here ----
    t0 = time.monotonic()
    destination = Qemu(args, args.dir, role, incoming=True)
    started.append(destination)
    dst = destination.connect()
    t_started = time.monotonic()
    configure(dst, args)
    dst.execute("migrate-incoming", {"uri": f"tcp:{args.address}:0"})
    port = next(
        a["port"]
        for a in dst.execute("query-migrate").get("socket-address", [])
        if "port" in a
    )
    host = f"[{args.address}]" if ":" in args.address else args.address
    uri = f"tcp:{host}:{port}"
    status = src.execute("query-status")["status"]
    if status != "running":
        raise QmpError(f"the source guest is {status}, not running")
    configure(src, args)
    t_listening = time.monotonic()
    src.execute("migrate", {"uri": uri})
    t_migrate = time.monotonic()
    poll = args.poll_ms / 1000.0
    tick = t_migrate
    while True:
        info = src.execute("query-migrate")
        status = info.get("status", "none")
        if status == "completed":
            # QEMU 7.2 says "completed" a moment before it fills in
            # total-time and downtime (0 until then): ask again for them.
            for _ in range(100):
                if info.get("total-time", 0) > 0:
                    break
                time.sleep(0.001)
                info = src.execute("query-migrate")
            break
        if status in ("failed", "cancelled"):
            raise QmpError(f"migration {status}: {info.get('error-desc', 'no reason given')}")
        tick += poll
        time.sleep(max(0.0, tick - time.monotonic()))
    t_completed = time.monotonic()
    deadline = t_completed + 60
    while True:
        incoming = dst.execute("query-migrate").get("status", "none")
        if incoming == "completed":
            break
        if incoming in ("failed", "cancelled") or time.monotonic() > deadline:
            raise QmpError(f"incoming migration {incoming}")
        time.sleep(0.01)
    t_incoming = time.monotonic()
    dst.execute("cont")
    if before_quit is not None:
        before_quit(destination)
    try:
        src.execute("quit")
    except (QmpError, OSError):
        pass  # QEMU may close the socket before it answers
    source.wait_exit(timeout=3)
    t1 = time.monotonic()
    # ---- timed until here ----

    ram = info.get("ram", {})
    return {
        "wall_ms": ms(t1 - t0),
        "total_time_ms": info.get("total-time", 0),
        "downtime_ms": info.get("downtime", 0),
        "setup_time_ms": info.get("setup-time", 0),
        "bytes_transferred": ram.get("transferred", 0),
        "dirty_sync_count": ram.get("dirty-sync-count", 0),
        "steps_ms": {
            "start_destination": ms(t_started - t0),
            "listen_and_configure": ms(t_listening - t_started),
            "transfer": ms(t_completed - t_listening),
            "incoming_complete": ms(t_incoming - t_completed),
            "cont_and_quit": ms(t1 - t_incoming),
        },
    }, destination


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--qemu", default="qemu-system-x86_64")
    p.add_argument("--kernel", required=True, help="the test guest's ELF (guest/tern-guest.S)")
    p.add_argument("--memory-mib", type=int, default=512)
    p.add_argument("--ws-mib", type=int, default=64, help="the guest's working set")
    p.add_argument("--vcpus", type=int, default=1)
    p.add_argument("--accel", default="kvm", choices=["kvm", "tcg"])
    p.add_argument("--machine", default="pc")
    p.add_argument("--max-bandwidth", type=int, default=1024 << 20, help="bytes/s")
    p.add_argument("--downtime-limit", type=int, default=300, help="ms")
    p.add_argument("--auto-converge", type=int, default=1, choices=[0, 1])
    p.add_argument("--multifd-channels", type=int, default=0, help="0: multifd off")
    p.add_argument("--address", default="127.0.0.1", help="where the destination listens")
    p.add_argument("--warm-up", type=int, default=0, choices=[0, 1],
                   help="first migrate the guest once, untimed, and time the second hop")
    p.add_argument("--stop-ms", type=int, default=0,
                   help="with --warm-up: SIGSTOP the guest this long after the warm-up hop")
    p.add_argument("--go-on-stdin", action="store_true",
                   help='before the timed part, print {"ready": true} and wait for "go" on stdin')
    p.add_argument("--settle-ms", type=int, default=0, help="let the ready guest run this long first")
    p.add_argument("--poll-ms", type=int, default=100, help="source query-migrate interval")
    p.add_argument("--dir", required=True, help="for sockets, pidfiles, logs, serial output")
    args = p.parse_args()
    args.auto_converge = bool(args.auto_converge)
    args.warm_up = bool(args.warm_up)
    os.makedirs(args.dir, exist_ok=True)

    def stop(signum, _frame):
        raise SystemExit(128 + signum)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stop)

    started = []
    try:
        result = migrate(args, started)
        print(json.dumps(result), flush=True)
        return 0
    except (QmpError, OSError, StopIteration, ValueError) as e:
        print(f"qmp-migrate: {e!r}", file=sys.stderr)
        return 1
    finally:
        for qemu in started:
            qemu.kill()


if __name__ == "__main__":
    sys.exit(main())
