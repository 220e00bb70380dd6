"""
What the end-to-end benchmarks share: an imkit server and a Mosquitto broker started as
subprocesses on free 127.0.0.1 ports with the development certificates, their CPU time, child
processes whose output lines are watched with deadlines, and cleanup that always runs.

Nothing here leaves 127.0.0.1; every wait has a deadline; every process started is stopped by
``Cleanup`` (a context manager), also when a benchmark fails.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SRC = os.path.join(REPO, "src")
CERTS = os.path.join(REPO, "certs")
CA = os.path.join(CERTS, "ca.pem")
SERVER_CERT = os.path.join(CERTS, "server.pem")
SERVER_KEY = os.path.join(CERTS, "server.key")
HOST = "127.0.0.1"
"""Everything listens here; clients connect to "localhost", the name in the server certificate."""

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """A benchmark could not run or produced a wrong result; the message says what happened."""


def child_env() -> dict[str, str]:
    """The environment for children: the working tree's ``src`` first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("PYTHONUNBUFFERED", None)  # the commands run as a user runs them
    return env


def script(name: str) -> str:
    """
    The console script ``name`` next to this Python (not a pyenv shim: a shim is a shell script
    that would cost time, and hide the Python process from py-spy).
    """
    candidate = os.path.join(os.path.dirname(sys.executable), name)
    if os.access(candidate, os.X_OK):
        return candidate
    found = shutil.which(name)
    if found is None:
        raise BenchError(f"cannot find the {name!r} command; pip install the project first")
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int | str) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads), from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    # The command name (field 2) may hold spaces; the fields after its ")" are plain.
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime (fields 14, 15)


