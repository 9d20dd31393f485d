"""Building the guest image: kernel + initramfs + manifest, cached by a hash of the inputs.

Steps: resolve versions (cheap) -> return the cached image if the hash is known; otherwise
download and unpack the kernel, make (or reuse) a Debian root with mmdebstrap and the pinned
wheels, select what the guest runs into a stage, byte-compile it with the guest's Python,
check it imports, pack it into a cpio, compress, and move the result into the cache at once.
"""

from __future__ import annotations

import fcntl
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from . import (
    cache,
    compress,
    debian,
    guest_python,
    initramfs,
    inputs,
    kernel,
    manifest,
    modules,
    pycompile,
    rootfs,
    stage,
    variants,
    wheels,
)
from .cache import ImageInfo
from .variants import Variant

GUEST_LIB = "/usr/lib/bulkhead"

# The guest's PID 1. The kernel passes everything after the interpreter as ONE argument,
# so the flags must be a single word: "-IS" is "-I -S" (isolated mode, no site).
INIT_LAUNCHER = f"""#!/usr/bin/python3 -IS
import sys
sys.path.insert(0, {GUEST_LIB!r})
from bulkhead_init.main import main
main()
"""

PASSWD = "root:x:0:0:root:/root:/bin/sh\n"
CONTAINER_ROOTFS = "/usr/share/bulkhead/rootfs"
CONTAINER_PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\n"
    "daemon:x:1:1:daemon:/:/bin/false\n"
    "nobody:x:65534:65534:nobody:/:/bin/false\n"
)
CONTAINER_GROUP = "root:x:0:\ndaemon:x:1:\ntty:x:5:\nnogroup:x:65534:\n"
GROUP = "root:x:0:\n"

# Imported by the smoke test besides every module of our own packages.
THIRD_PARTY_IMPORTS = (
    "asyncio",
    "ctypes",
    "google.protobuf",
    "grpc",
    "grpc.aio",
    "grpc_health.v1.health",
    "grpc_reflection.v1alpha.reflection",
    "hashlib",
    "json",
    "logging",
    "prometheus_client",
    "psutil",
    "pyroute2",
    "seccomp",
    "subprocess",
    "uuid",
)

# Python modules from Debian packages (outside the stdlib), put beside the wheels. seccomp:
# libseccomp's bindings, imported only when a container's spec has linux.seccomp.
DEBIAN_PYTHON_MODULES = ("/usr/lib/python3/dist-packages/seccomp.cpython-311-x86_64-linux-gnu.so",)

Progress = Callable[[str], None]


class BuildError(RuntimeError):
    pass


def _progress(callback: Progress | None) -> Progress:
    start = time.monotonic()

    def say(msg: str) -> None:
        if callback is not None:
            callback(f"[{time.monotonic() - start:6.1f}s] {msg}")

    return say


@contextmanager
def _locked(cache_dir: Path) -> Iterator[None]:
    # Two builds into one cache (e.g. a CLI run during a test run) would trample the work dir.
    cache_dir.mkdir(parents=True, exist_ok=True)
    with (cache_dir / ".lock").open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _resolve(cache_dir: Path) -> tuple[str, dict[str, str]]:
    """The kernel package and the candidate versions of every variant's packages.

    One question to apt for all variants: they share the Debian root, whose freshness
    is judged against all of them.
    """
    return debian.resolve_cached(
        kernel.KERNEL_META_PACKAGE,
        variants.all_packages(),
        cache_dir / "work" / "apt-resolution.json",
    )


def collect_inputs(cache_dir: Path, variant: str | Variant | None = None) -> inputs.Inputs:
    chosen = variants.get(variant)
    package, versions = _resolve(cache_dir)
    root = inputs.REPO_ROOT
    files = inputs.hash_files(inputs.builder_sources(), root)
    files |= inputs.hash_files(inputs.package_sources(), root)
    return inputs.Inputs(
        kernel_package=package,
        kernel_version=versions[package],
        debian_packages={n: versions[n] for n in variants.source_packages(chosen)},
        requirements_sha256=wheels.requirements_digest(),
        files=files,
        modules=modules.WANTED_MODULES,
        cmdline=manifest.DEFAULT_CMDLINE,
        variant=chosen.name,
    )


