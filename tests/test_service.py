"""The systemd unit service/crop-clusterd.service: settings, systemd-analyze verify, exposure."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "service" / "crop-clusterd.service"
EXEC_PATH = "/opt/crop-clusterd/bin/crop-clusterd"
MAX_EXPOSURE = 3.0


def parse_unit(text: str) -> dict[str, list[str]]:
    """Map ``Section.Key`` to its values in order; comments and blank lines dropped."""
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {raw!r}"
        settings.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return settings


@pytest.fixture(scope="module")
def unit() -> dict[str, list[str]]:
    """The shipped unit's settings."""
    return parse_unit(UNIT.read_text(encoding="utf-8"))


def one(unit: dict[str, list[str]], key: str) -> str:
    """The single value of ``key``; fails when it is missing or repeated."""
    values = unit.get(f"Service.{key}")
    assert values is not None, f"{key}= is not set"
    assert len(values) == 1, f"{key}= is set {len(values)} times"
    return values[0]


def systemd_analyze() -> str:
    """Path of systemd-analyze; skips the test when it is absent."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    return tool


def verifiable_copy(unit_file: Path, folder: Path) -> Path:
    """Copy the unit with ExecStart's binary replaced by one that exists here.

    verify checks that ExecStart's program exists, and /opt/crop-clusterd is not
    installed on a test machine; everything else stays as shipped.
    """
    text = unit_file.read_text(encoding="utf-8")
    assert f"ExecStart={EXEC_PATH} " in text
    folder.mkdir(parents=True, exist_ok=True)
    copy = folder / unit_file.name
    copy.write_text(text.replace(f"ExecStart={EXEC_PATH} ", f"ExecStart={sys.executable} "))
    return copy


def test_service_type_and_lifecycle(unit: dict[str, list[str]]) -> None:
    """Notify service with watchdog, restarted on failure, time to drain at stop."""
    assert one(unit, "Type") == "notify"
    assert one(unit, "NotifyAccess") == "main"
    assert one(unit, "ExecStart") == f"{EXEC_PATH} run --config /etc/crop-clusterd/config.toml"
    assert one(unit, "Restart") == "on-failure"
    watchdog = one(unit, "WatchdogSec")
    assert re.fullmatch(r"\d+s?", watchdog)
    assert int(watchdog.rstrip("s")) >= 10
    stop = one(unit, "TimeoutStopSec")
    assert re.fullmatch(r"\d+s?", stop)
    assert int(stop.rstrip("s")) >= 60, "too short for the final snapshot"
    assert unit["Install.WantedBy"] == ["multi-user.target"]


def test_static_user_and_state_folder_match_the_config(unit: dict[str, list[str]]) -> None:
    """The unit's state folder is the config's default [state] folder."""
    assert one(unit, "User") == "crop-clusterd"
    assert "Service.DynamicUser" not in unit
    state = one(unit, "StateDirectory")
    config = tomllib.loads((REPO / "config.toml").read_text(encoding="utf-8"))
    assert config["state"]["folder"] == f"/var/lib/{state}"
    assert one(unit, "WorkingDirectory") == f"/var/lib/{state}"
    assert one(unit, "UMask") == "0022"


def test_sandbox_settings(unit: dict[str, list[str]]) -> None:
    """The hardening the issue asks for, with no capabilities and no network."""
    expected = {
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "NoNewPrivileges": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "RestrictAddressFamilies": "AF_UNIX",
        "RestrictNamespaces": "yes",
        "LockPersonality": "yes",
        "CapabilityBoundingSet": "",
        "DevicePolicy": "closed",
        "MemoryDenyWriteExecute": "no",
    }
    assert {key: one(unit, key) for key in expected} == expected
    assert unit["Service.SystemCallFilter"][0] == "@system-service"
    # Site paths belong in the drop-in install.sh writes, never in the shipped unit.
    assert "Service.ReadWritePaths" not in unit
    assert "Service.ReadOnlyPaths" not in unit


def test_shared_ipc_places_are_private(unit: dict[str, list[str]]) -> None:
    """/dev/shm, /dev/mqueue and /run/lock: nothing the service makes there is seen
    outside or outlives it (a real systemd showed all three exposed)."""
    assert one(unit, "PrivateIPC") == "yes"  # own IPC namespace, own /dev/mqueue
    mounts = [entry.split(":")[0] for entry in one(unit, "TemporaryFileSystem").split()]
    assert sorted(mounts) == ["/dev/shm", "/run/lock"]
    # PrivateTmp= gives /tmp and /var/tmp the same treatment.
    assert one(unit, "PrivateTmp") == "yes"


def test_devices_are_the_nvidia_nodes_only(unit: dict[str, list[str]]) -> None:
    """DeviceAllow= lists the CUDA device nodes and nothing else."""
    allowed = {value.split()[0] for value in unit["Service.DeviceAllow"]}
    for node in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools"):
        assert node in allowed
    assert all(re.fullmatch(r"(/dev/nvidia[\w-]*|char-nvidia[\w-]*)", d) for d in allowed), allowed


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """verify accepts the unit without a single warning (it only warns on unknown keys)."""
    tool = systemd_analyze()
    copy = verifiable_copy(UNIT, tmp_path)
    result = subprocess.run(
        [tool, "verify", str(copy)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""


def overall_exposure(tool: str, unit_file: Path) -> float:
    """The "Overall exposure level" systemd-analyze security reports offline."""
    result = subprocess.run(
        [tool, "security", "--offline=true", str(unit_file)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if "--offline" in result.stderr and result.returncode != 0:
        pytest.skip(f"systemd-analyze has no --offline: {result.stderr.strip()}")
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert match, f"no exposure line in: {result.stdout[-500:]} {result.stderr}"
    return float(match.group(1))


def test_security_exposure_is_low() -> None:
    """systemd-analyze security rates the shipped unit at most 3.0."""
    exposure = overall_exposure(systemd_analyze(), UNIT)
    assert exposure <= MAX_EXPOSURE


def test_exposure_check_notices_a_weaker_unit(tmp_path: Path) -> None:
    """The measurement is not blind: dropping the sandbox raises the figure."""
    tool = systemd_analyze()
    kept = [
        line
        for line in UNIT.read_text(encoding="utf-8").splitlines()
        if not line.startswith(("Protect", "Private", "Restrict", "SystemCall", "Capability"))
    ]
    weak = tmp_path / "crop-clusterd.service"
    weak.write_text("\n".join(kept) + "\n")
    assert overall_exposure(tool, weak) > overall_exposure(tool, UNIT) + 2.0