def thread_cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU seconds of process ``pid``'s main thread, and of all its other threads together."""
    main = others = 0.0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            seconds = cpu_seconds(f"{pid}/task/{tid}")  # type: ignore[arg-type]
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that ended meanwhile
        if int(tid) == pid:
            main = seconds
        else:
            others += seconds
    return main, others


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), round(fraction * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


def wait_until(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise BenchError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def file_text(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.splitlines()[-lines:])


class LoadMeter:
    """
    How busy other processes kept the machine while a benchmark ran: all CPU time (/proc/stat)
    less this process's and its reaped children's (every process a benchmark starts is reaped
    before it reports).  Other people's test runs on a shared machine show up here.  On a virtual
    machine, the time the hypervisor gave to other guests ("steal") is told apart: it slows
    every process here, and CPU figures per message swing with it.
    """

    def __init__(self) -> None:
        self._start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float, float]:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        busy = sum(values[:3] + values[5:7]) / CLOCK_TICKS
        steal = values[7] / CLOCK_TICKS
        ours = 0.0
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
            usage = resource.getrusage(who)
            ours += usage.ru_utime + usage.ru_stime
        return time.monotonic(), busy, ours, steal

    def others(self) -> float:
        """CPU cores other processes kept busy on average since this meter was made."""
        now, busy, ours, _ = self._sample()
        start, busy0, ours0, _ = self._start
        return max(0.0, (busy - busy0) - (ours - ours0)) / max(now - start, 1e-9)

    def stolen(self) -> float:
        """CPU cores the hypervisor took for other guests, on average since this meter was made."""
        now, _, _, steal = self._sample()
        start, _, _, steal0 = self._start
        return max(0.0, steal - steal0) / max(now - start, 1e-9)

    def describe(self) -> str:
        return (
            f"meanwhile other processes kept {self.others():.1f} of this machine's {os.cpu_count()} CPUs busy on average, "
            f"and the hypervisor took {self.stolen():.2f} of them for other guests (the higher, the noisier these figures)"
        )


def stop_cleanly_on_sigterm() -> None:
    """Make SIGTERM raise SystemExit, so ``Cleanup`` blocks stop what they started (run.py's timeout)."""

    def terminate(signum: int, frame: Any) -> None:
        raise SystemExit(f"stopped by signal {signum}")

    signal.signal(signal.SIGTERM, terminate)


# Processes -----------------------------------------------------------------------------------


class Child:
    """
    A subprocess whose standard output (and error) lines are collected by threads, with the time
    each stdout line arrived when ``keep_times``, so a benchmark can wait for a line and know when
    it came.  A thread of its own reaps it (``os.wait4``), so its exit time and CPU seconds
    (``cpu``, from its resource usage) are known even when it exits on its own.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        stdin: Any = subprocess.DEVNULL,
        stdout: Any = subprocess.PIPE,
        keep_times: bool = False,
        **popen: Any,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.lines: list[str] = []
        self.times: list[float] = []  # time.time() of every stdout line when keep_times
        self.err_lines: list[str] = []
        self.exit_time: float | None = None
        self.cpu: float | None = None
        self._keep_times = keep_times
        self._changed = threading.Condition()
        self.proc = subprocess.Popen(
            self.argv,
            stdin=stdin,
            stdout=stdout,  # a file instead of PIPE: nothing is read (nor timed) while it runs
            stderr=subprocess.PIPE,
            env=popen.pop("env", child_env()),
            start_new_session=True,  # a Ctrl-C of the benchmark reaches it through Cleanup only
            **popen,
        )
        self._readers = [threading.Thread(target=self._read, args=(self.proc.stderr, self.err_lines, False), daemon=True)]
        if self.proc.stdout is not None:
            self._readers.append(threading.Thread(target=self._read, args=(self.proc.stdout, self.lines, True), daemon=True))
        self._reaper = threading.Thread(target=self._reap, daemon=True)
        for thread in (*self._readers, self._reaper):
            thread.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def exited(self) -> bool:
        return self.exit_time is not None

    def _read(self, stream: Any, into: list[str], timed: bool) -> None:
        for raw in stream:
            now = time.time()
            line = raw.decode("utf-8", "replace").rstrip("\n")
            with self._changed:
                into.append(line)
                if timed and self._keep_times:
                    self.times.append(now)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def _reap(self) -> None:
        # The only waiter for this pid: Popen.poll() and wait() are never called on it.
        _, status, usage = os.wait4(self.proc.pid, 0)
        with self._changed:
            self.cpu = usage.ru_utime + usage.ru_stime
            self.exit_time = time.time()
            self.proc.returncode = os.waitstatus_to_exitcode(status)
            self._changed.notify_all()

    def wait_for(self, predicate: Callable[[], Any], timeout: float, what: str) -> Any:
        """Wait until ``predicate()`` (called under the lock) is true; fail if the child exits first."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                value = predicate()
                if value:
                    return value
                if self.exited and not any(r.is_alive() for r in self._readers):
                    raise BenchError(f"{self.name} exited with status {self.proc.returncode} before {what}:\n{self.output_tail()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BenchError(f"timed out after {timeout:g} s waiting for {what} from {self.name}:\n{self.output_tail()}")
                self._changed.wait(min(left, 0.2))

    def wait_json(self, event: str, timeout: float) -> dict[str, Any]:
        """The first stdout line that is a JSON object with ``"event": event``."""

        def found() -> dict[str, Any] | None:
            for line in self.lines:
                if line.startswith("{"):
                    try:
                        record = json.loads(line)
                    except ValueError:
                        continue
                    if record.get("event") == event:
                        return record
                    if record.get("event") == "error":
                        raise BenchError(f"{self.name} failed: {record.get('error')}\n{self.output_tail()}")
            return None

        return self.wait_for(found, timeout, f"its {event!r} line")

    def wait_exit(self, timeout: float) -> int:
        """Wait for the exit and the end of its output; its exit status."""
        self.wait_for(lambda: self.exited, timeout, "its exit")
        for reader in self._readers:
            reader.join(5)
        return self.proc.returncode

    def output_tail(self) -> str:
        out = "\n".join(self.lines[-5:])
        err = "\n".join(self.err_lines[-15:])
        return f"  command: {' '.join(self.argv)}\n  stdout (end): {out}\n  stderr (end): {err}"

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; only this process (by its pid)."""
        if self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with self._changed:
                if self.exited:
                    return
                try:
                    os.kill(self.proc.pid, sig)  # not yet reaped, so the pid is still ours
                except ProcessLookupError:
                    return
            self._reaper.join(timeout if sig == signal.SIGTERM else 5)


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; only this process (by its pid)."""
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    except ProcessLookupError:
        pass


class Cleanup:
    """``with Cleanup() as cleanup``: callbacks run in reverse order on exit, errors or not."""

    def __init__(self) -> None:
        self._callbacks: list[Callable[[], Any]] = []

    def __enter__(self) -> Cleanup:
        return self

    def add(self, callback: Callable[[], Any]) -> None:
        self._callbacks.append(callback)

    def child(self, child: Child) -> Child:
        self.add(child.stop)
        return child

    def tempdir(self, prefix: str) -> str:
        path = tempfile.mkdtemp(prefix=prefix)
        self.add(lambda: shutil.rmtree(path, ignore_errors=True))
        return path

    def __exit__(self, *exc_info: Any) -> None:
        while self._callbacks:
            callback = self._callbacks.pop()
            try:
                callback()
            except Exception as error:  # keep cleaning up
                print(f"warning: cleanup step failed: {error!r}", file=sys.stderr)


# The imkit server ------------------------------------------------------------------------------

ADD_USERS = """
import sys
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.internet.task import react
from imkit.passwords import Passwords
from imkit.store import store_from_string

async def main(reactor, description, *pairs):
    store = store_from_string(description, reactor)
    await store.open()
    try:
        # One argon2 hash per distinct password (users sharing a password share its hash), and
        # every user queued at once, so the store writes them in a few transactions.
        passwords, hashes, added = Passwords(), {}, []
        for pair in pairs:
            name, password = pair.split(":", 1)
            if password not in hashes:
                hashes[password] = await passwords.hash(password)
            added.append(store.add_user(name, hashes[password]))
        await gatherResults(added, consumeErrors=True)
    finally:
        await store.close()

react(lambda reactor: ensureDeferred(main(reactor, *sys.argv[1:])))
"""


class ImkitServer:
    """
    ``twistd -n imkit`` with an SQLite store in a fresh temporary directory, on a free port
    (``twistd``: another command line to start twistd with, such as a profiling wrapper).

    Users are added directly through the store (one process, before the server starts), as
    ``imkit user add`` does, with one real argon2id hash per distinct password: a thousand users
    sharing a password cost one hash and a few transactions.
    """

    def __init__(
        self, cleanup: Cleanup, users: dict[str, str], extra_args: Sequence[str] = (), twistd: Sequence[str] | None = None
    ) -> None:
        self.dir = cleanup.tempdir("imkit-bench-")
        self.port = free_port()
        self.store = f"sqlite:{os.path.join(self.dir, 'imkit.sqlite3')}"
        self.log_path = os.path.join(self.dir, "twistd.log")
        self.pid_path = os.path.join(self.dir, "twistd.pid")
        if users:
            pairs = [f"{name}:{password}" for name, password in users.items()]
            done = subprocess.run(
                [sys.executable, "-c", ADD_USERS, self.store, *pairs], env=child_env(), capture_output=True, text=True, timeout=120
            )
            if done.returncode != 0:
                raise BenchError(f"adding users to {self.store} failed:\n{done.stderr}")
        argv = [
            *(twistd or [script("twistd")]),
            "-n",
            "--pidfile",
            self.pid_path,
            "--logfile",
            self.log_path,
            "imkit",
            # Throughput benchmarks measure the server, not its abuse limits: rates off unless a
            # benchmark (bench_attack) turns them on again in extra_args.
            "--send-rate", "0", "--sync-rate", "0", "--lookup-rate", "0",
            "--listen",
            f"tls:{self.port}:interface={HOST}",
            "--store",
            self.store,
            *extra_args,
        ]
        self.argv = argv
        self.out_path = os.path.join(self.dir, "twistd.out")
        with open(self.out_path, "wb") as out:
            self.proc = subprocess.Popen(
                argv, cwd=self.dir, env=child_env(), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        cleanup.add(self.stop)
        wait_until(self._listening, 60, f"the imkit server to listen on {HOST}:{self.port}")
        self.pid = self.proc.pid

    def _listening(self) -> bool:
        if self.proc.poll() is not None:
            raise BenchError(
                f"twistd exited with status {self.proc.returncode}:\n  command: {' '.join(self.argv)}\n"
                f"{tail(file_text(self.out_path))}\n{tail(file_text(self.log_path))}".rstrip()
            )
        return f"listening on {HOST}:{self.port}" in file_text(self.log_path)

    @property
    def server(self) -> str:
        return f"localhost:{self.port}"

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def thread_cpu(self) -> tuple[float, float]:
        """CPU seconds of the reactor (main) thread, and of the others (the SQLite writer, the thread pool)."""
        return thread_cpu_seconds(self.pid)

    def stop(self) -> None:
        stop_process(self.proc, 15)

    def log_errors(self) -> list[str]:
        """Lines of the server log that report failures (tracebacks, critical or error events)."""
        return [line for line in file_text(self.log_path).splitlines() if "Traceback" in line or "#critical]" in line or "#error]" in line]


# Mosquitto -------------------------------------------------------------------------------------

MOSQUITTO_NOTE = (
    "Mosquitto keeps QoS 1 messages in memory and writes them to disk only every autosave_interval "
    "(and at shutdown): it acknowledges before anything is on disk, where imkit acknowledges a message "
    "only after its SQLite transaction committed."
)


class Mosquitto:
    """Our own Mosquitto broker: one TLS listener on a free 127.0.0.1 port, in a temporary directory."""

    def __init__(self, cleanup: Cleanup, max_inflight: int = 1000) -> None:
        self.binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not os.access(self.binary, os.X_OK):
            raise BenchError("mosquitto is not installed (apt-get install mosquitto mosquitto-clients)")
        self.dir = cleanup.tempdir("mosquitto-bench-")
        self.port = free_port()
        self.log_path = os.path.join(self.dir, "mosquitto.log")
        conf = os.path.join(self.dir, "mosquitto.conf")
        user = "root" if os.geteuid() == 0 else ""
        with open(conf, "w") as f:
            f.write(
                "\n".join(
                    [
                        *([f"user {user}"] if user else []),  # as root it would switch to "mosquitto", who cannot read our files
                        "per_listener_settings false",
                        "allow_anonymous true",
                        # Persistent like imkit's store, but asynchronous: see MOSQUITTO_NOTE.
                        "persistence true",
                        f"persistence_location {self.dir}/",
                        f"log_dest file {self.log_path}",
                        "log_type error",
                        "log_type warning",
                        "log_type notice",
                        "log_type information",
                        "log_type subscribe",
                        # Outgoing QoS 1 window per client like imkit's (default 20), and no queue limit
                        # (default 1000, past which QoS 1 messages to a slow subscriber are dropped).
                        f"max_inflight_messages {max_inflight}",
                        "max_queued_messages 0",
                        f"listener {self.port} {HOST}",
                        f"cafile {CA}",
                        f"certfile {SERVER_CERT}",
                        f"keyfile {SERVER_KEY}",
                        "",
                    ]
                )
            )
        self.argv = [self.binary, "-c", conf]
        self.out_path = os.path.join(self.dir, "mosquitto.out")
        with open(self.out_path, "wb") as out:
            self.proc = subprocess.Popen(
                self.argv, cwd=self.dir, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        cleanup.add(self.stop)
        wait_until(self._running, 30, f"mosquitto to listen on {HOST}:{self.port}")
        self.pid = self.proc.pid

    def _running(self) -> bool:
        if self.proc.poll() is not None:
            raise BenchError(
                f"mosquitto exited with status {self.proc.returncode}:\n  command: {' '.join(self.argv)}\n"
                f"{tail(file_text(self.out_path))}\n{tail(file_text(self.log_path))}".rstrip()
            )
        return " running" in file_text(self.log_path)

    @property
    def server(self) -> str:
        return f"localhost:{self.port}"

    def subscribed(self, client_id: str, topic: str) -> bool:
        return f" {client_id} 1 {topic}" in file_text(self.log_path)

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def stop(self) -> None:
        stop_process(self.proc, 15)


def version(argv: Sequence[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (out.stdout + out.stderr).strip().splitlines()
    return text[0] if text else "?"
