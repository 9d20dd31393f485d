"""Image variants: which packages each may ship, how each is keyed and found in the cache."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
from test_image_cache import BASE, fake_image

from bulkhead import cli
from bulkhead_image import build, cache, manifest, rootfs, variants


def test_variants_by_name() -> None:
    assert variants.get(None) is variants.DEFAULT
    assert variants.get("default") is variants.DEFAULT
    assert variants.get("bench") is variants.BENCH
    assert variants.get(variants.BENCH) is variants.BENCH
    with pytest.raises(ValueError, match=r"unknown image variant 'fast' \(known: default, bench"):
        variants.get("fast")
    assert tuple(variants.VARIANTS) == cli.IMAGE_VARIANTS


def test_the_default_ships_only_its_own_packages() -> None:
    assert variants.source_packages(variants.DEFAULT) == rootfs.SOURCE_PACKAGES
    assert variants.DEFAULT.programs == ()
    assert "python3-seccomp" in rootfs.SOURCE_PACKAGES  # linux.seccomp works in every image
    assert "crun" not in rootfs.SOURCE_PACKAGES


def test_bench_adds_crun_and_its_libraries_to_the_default() -> None:
    bench = variants.source_packages(variants.BENCH)
    assert bench[: len(rootfs.SOURCE_PACKAGES)] == rootfs.SOURCE_PACKAGES
    assert {"crun", "libseccomp2", "libyajl2", "libcap2", "libsystemd0"} <= set(bench)
    assert len(bench) == len(set(bench))
    assert variants.BENCH.programs == ("/usr/bin/crun",)


def test_one_debian_root_holds_every_variant() -> None:
    every = variants.all_packages()
    assert len(every) == len(set(every))
    for variant in variants.VARIANTS.values():
        assert set(variants.source_packages(variant)) <= set(every)
    # the quarry installs what the variants take from it
    assert {"crun", "python3-seccomp"} <= set(rootfs.INCLUDE)


def test_the_default_key_does_not_mention_variants() -> None:
    fields = dataclasses.asdict(BASE)
    del fields["variant"]
    before_variants = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    assert BASE.variant == "default"
    assert BASE.digest() == hashlib.sha256(before_variants.encode()).hexdigest()
    bench = dataclasses.replace(BASE, variant="bench")
    assert bench.digest() != BASE.digest()


def test_latest_pointer_names() -> None:
    assert cache.latest_name() == "latest"
    assert cache.latest_name("default") == "latest"
    assert cache.latest_name("bench") == "latest-bench"
    for bad in ("", "../x", ".hidden"):
        with pytest.raises(ValueError):
            cache.latest_name(bad)


def test_a_variant_build_leaves_the_default_latest_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bench = dataclasses.replace(BASE, variant="bench", debian_packages={"crun": "1.8.1"})
    chosen = {"default": BASE, "bench": bench}
    monkeypatch.setattr(
        build, "collect_inputs", lambda cache_dir, variant=None: chosen[variants.get(variant).name]
    )

    def no_build(*args: object) -> None:
        raise AssertionError("must not build")

    monkeypatch.setattr(build, "_build", no_build)
    for inp in chosen.values():
        fake_image(tmp_path, inp.digest())
    default = build.build_image(tmp_path)
    got = build.build_image(tmp_path, variant="bench")
    assert got.path.name == bench.digest() != default.path.name
    assert cache.latest_image(tmp_path).path == default.path
    assert cache.latest_image(tmp_path, "bench").path == got.path


def test_only_a_variant_manifest_names_its_variant() -> None:
    common = dict(
        kernel_release="6.1.0-56-cloud-amd64",
        kernel_package="linux-image-6.1.0-56-cloud-amd64",
        kernel_package_version="6.1.192-2",
        python_version="3.11.2",
        packages={},
        debian_packages={},
        modules=[],
        cmdline="",
        input_hash="a" * 64,
        compression="zstd",
    )
    assert "variant" not in manifest.make(**common)
    assert manifest.make(**common, variant="bench")["variant"] == "bench"


def test_the_cli_takes_a_variant() -> None:
    parser = cli._parser()
    assert parser.parse_args(["image", "build"]).variant == "default"
    assert parser.parse_args(["image", "build", "--variant", "bench"]).variant == "bench"
    with pytest.raises(SystemExit):
        parser.parse_args(["image", "build", "--variant", "fast"])
