"""Image variants: the default guest, and variants that add Debian programs to it.

A variant only ever adds: the same guest plus some executables (with their shared
libraries) taken from the same Debian root. Each is cached under its own input hash and has
its own "latest" pointer, so building one never replaces another. The default's inputs do
not mention variants at all, so adding or changing a variant leaves the default's hash alone.

- ``default``: what every sandbox boots.
- ``bench``: adds Debian's ``crun``, the baseline of ``bench/containers.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import rootfs


@dataclass(frozen=True)
class Variant:
    name: str
    # Executables taken from the quarry (their libraries follow), and every package whose
    # files they bring along: the build refuses a file from a package not listed.
    programs: tuple[str, ...] = ()
    packages: tuple[str, ...] = ()

    @property
    def is_default(self) -> bool:
        return self.name == DEFAULT.name


DEFAULT = Variant("default")
BENCH = Variant(
    "bench",
    programs=("/usr/bin/crun",),
    packages=(
        "crun",
        "libcap2",
        "libseccomp2",
        "libyajl2",
        "libsystemd0",
        # libsystemd0's own libraries
        "libgcrypt20",
        "libgpg-error0",
        "liblz4-1",
        "libzstd1",
    ),
)
VARIANTS = {v.name: v for v in (DEFAULT, BENCH)}


def get(name: str | Variant | None) -> Variant:
    """The variant called ``name`` (None: the default); ValueError naming the known ones."""
    if isinstance(name, Variant):
        return name
    if name is None:
        return DEFAULT
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown image variant {name!r} (known: {', '.join(VARIANTS)})") from None


def source_packages(variant: Variant) -> tuple[str, ...]:
    """Every package whose files the variant's initramfs may hold, in a stable order."""
    extra = [p for p in variant.packages if p not in rootfs.SOURCE_PACKAGES]
    return (*rootfs.SOURCE_PACKAGES, *dict.fromkeys(extra))


def all_packages() -> tuple[str, ...]:
    """The packages of every variant: one Debian root (and one apt question) serves them all."""
    names: dict[str, None] = {}
    for variant in VARIANTS.values():
        names.update(dict.fromkeys(source_packages(variant)))
    return tuple(names)
