"""``bpkit launch --processes N CONFIG [key=value ...]``: a multi-process run on this machine.

Starts ``N`` ``bpkit train`` processes that join one ``jax.distributed`` job through a
coordinator on a free port of 127.0.0.1: process ``i`` gets
``distributed.coordinator_address=127.0.0.1:PORT distributed.num_processes=N
distributed.process_id=i``. This is exactly the command a cluster scheduler runs once per host
(with the coordinator on the first host), so a run launched here behaves as on a cluster:
cross-process collectives (gloo on CPU), each process loading its own rows of every batch, only
process 0 writing the run directory.

* ``--local-devices K`` gives each process ``K`` simulated CPU devices
  (``XLA_FLAGS=--xla_force_host_platform_device_count=K``), so ``mesh.data x mesh.fsdp`` may be
  up to ``N * K``.
* Every line a process prints is streamed with a ``[pI]`` prefix.
* If a process fails, the others are stopped (SIGTERM, then SIGKILL after a grace period) and
  the launcher exits with the failing process's status.
* SIGINT/SIGTERM/SIGHUP sent to the launcher are forwarded to every process (the processes
  agree on a step, every ``run.log_every`` steps, save a checkpoint there and exit); a second
  signal kills them. Run the same command again to resume.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

GRACE_SECONDS = 20.0  # how long a stopped process may take to exit before SIGKILL
_DEVICE_FLAG = "--xla_force_host_platform_device_count"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_command(config: str, overrides: list[str], *, address: str, processes: int,
                    process_id: int) -> list[str]:
    """The ``bpkit train`` command line of one process (what a scheduler runs per host)."""
    return [sys.executable, "-m", "bpkit.cli", "train", config, *overrides,
            f"distributed.coordinator_address={address}",
            f"distributed.num_processes={processes}", f"distributed.process_id={process_id}"]


def process_env(local_devices: int | None) -> dict[str, str]:
    """The environment of every process: unbuffered output and, with ``local_devices``, that
    many simulated CPU devices (replacing any device count already in ``XLA_FLAGS``)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if local_devices is not None:
        flags = re.sub(_DEVICE_FLAG + r"=\S*", "", env.get("XLA_FLAGS", "")).split()
        env["XLA_FLAGS"] = " ".join(flags + [f"{_DEVICE_FLAG}={local_devices}"])
        env.setdefault("JAX_PLATFORMS", "cpu")
    return env