def build_image(
    cache_dir: Path | None = None,
    *,
    force: bool = False,
    progress: Progress | None = None,
    variant: str | Variant | None = None,
) -> ImageInfo:
    """Build the guest image, or return the cached one when nothing changed.

    ``variant`` (see ``variants``): None or ``"default"``, or ``"bench"`` (adds crun); each
    variant is cached under its own hash and has its own ``latest`` pointer.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else cache.default_cache_dir()
    chosen = variants.get(variant)
    say = _progress(progress)
    inp = collect_inputs(cache_dir, chosen)
    key = inp.digest()
    what = "image" if chosen.is_default else f"{chosen.name} image"
    if not force and (found := cache.find_image(key, cache_dir)):
        _point_latest(key, cache_dir, chosen)
        say(f"cached {what} {key[:16]}")
        return found
    with _locked(cache_dir):
        if not force and (found := cache.find_image(key, cache_dir)):
            _point_latest(key, cache_dir, chosen)
            return found
        tmp_root = cache_dir / "tmp"
        shutil.rmtree(tmp_root, ignore_errors=True)  # left by a killed build; we hold the lock
        tmp_root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"build-{key[:12]}-", dir=tmp_root))
        try:
            image = _build(inp, chosen, key, cache_dir, tmp, say)
            dest = cache.images_dir(cache_dir) / key
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.exists():
                shutil.rmtree(dest)
            image.rename(dest)
            cache.set_latest(key, cache_dir, chosen.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    info = cache.load_image(dest, cached=False)
    say(f"{what} {dest}")
    return info


def _add_container_rootfs(st: stage.Stage, quarry: Path) -> int:
    """The default container root filesystem: static busybox and its applets.

    Containers never write to it: the agent gives each one its own overlay on top.
    """
    root = CONTAINER_ROOTFS
    for d in ("bin", "dev", "proc", "sys", "tmp", "etc", "root", "run", "var", "home"):
        st.mkdir(f"{root}/{d}", 0o1777 if d == "tmp" else 0o755)
    st.copy_file(quarry / "usr/bin/busybox", f"{root}/bin/busybox", 0o755)
    listing = subprocess.run(
        ["chroot", str(quarry), "/usr/bin/busybox", "--list"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    applets = sorted(a for a in listing if a != "busybox" and "/" not in a)
    for applet in applets:
        st.symlink(f"{root}/bin/{applet}", "busybox")
    st.write(f"{root}/etc/passwd", CONTAINER_PASSWD)
    st.write(f"{root}/etc/group", CONTAINER_GROUP)
    st.write(f"{root}/etc/hostname", "container\n")
    return len(applets)


def _point_latest(key: str, cache_dir: Path, variant: Variant) -> None:
    latest = cache.images_dir(cache_dir) / cache.latest_name(variant.name)
    try:
        if latest.read_text().strip() == key:
            return
    except FileNotFoundError:
        pass
    cache.set_latest(key, cache_dir, variant.name)


def _build(
    inp: inputs.Inputs, variant: Variant, key: str, cache_dir: Path, tmp: Path, say: Progress
) -> Path:
    work = cache_dir / "work"
    release_hint = inp.kernel_package.removeprefix("linux-image-")
    say(f"downloading kernel {release_hint} ({inp.kernel_version})")
    downloads = cache_dir / "downloads"
    kern = kernel.fetch(inp.kernel_package, inp.kernel_version, downloads, tmp / "kernel")

    # Memoised: the answer the key was made from, for every variant's packages.
    package, every_version = _resolve(cache_dir)
    debian_versions = {n: v for n, v in every_version.items() if n != package}
    quarry = rootfs.ensure(work, debian_versions, say)
    installed = debian.installed_versions(quarry)
    for name, wanted in inp.debian_packages.items():
        if installed.get(name) != wanted:
            # mmdebstrap asks the mirror, the key asked the host's lists: they disagree when
            # the host's lists are stale. The manifest records what was really used.
            say(f"warning: {name} is {installed.get(name)} in the root, apt says {wanted}")

    pins = wheels.pins()
    say(f"installing {len(pins)} guest wheels")
    wheel_dir = wheels.ensure(work)

    say("selecting files")
    st = stage.Stage(tmp / "stage", quarry)
    for top in ("/bin", "/sbin", "/lib", "/lib64"):
        st.take(top)  # merged /usr: the same links as Debian
    for d in ("/proc", "/sys", "/dev", "/run", "/tmp", "/mnt", "/root", "/etc/bulkhead"):
        st.mkdir(d)
    elves = guest_python.add(st)
    st.take("/usr/bin/busybox")
    st.symlink("/usr/bin/sh", "busybox")
    elves += _add_wheels(st, wheel_dir)
    elves += _add_debian_python_modules(st)
    _add_our_packages(st)
    if variant.programs:
        say(f"{variant.name} variant: {', '.join(variant.programs)}")
        elves += [st.take(program) for program in variant.programs]
    libs = st.add_libraries(elves)
    say(f"{len(libs)} shared libraries: {', '.join(Path(p).name for p in libs)}")
    _check_owners(st, quarry, variants.source_packages(variant))
    selection = _add_modules(st, kern)
    say(
        f"{len(selection.load_order)} kernel modules"
        + (
            f" (absent from this kernel: {', '.join(selection.missing)})"
            if selection.missing
            else ""
        )
    )
    st.write("/init", INIT_LAUNCHER, 0o755)
    st.write("/etc/passwd", PASSWD)
    st.write("/etc/group", GROUP)
    applets = _add_container_rootfs(st, quarry)
    say(f"default container root filesystem: busybox with {applets} applets at {CONTAINER_ROOTFS}")

    sources = sorted(
        "/" + p.relative_to(st.root).as_posix() for p in st.root.rglob("*.py") if not p.is_symlink()
    )
    say(f"compiling {len(sources)} Python files with the guest's Python")
    keep = [f"{GUEST_LIB}/{pkg}" for _folder, pkg in inputs.GUEST_PACKAGES]
    python_version = pycompile.compile_tree(st.root, sources, keep)
    ours = _our_modules(st.root)
    say(f"import check: {len(THIRD_PARTY_IMPORTS)} libraries, {len(ours)} modules of ours")
    pycompile.smoke_test(st.root, GUEST_LIB, [*THIRD_PARTY_IMPORTS, *ours])

    used = {n: installed[n] for n in variants.source_packages(variant)}
    used[inp.kernel_package] = inp.kernel_version
    base = manifest.make(
        kernel_release=kern.release,
        kernel_package=inp.kernel_package,
        kernel_package_version=inp.kernel_version,
        python_version=python_version,
        packages=pins,
        debian_packages=used,
        modules=[modules.module_name(p) for p in selection.load_order],
        cmdline=manifest.DEFAULT_CMDLINE,
        input_hash=key,
        compression=compress.DEFAULT,
        variant=variant.name,
    )
    st.write("/etc/bulkhead/manifest.json", manifest.dumps(base))

    image = tmp / "image"
    image.mkdir()
    initrd = image / cache.INITRAMFS_NAME
    count = sum(1 for _ in st.root.rglob("*")) + len(initramfs.DEVICES)
    say(f"packing initramfs: {count} files")
    # Our code and the manifest change with every edit: they go in a small second archive.
    app = (
        "init",
        "etc/bulkhead",
        *(f"{GUEST_LIB.lstrip('/')}/{pkg}" for _folder, pkg in inputs.GUEST_PACKAGES),
    )
    _n, raw_size = initramfs.pack(st.root, initrd, app_paths=app, zcache=work / "compressed")
    say(
        f"initramfs {initrd.stat().st_size / 1e6:.1f} MB "
        f"({compress.DEFAULT}, {raw_size / 1e6:.1f} MB unpacked)"
    )
    shutil.copyfile(kern.vmlinuz, image / cache.KERNEL_NAME)
    full = manifest.with_artifacts(
        base,
        {cache.KERNEL_NAME: image / cache.KERNEL_NAME, cache.INITRAMFS_NAME: initrd},
    )
    (image / cache.MANIFEST_NAME).write_text(manifest.dumps(full))
    return image


def _add_wheels(st: stage.Stage, wheel_dir: Path) -> list[str]:
    elves = []
    for path in sorted(wheel_dir.rglob("*")):
        rel = path.relative_to(wheel_dir).as_posix()
        if path.is_file() and not path.is_symlink() and wheels.wanted(rel):
            guest = f"{GUEST_LIB}/{rel}"
            st.copy_file(path, guest)
            if rel.endswith(".so"):
                elves.append(guest)
    return elves


def _add_debian_python_modules(st: stage.Stage) -> list[str]:
    elves = []
    for path in DEBIAN_PYTHON_MODULES:
        real = st.canonical(path)  # resolved in the quarry, never on the host
        guest = f"{GUEST_LIB}/{Path(path).name}"
        st.copy_file(st.quarry / real.lstrip("/"), guest, 0o644)
        st.origins[guest] = real
        elves.append(guest)
    return elves


def _add_our_packages(st: stage.Stage) -> None:
    for src in inputs.package_sources():
        rel = src.relative_to(inputs.REPO_ROOT).as_posix().split("/", 1)[1]  # drop the folder
        st.copy_file(src, f"{GUEST_LIB}/{rel}", 0o644)


def _our_modules(root: Path) -> list[str]:
    names = []
    for _folder, pkg in inputs.GUEST_PACKAGES:
        base = root / GUEST_LIB.lstrip("/")
        for p in sorted((base / pkg).rglob("*.py")):
            parts = list(p.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__main__":
                continue
            if parts[-1] == "__init__":
                parts.pop()
            names.append(".".join(parts))
    return names


def _check_owners(st: stage.Stage, quarry: Path, packages: tuple[str, ...]) -> None:
    """Every file taken from Debian must come from a package whose version is in the key."""
    owners = debian.file_owners(quarry)
    allowed = set(packages)
    strays = {}
    for guest, origin in st.origins.items():
        owner = owners.get(debian.usr_merged(origin))
        if owner not in allowed:
            strays[guest] = owner
    if strays:
        listing = ", ".join(f"{g} ({o or 'no package'})" for g, o in sorted(strays.items()))
        raise BuildError(
            "files from packages missing in rootfs.SOURCE_PACKAGES (or the variant's packages"
            f" in variants.py): {listing}"
        )


def _add_modules(st: stage.Stage, kern: kernel.Kernel) -> modules.Selection:
    deps = modules.parse_modules_dep(modules.modules_dep_from_tree(kern.moddir))
    selection = modules.resolve(
        modules.WANTED_MODULES,
        deps,
        modules.builtin_list(kern.moddir),
        modules.OPTIONAL_MODULES,
    )
    base = f"/usr/lib/modules/{kern.release}"
    for rel in selection.load_order:
        st.write(f"{base}/{modules.plain_ko(rel)}", modules.read_module(kern.moddir / rel))
    st.write(f"{base}/modules.dep", modules.format_modules_dep(selection.load_order, deps))
    load = "".join(modules.plain_ko(rel) + "\n" for rel in selection.load_order)
    st.write("/usr/lib/modules/bulkhead-load.txt", load)
    return selection
