"""What a process and the machine cost, from /proc: CPU, RSS, fds, sockets, children."""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import shutil
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid: int, kernel_only: bool = False) -> float:
    """utime + stime of `pid` (all its threads), or stime alone, in seconds; 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return 0.0
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc_pid_stat(5)
    return (stime if kernel_only else utime + stime) / CLK_TCK


def proc_rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent not idle (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return (sum(ticks[:8]) - idle) / CLK_TCK


def own_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def machine_info() -> dict[str, Any]:
    def read(path: str) -> str:
        try:
            with open(path) as f:
                return f.read()
        except OSError:
            return ""

    cpuinfo, meminfo = read("/proc/cpuinfo").splitlines(), read("/proc/meminfo").splitlines()
    model = next((ln.split(":", 1)[1].strip() for ln in cpuinfo if "model name" in ln), "?")
    mem = next((int(ln.split()[1]) for ln in meminfo if ln.startswith("MemTotal")), 0)
    versions: dict[str, str] = {}
    for dist in ("picows", "uvicorn", "websockets", "litestar", "nats-py", "uvloop", "msgspec"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            versions[dist] = version(dist)
    with contextlib.suppress(Exception):
        from gateway.natsserver import binary

        out = subprocess.run([binary(), "--version"], capture_output=True, text=True, check=False)
        versions["nats-server"] = out.stdout.strip().rsplit(" ", 1)[-1]
    return {
        "gateway_source": source_identity(),
        "cpu_model": model,
        "nproc": os.cpu_count(),
        "mem_total_gib": round(mem / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_at_start": os.getloadavg(),
        "versions": versions,
    }


def source_identity() -> dict[str, Any]:
    """Which gateway code was measured: the commit, and whether service/ had local changes."""
    import hashlib

    def git(*args: str) -> str:
        exe = shutil.which("git")
        if exe is None:
            return ""
        out = subprocess.run(
            [exe, "--no-optional-locks", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
        return out.stdout.strip()

    digest = hashlib.sha256()
    for path in sorted((ROOT / "service" / "gateway").glob("*.py")):
        digest.update(path.read_bytes())
    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "service_modified": git("status", "--porcelain", "--", "service").splitlines(),
        "service_sha256": digest.hexdigest()[:16],
    }


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # children inherit it
    return hard


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (a supervisor's workers), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        found.append(p := stack.pop())
        stack.extend(children.get(p, []))
    return found


def socket_count(pid: int) -> int:
    """Open sockets of `pid` (its connections, roughly), from /proc/PID/fd."""
    try:
        fds = os.scandir(f"/proc/{pid}/fd")
    except OSError:
        return 0
    with fds:
        return sum(1 for fd in fds if _is_socket(fd.path))


def _is_socket(path: str) -> bool:
    try:
        return os.readlink(path).startswith("socket:")
    except OSError:
        return False


def rss_bytes(pid: int) -> int:
    """VmRSS of `pid` in bytes; raises if it is gone."""
    kib = proc_rss_kib(pid)
    if not kib:
        raise RuntimeError(f"no VmRSS for {pid}")
    return kib * 1024


def fd_count(pid: int) -> int:
    """Open file descriptors of `pid`, from /proc/PID/fd."""
    return len(os.listdir(f"/proc/{pid}/fd"))
