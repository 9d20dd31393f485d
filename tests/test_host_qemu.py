"""The QEMU command line and the choice of accelerator (no VM is started)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bulkhead.qemu import (
    AccelChoice,
    QemuConfig,
    build_command,
    choose_accel,
    choose_transport,
    kernel_cmdline,
    load_verdict,
    probe_kvm,
    save_verdict,
)


def config(tmp_path: Path, **changes) -> QemuConfig:
    values = dict(
        kernel=tmp_path / "vmlinuz",
        initrd=tmp_path / "initramfs.img",
        cmdline="console=ttyS0 quiet",
        accel="tcg",
        console_log=tmp_path / "console.log",
        console_socket=tmp_path / "console.sock",
        serial_socket=tmp_path / "serial.sock",
        qmp_socket=tmp_path / "qmp.sock",
        vsock_cid=7,
    )
    values.update(changes)
    return QemuConfig(**values)


def option(cmd: list[str], flag: str) -> list[str]:
    """Every value given to ``flag``."""
    return [cmd[i + 1] for i, word in enumerate(cmd) if word == flag]


def test_a_plain_sandbox_command(tmp_path: Path) -> None:
    cmd = build_command(config(tmp_path, memory_mib=768, cpus=3), vhost_vsock=False)
    assert cmd[0] == "qemu-system-x86_64"
    for flag in ("-nodefaults", "-no-user-config", "-no-reboot"):
        assert flag in cmd
    assert option(cmd, "-display") == ["none"]
    assert option(cmd, "-machine") == ["q35"]
    assert option(cmd, "-accel") == ["tcg"]
    assert option(cmd, "-m") == ["768"]
    assert option(cmd, "-smp") == ["3"]
    assert option(cmd, "-kernel") == [str(tmp_path / "vmlinuz")]
    assert option(cmd, "-initrd") == [str(tmp_path / "initramfs.img")]
    assert option(cmd, "-append") == ["console=ttyS0 quiet"]
    assert "virtio-rng-pci" in option(cmd, "-device")


def test_the_agent_gets_a_named_virtio_serial_port(tmp_path: Path) -> None:
    cmd = build_command(config(tmp_path), vhost_vsock=False)
    devices = option(cmd, "-device")
    chardevs = option(cmd, "-chardev")
    assert "virtio-serial-pci,id=vser0" in devices
    assert "virtserialport,bus=vser0.0,chardev=agent,name=bulkhead.agent" in devices
    assert f"socket,id=agent,path={tmp_path}/serial.sock,server=on,wait=off" in chardevs


def test_console_is_a_socket_logged_to_a_file_and_qmp_a_socket(tmp_path: Path) -> None:
    cmd = build_command(config(tmp_path), vhost_vsock=False)
    chardevs = option(cmd, "-chardev")
    assert (
        f"socket,id=console,path={tmp_path}/console.sock,server=on,wait=off,"
        f"logfile={tmp_path}/console.log"
    ) in chardevs
    assert option(cmd, "-serial") == ["chardev:console"]
    assert f"socket,id=qmp,path={tmp_path}/qmp.sock,server=on,wait=off" in chardevs
    assert option(cmd, "-mon") == ["chardev=qmp,mode=control"]


@pytest.mark.parametrize("vhost_vsock", [False, True])
def test_vsock_only_where_the_host_has_vhost_vsock(tmp_path: Path, vhost_vsock: bool) -> None:
    cmd = build_command(config(tmp_path, vsock_cid=9), vhost_vsock=vhost_vsock)
    vsock = [d for d in option(cmd, "-device") if "vsock" in d]
    assert vsock == (["vhost-vsock-pci,guest-cid=9"] if vhost_vsock else [])


def test_a_vhost_user_vsock_device_replaces_vhost_and_needs_shared_memory(
    tmp_path: Path,
) -> None:
    sock = tmp_path / "vhost-vsock.sock"
    cmd = build_command(
        config(tmp_path, vhost_user_vsock_socket=sock, shared_memory=True), vhost_vsock=True
    )
    assert [d for d in option(cmd, "-device") if "vsock" in d] == [
        "vhost-user-vsock-pci,chardev=bh-vsock"
    ]
    assert f"socket,id=bh-vsock,path={sock}" in option(cmd, "-chardev")
    assert any("share=on" in o for o in option(cmd, "-object"))
    with pytest.raises(ValueError, match="shared_memory"):
        build_command(config(tmp_path, vhost_user_vsock_socket=sock), vhost_vsock=False)


@pytest.mark.parametrize(
    ("requested", "vhost", "chosen"),
    [
        ("auto", True, "vhost-vsock"),
        ("auto", False, "serial"),
        ("vsock", True, "vhost-vsock"),
        ("vsock", False, "vhost-user-vsock"),
        ("vhost-user-vsock", True, "vhost-user-vsock"),
        ("serial", True, "serial"),
    ],
)
def test_transport_choice(requested: str, vhost: bool, chosen: str) -> None:
    assert choose_transport(requested, vhost=vhost) == chosen


def test_transport_from_the_environment_and_bad_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BULKHEAD_TRANSPORT", "vsock")
    assert choose_transport(None, vhost=False) == "vhost-user-vsock"
    assert choose_transport("serial", vhost=False) == "serial"  # an explicit one wins
    monkeypatch.setenv("BULKHEAD_TRANSPORT", "carrier-pigeon")
    with pytest.raises(ValueError, match=r"transport must be one of .*'carrier-pigeon'"):
        choose_transport(None, vhost=False)
    with pytest.raises(ValueError, match="/dev/vhost-vsock"):
        choose_transport("vhost-vsock", vhost=False)


def test_no_vsock_without_a_cid(tmp_path: Path) -> None:
    cmd = build_command(config(tmp_path, vsock_cid=None), vhost_vsock=True)
    assert not [d for d in option(cmd, "-device") if "vsock" in d]


def test_tcg_never_uses_the_host_cpu(tmp_path: Path) -> None:
    assert option(build_command(config(tmp_path), vhost_vsock=False), "-cpu") == ["max"]
    with pytest.raises(ValueError, match="host needs KVM"):
        build_command(config(tmp_path, cpu="host"), vhost_vsock=False)


def test_kvm_uses_the_cpu_model_the_probe_chose(tmp_path: Path) -> None:
    cfg = config(tmp_path).with_accel(AccelChoice("kvm", "host", "probe"))
    cmd = build_command(cfg, vhost_vsock=False)
    assert option(cmd, "-accel") == ["kvm"]
    assert option(cmd, "-cpu") == ["host"]
    cfg = config(tmp_path).with_accel(AccelChoice("kvm", "max", "forced"))
    assert option(build_command(cfg, vhost_vsock=False), "-cpu") == ["max"]


def test_accel_must_be_resolved_first(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="resolved"):
        build_command(config(tmp_path, accel="auto"), vhost_vsock=False)


def test_microvm_uses_mmio_devices(tmp_path: Path) -> None:
    cmd = build_command(config(tmp_path, machine="microvm"), vhost_vsock=True)
    devices = option(cmd, "-device")
    assert option(cmd, "-machine") == ["microvm"]
    assert "virtio-serial-device,id=vser0" in devices
    assert "vhost-vsock-device,guest-cid=7" in devices
    assert "virtio-rng-device" in devices
    assert not [d for d in devices if d.endswith("-pci") or "-pci," in d]


def test_commas_in_paths_are_escaped(tmp_path: Path) -> None:
    odd = tmp_path / "a,b"
    cmd = build_command(config(odd), vhost_vsock=False)
    assert f"socket,id=agent,path={tmp_path}/a,,b/serial.sock,server=on,wait=off" in option(
        cmd, "-chardev"
    )


def test_config_survives_state_json(tmp_path: Path) -> None:
    cfg = config(tmp_path, extra_args=("-S",), cpu="max")
    again = QemuConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert build_command(again, vhost_vsock=False) == build_command(cfg, vhost_vsock=False)


def test_kernel_cmdline_composition() -> None:
    line = kernel_cmdline(
        "console=ttyS0 quiet bulkhead.serial_port=old",
        {"serial_port": "bulkhead.agent", "vsock_port": 0, "debug_console": True},
        ["bulkhead.bogus=1"],
    )
    assert line.split() == [
        "console=ttyS0",
        "quiet",
        "bulkhead.serial_port=bulkhead.agent",
        "bulkhead.vsock_port=0",
        "bulkhead.debug_console=on",
        "bulkhead.bogus=1",
    ]
    # The driver wires the console to the first serial port; say so if the image did not.
    assert kernel_cmdline("quiet", {}).split() == ["quiet", "console=ttyS0"]


# --- accelerator choice -------------------------------------------------------


def test_explicit_accel_wins_over_the_environment(tmp_path: Path) -> None:
    env = {"BULKHEAD_ACCEL": "kvm"}
    choice = choose_accel("tcg", cache_file=tmp_path / "kvm.json", env=env)
    assert (choice.accel, choice.cpu) == ("tcg", "max")


def test_environment_forces_auto(tmp_path: Path) -> None:
    # No kernel and no cache: a probe would fail, so none may happen.
    choice = choose_accel("auto", cache_file=tmp_path / "kvm.json", env={"BULKHEAD_ACCEL": "tcg"})
    assert (choice.accel, choice.cpu) == ("tcg", "max")
    assert "BULKHEAD_ACCEL" in choice.reason
    choice = choose_accel("auto", cache_file=tmp_path / "kvm.json", env={"BULKHEAD_ACCEL": "KVM"})
    assert (choice.accel, choice.cpu) == ("kvm", "max")


def test_bad_accel_names_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="accel must be one of"):
        choose_accel("hvf", env={})
    with pytest.raises(ValueError, match="'xen'"):
        choose_accel("auto", env={"BULKHEAD_ACCEL": "xen"})


def test_a_cached_verdict_is_used_without_probing(tmp_path: Path) -> None:
    cache = tmp_path / "kvm.json"
    save_verdict(cache, AccelChoice("kvm", "host", "probe booted the kernel"))
    # The kernel does not exist: only the cache can answer.
    choice = choose_accel("auto", kernel=tmp_path / "missing", cache_file=cache, env={})
    assert (choice.accel, choice.cpu) == ("kvm", "host")
    assert choice.reason.startswith("cached:")
    # Forcing KVM keeps the CPU model the probe found to work.
    forced = choose_accel("kvm", cache_file=cache, env={})
    assert (forced.accel, forced.cpu) == ("kvm", "host")


def test_a_verdict_from_another_boot_is_ignored(tmp_path: Path) -> None:
    cache = tmp_path / "kvm.json"
    save_verdict(cache, AccelChoice("kvm", "host", "probe"))
    data = json.loads(cache.read_text())
    data["key"]["boot_id"] = "00000000-0000-0000-0000-000000000000"
    cache.write_text(json.dumps(data))
    assert load_verdict(cache) is None
    # And without a cache, forcing KVM does not dare -cpu host.
    assert choose_accel("kvm", cache_file=cache, env={}).cpu == "max"


def test_a_corrupt_cache_is_ignored(tmp_path: Path) -> None:
    cache = tmp_path / "kvm.json"
    cache.write_text("{not json")
    assert load_verdict(cache) is None


def test_probe_without_a_usable_dev_kvm_says_tcg_at_once(tmp_path: Path) -> None:
    choice = probe_kvm(tmp_path / "vmlinuz", dev_kvm=tmp_path / "no-kvm", cache_file=None)
    assert (choice.accel, choice.cpu) == ("tcg", "max")
    assert "no-kvm" in choice.reason


@pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="needs /dev/kvm")
def test_probe_refuses_a_missing_kernel_rather_than_caching_a_verdict(tmp_path: Path) -> None:
    cache = tmp_path / "kvm.json"
    with pytest.raises(FileNotFoundError, match="missing"):
        probe_kvm(tmp_path / "missing", cache_file=cache)
    assert not cache.exists()
