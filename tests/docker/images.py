"""The test image, built on this machine with no registry: a Debian base made with debootstrap and
`docker import` (kept as BASE_TAG, made again only when missing), the wheels of torch and of every
dependency that pip finds here (built once into WHEEL_CACHE, copied into docker/wheels/), then
`docker build` of docker/Dockerfile from them. For tests/docker and by hand:
    python -m tests.docker.images        # builds diloco-p2p:test and prints what each step took
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tomllib

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
BASE_TAG = "diloco-test-base:bookworm"
IMAGE_TAG = "diloco-p2p:test"
DEBIAN_SUITE, DEBIAN_MIRROR = "bookworm", "http://deb.debian.org/debian"
BASE_PACKAGES = ("python3", "python3-venv")  # what docker/Dockerfile needs of its base
WHEELS_DIR = REPO_ROOT / "docker" / "wheels"
WHEEL_CACHE = Path(os.environ.get("DILOCO_WHEEL_CACHE", Path.home() / ".cache" / "diloco-p2p" / "wheels"))
TORCH_SPEC = "torch==2.13.0"  # the CPU wheel pip finds on this machine (PIP_FIND_LINKS)


def missing() -> str:
    """Why the container tests cannot run here ("" when they can)."""
    if os.geteuid() != 0:
        return "not root: debootstrap and the Docker engine need root (scripts/system_deps.sh sets them up)"
    for tool in ("docker", "debootstrap", "docker-compose"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/system_deps.sh installs it with apt-get)"
    info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    if info.returncode != 0:
        return f"no Docker engine answers (`docker info`: {info.stderr.strip()[-200:]}); see /var/log/dockerd.log"
    return ""


def docker(*args: str, timeout_s: float = 60, check: bool = True, text: bool = True,
           **kwargs) -> subprocess.CompletedProcess:
    """`docker ARGS`; a failure raises with its output."""
    p = subprocess.run(["docker", *args], capture_output=True, text=text, timeout=timeout_s, **kwargs)
    if check and p.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)} exited {p.returncode}:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def image_exists(tag: str) -> bool:
    return docker("image", "inspect", tag, check=False).returncode == 0


def base_image(tag: str = BASE_TAG) -> str:
    """A minimal Debian with Python, imported as `tag` (kept: made only when missing)."""
    if image_exists(tag):
        return tag
    root = Path(tempfile.mkdtemp(prefix="diloco-rootfs-", dir="/var/tmp"))
    try:
        p = subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
                            DEBIAN_SUITE, str(root), DEBIAN_MIRROR], capture_output=True, text=True, timeout=900)
        if p.returncode != 0:
            raise RuntimeError(f"debootstrap exited {p.returncode}:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        try:
            docker("import", "-", tag, stdin=tar.stdout, timeout_s=600)
        finally:
            tar.stdout.close()  # type: ignore[union-attr]
            tar.wait(timeout=60)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return tag


def requirements() -> list[str]:
    """torch first, then the project's dependencies, and what builds the project's own wheel."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    build = project["build-system"]["requires"]
    return [TORCH_SPEC, *project["project"]["dependencies"], *build]


def _has_wheels(folder: Path, wanted: str) -> bool:
    stamp = folder / ".requirements"
    return stamp.exists() and stamp.read_text() == wanted and any(folder.glob("torch-*.whl"))


def wheels(folder: Path = WHEELS_DIR, cache: Path = WHEEL_CACHE) -> Path:
    """Wheels of `requirements()` in `folder` (pip wheel: sdist-only packages are built here, so
    the image needs no compiler); kept while the requirements are the same. They are built once
    into `cache` (outside the checkout, one folder per set of requirements) and copied from there:
    a fresh clone then hands `docker build` the same bytes as the last one, and Docker's layer
    cache skips the image's pip install (a clean clone's setup took 85 s when every clone built
    its own wheels, whose bytes differ from build to build)."""
    wanted = "\n".join(requirements()) + "\n"
    if _has_wheels(folder, wanted):
        return folder
    built = cache / hashlib.sha256(wanted.encode()).hexdigest()[:16]
    if not _has_wheels(built, wanted):
        built.mkdir(parents=True, exist_ok=True)
        for old in built.glob("*.whl"):
            old.unlink()
        p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(built),
                            *requirements()], capture_output=True, text=True, timeout=1800)
        if p.returncode != 0:
            raise RuntimeError(f"pip wheel exited {p.returncode}:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
        (built / ".requirements").write_text(wanted)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.whl"):
        old.unlink()
    for whl in built.glob("*.whl"):
        shutil.copy2(whl, folder / whl.name)
    (folder / ".requirements").write_text(wanted)
    return folder


def build(tag: str = IMAGE_TAG, dockerfile: str = "docker/Dockerfile") -> str:
    """`docker build` of `dockerfile` on the local base from the local wheels, tagged `tag`
    (Docker's layer cache makes a rebuild with unchanged code take seconds)."""
    base = base_image()
    folder = wheels()
    docker("build", "--network", "host", "--build-arg", f"BASE={base}",
           "--build-arg", f"WHEELS={folder.relative_to(REPO_ROOT)}", "-f", dockerfile, "-t", tag, ".",
           cwd=REPO_ROOT, timeout_s=1800)
    return tag


def main() -> int:
    reason = missing()
    if reason:
        print(f"cannot build: {reason}", file=sys.stderr)
        return 1
    for step in (base_image, wheels, build):
        t = time.monotonic()
        result = step()
        print(f"{step.__name__}: {result} ({time.monotonic() - t:.1f} s)")
    size = docker("image", "inspect", "--format", "{{.Size}}", IMAGE_TAG).stdout.strip()
    print(f"image {IMAGE_TAG}: {int(size) / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