class Launcher:
    """``N`` processes, their prefixed output, failure propagation and signal forwarding."""

    def __init__(self, commands: list[list[str]], env: dict[str, str], out=None):
        self.commands, self.env = commands, env
        self.out = out or sys.stdout
        self.procs: list[subprocess.Popen] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.stopping = False

    def _pump(self, i: int, stream) -> None:
        for line in iter(stream.readline, ""):
            with self._lock:
                try:
                    self.out.write(f"[p{i}] {line}" if line.endswith("\n") else f"[p{i}] {line}\n")
                    self.out.flush()
                except (BrokenPipeError, ValueError):
                    pass
        stream.close()

    def start(self) -> None:
        for i, cmd in enumerate(self.commands):
            # Own session: a terminal's Ctrl-C reaches the launcher only, which forwards it
            # once to every process (a process must not get it twice).
            p = subprocess.Popen(cmd, env=self.env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, bufsize=1,
                                 start_new_session=True)
            self.procs.append(p)
            t = threading.Thread(target=self._pump, args=(i, p.stdout), daemon=True)
            t.start()
            self._threads.append(t)

    def on_signal(self, signum: int) -> None:
        """The launcher's SIGINT/SIGTERM/SIGHUP: forwarded to every process (each saves and
        exits); a second one kills them (a process that cannot save, e.g. waiting on a
        peer that died, would otherwise hang)."""
        if self.stopping:
            self._say("bpkit launch: second stop signal; killing the processes")
            for p in self.procs:
                if p.poll() is None:
                    p.kill()
            return
        self.forward(signum)

    def forward(self, signum: int) -> None:
        """Send ``signum`` to every process still running."""
        self.stopping = True
        for p in self.procs:
            if p.poll() is None:
                try:
                    p.send_signal(signum)
                except ProcessLookupError:
                    pass

    def stop_all(self, grace: float = GRACE_SECONDS) -> None:
        """SIGTERM to the running processes; SIGKILL to those still running after ``grace``."""
        self.forward(signal.SIGTERM)
        deadline = time.time() + grace
        while any(p.poll() is None for p in self.procs) and time.time() < deadline:
            time.sleep(0.05)
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            p.wait()

    def wait(self) -> int:
        """Wait for every process; return 0, or the status of the first one that failed
        (the others are stopped as soon as one fails)."""
        failed: int | None = None
        while True:
            codes = [p.poll() for p in self.procs]
            bad = [c for c in codes if c not in (None, 0)]
            if bad and failed is None:
                failed = bad[0]
                running = any(c is None for c in codes)
                if not self.stopping:  # (stopping: each process saves and exits by itself;
                    # a SIGTERM now would only race it)
                    self._say(f"bpkit launch: process {codes.index(failed)} exited with status "
                              f"{failed}" + ("; stopping the others" if running else ""))
                    if running:
                        self.stop_all()
                continue
            if all(c is not None for c in codes):
                break
            time.sleep(0.05)
        for t in self._threads:
            t.join(timeout=5)
        return failed or 0

    def _say(self, msg: str) -> None:
        with self._lock:
            print(msg, file=sys.stderr, flush=True)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bpkit launch",
        description="Train CONFIG with N processes on this machine, joined through "
                    "jax.distributed (coordinator on a free port of 127.0.0.1): each runs "
                    "'bpkit train CONFIG ... distributed.coordinator_address=127.0.0.1:PORT "
                    "distributed.num_processes=N distributed.process_id=I', the command a "
                    "cluster scheduler runs per host. Output lines carry a [pI] prefix; if one "
                    "process fails the others are stopped.")
    p.add_argument("--processes", type=int, required=True, metavar="N",
                   help="number of processes (>= 1)")
    p.add_argument("--local-devices", type=int, default=None, metavar="K",
                   help="simulated CPU devices per process "
                        "(XLA_FLAGS=--xla_force_host_platform_device_count=K)")
    p.add_argument("--port", type=int, default=None,
                   help="coordinator port on 127.0.0.1 (default: a free one)")
    p.add_argument("config", metavar="CONFIG", help="a YAML config, such as "
                                                    "configs/mnist1d_mlp.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return p


def _check(args) -> list[str]:
    """The user's mistakes in the launch arguments, one sentence each."""
    problems = []
    if args.processes < 1:
        problems.append(f"--processes must be at least 1, got {args.processes}.")
    if args.local_devices is not None and args.local_devices < 1:
        problems.append(f"--local-devices must be at least 1, got {args.local_devices}.")
    given = [o.split("=", 1)[0] for o in args.overrides if o.startswith("distributed.")]
    if given:
        problems.append("bpkit launch sets the distributed section itself; drop "
                        + ", ".join(given) + " (to join a job on a cluster, run 'bpkit train' "
                        "per host with them instead).")
    return problems


def main(argv: list[str]) -> int:
    args = _parser().parse_intermixed_args(argv)
    problems = _check(args)
    if not problems:
        from bpkit.config import ConfigError, load_config
        try:  # every config mistake once, before N processes report it N times
            load_config(args.config, [*args.overrides, "distributed.coordinator_address=x:1",
                                      f"distributed.num_processes={args.processes}",
                                      "distributed.process_id=0"])
        except ConfigError as e:
            problems.append(str(e))
    if problems:
        for msg in problems:
            print(f"bpkit launch: error: {msg}", file=sys.stderr)
        return 2
    address = f"127.0.0.1:{args.port or free_port()}"
    commands = [process_command(args.config, args.overrides, address=address,
                                processes=args.processes, process_id=i)
                for i in range(args.processes)]
    launcher = Launcher(commands, process_env(args.local_devices))
    old = {}
    for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if s is not None:
            old[s] = signal.signal(s, lambda signum, frame: launcher.on_signal(signum))
    try:
        print(f"bpkit launch: {args.processes} processes, coordinator {address}"
              + (f", {args.local_devices} CPU devices each" if args.local_devices else ""),
              flush=True)
        launcher.start()
        return launcher.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
