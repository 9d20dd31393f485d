#!/usr/bin/env bash
# Prepare a fresh Debian 12 machine (as root) for Bulkhead: system packages,
# the Python packages (this checkout, editable, with dev tools) and the guest
# image. Idempotent: a second run installs nothing and reuses the cached image.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  qemu-system-x86   # the VMM (TCG here, KVM where it works); ships virtiofsd too
  qemu-utils        # qemu-img for disk images
  iproute2          # ip and tc: tap NICs in network namespaces, a CNI pod network taken over
  mmdebstrap        # builds the guest root filesystem from Debian packages
  busybox-static    # the debug console shell and the benchmark's floor /init
  cpio zstd         # inspecting and compressing the initramfs
  e2fsprogs         # mkfs.ext4 for disk images
  erofs-utils       # mkfs.erofs: read-only container root filesystem images
  squashfs-tools    # mksquashfs: the squashfs disks of the storage tests
  umoci             # OCI image layouts for `bulkhead image rootfs` and its tests
  crun              # the OCI runtime baseline in benchmarks
  containerd        # shim tests/benchmarks start a private daemon; the system unit is never used
  runc              # the io.containerd.runc.v2 baseline the shim is compared against
  prometheus        # promtool, which checks the agent's metrics exposition in tests
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "bootstrap: installing ${missing[*]}" >&2
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

PY=${PYTHON:-python3}
# pip is quick when everything is already there; versions are pinned in pyproject.toml.
"$PY" -m pip install -q --disable-pip-version-check -e '.[dev]'

if [[ "${BULKHEAD_SKIP_IMAGE:-}" != 1 ]]; then
  "$PY" -m bulkhead.cli image build
fi
