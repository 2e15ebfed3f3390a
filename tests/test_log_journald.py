"""configure_logging(fmt="journald") against a real, private systemd-journald.

The journal daemon runs as a journal namespace instance inside a private mount
namespace (``unshare --mount``) with tmpfs over /run and /var/log, so neither
its sockets nor its files touch the machine's real journal. The logging
process runs in the same mount namespace, where /run/systemd/journal is a bind
mount of the private instance's socket folder (python-systemd always sends to
/run/systemd/journal/socket), and ``journalctl --namespace`` reads the entries
back. Skips, with the reason, where python-systemd is missing or journald
cannot be started (no root or user namespaces, no journald binary).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from crop_clusterd.log import configure_logging, get_logger

# Exit codes of the namespace script that mean "cannot run here", not "broken".
_NO_MOUNT = 77
_NO_JOURNALD = 78

_SCRIPT = r"""
set -u
journald=$1 ns=$2 python=$3 helper=$4 out=$5
# Only this process's mounts: nothing below is visible outside the namespace.
mount --make-rprivate / 2>/dev/null || true
mount -t tmpfs -o mode=755 tmpfs /run || exit 77
mount -t tmpfs -o mode=755 tmpfs /var/log || exit 77
"$journald" "$ns" >"$out/journald.log" 2>&1 &
jpid=$!
trap 'kill $jpid 2>/dev/null; wait $jpid 2>/dev/null' EXIT
sock=/run/systemd/journal.$ns/socket
for _ in $(seq 200); do
    [ -S "$sock" ] && break
    kill -0 $jpid 2>/dev/null || exit 78
    sleep 0.05
done
[ -S "$sock" ] || exit 78
mkdir -p /run/systemd/journal
mount --bind "/run/systemd/journal.$ns" /run/systemd/journal || exit 77
"$python" "$helper" "$out/token" >"$out/helper.out" || exit 1
want=$(head -n 1 "$out/helper.out" | cut -d' ' -f3)
for _ in $(seq 100); do
    journalctl --namespace="$ns" -o json --no-pager "TEST_RUN=$(cat "$out/token")" \
        >"$out/entries.json" || exit 1
    [ "$(wc -l <"$out/entries.json")" -ge "$want" ] && exit 0
    sleep 0.05
done
exit 0
"""

_HELPER = r"""
import logging, os, sys
from pathlib import Path
from crop_clusterd.log import configure_logging, get_logger


def emit(token):
    log = get_logger("crop_clusterd.probe").bind(test_run=token)
    log.info("journald_probe", count=3, path=Path("/x/a.png"), ratio=0.5, note="µm long\nline two")
    log.debug("journald_probe_hidden")
    log.warning("journald_probe_warning", reason="truncated")
    try:
        1 / 0
    except ZeroDivisionError:
        log.exception("journald_probe_failed", path="/x/b.png")
    logging.getLogger("some.library").warning("library said %s", "hi", extra={"test_run": token})


chosen = configure_logging(fmt="journald", level="info", environ={})
emit(Path(sys.argv[1]).read_text())
print(chosen, os.getpid(), 4, flush=True)
"""


def _helper_line(text: str) -> int:
    """Line number, in the written helper file, of the first line containing ``text``."""
    return next(i for i, line in enumerate(_HELPER.splitlines(), 1) if text in line)


# Where each entry's log call is, for CODE_LINE.
_HELPER_LINES = {
    "journald_probe": _helper_line('info("journald_probe"'),
    "journald_probe_warning": _helper_line('warning("journald_probe_warning"'),
    "journald_probe_failed": _helper_line('exception("journald_probe_failed"'),
    "library said hi": _helper_line('warning("library said %s"'),
}


def _journald_binary() -> str | None:
    for candidate in ("/lib/systemd/systemd-journald", "/usr/lib/systemd/systemd-journald"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.fixture(scope="module")
def journal_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run the helper against a private journald once; entries keyed by EVENT."""
    pytest.importorskip(
        "systemd.journal",
        reason="python-systemd not installed (pip install -e '.[systemd]', needs libsystemd-dev)",
    )
    if not sys.platform.startswith("linux"):
        pytest.skip("journald exists on Linux only")
    journald = _journald_binary()
    if journald is None:
        pytest.skip("systemd-journald not found in /lib/systemd or /usr/lib/systemd")
    for tool in ("unshare", "mount", "journalctl"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not found; needed to run a private journald")
    if not Path("/etc/machine-id").is_file():
        pytest.skip("no /etc/machine-id; journald refuses to start without one")
    unshare = ["unshare", "--mount", "--propagation", "private"]
    if os.geteuid() != 0:
        # Mounting needs root; a user namespace gives that where the kernel allows it.
        unshare[1:1] = ["--user", "--map-root-user"]

    out = tmp_path_factory.mktemp("journald")
    token = secrets.token_hex(8)
    (out / "token").write_text(token)
    helper = out / "helper.py"
    helper.write_text(_HELPER)
    script = out / "run.sh"
    script.write_text(_SCRIPT)
    namespace = f"crop-clusterd-test-{token}"
    argv = [*unshare, "bash", str(script), journald, namespace, sys.executable, str(helper)]
    proc = subprocess.Popen(
        [*argv, str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # so a timeout can kill journald too
        cwd=out,
        text=True,
    )
    try:
        output, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"private journald run timed out:\n{output}")
    journald_log = (out / "journald.log").read_text() if (out / "journald.log").exists() else ""
    if proc.returncode == _NO_MOUNT or (proc.returncode != 0 and "unshare:" in output):
        pytest.skip(f"cannot make a private mount namespace here: {output.strip()[-300:]}")
    if proc.returncode == _NO_JOURNALD:
        pytest.skip(f"systemd-journald did not start: {(journald_log or output).strip()[-300:]}")
    assert proc.returncode == 0, f"journald run failed ({proc.returncode}):\n{output}"
    chosen, pid, count = (out / "helper.out").read_text().split()
    entries = [json.loads(line) for line in (out / "entries.json").read_text().splitlines()]
    assert len(entries) == int(count), f"{entries}\n{output}"
    return {
        "chosen": chosen,
        "pid": pid,
        "token": token,
        "helper": str(helper),
        "by_event": {e.get("EVENT", e["MESSAGE"]): e for e in entries},
    }


def test_journald_is_chosen_and_entries_come_from_our_process(journal_run: dict[str, Any]) -> None:
    assert journal_run["chosen"] == "journald"
    for entry in journal_run["by_event"].values():
        assert entry["_TRANSPORT"] == "journal"  # the native protocol, not stdout
        assert entry["_PID"] == journal_run["pid"]
        assert entry["SYSLOG_IDENTIFIER"] == "crop-clusterd"
        assert entry["TEST_RUN"] == journal_run["token"]


def test_info_entry_carries_message_priority_and_fields(journal_run: dict[str, Any]) -> None:
    entry = journal_run["by_event"]["journald_probe"]
    assert entry["MESSAGE"].startswith("journald_probe ")
    assert "count=3" in entry["MESSAGE"]
    assert entry["PRIORITY"] == "6"
    assert entry["LOGGER"] == "crop_clusterd.probe"
    assert entry["COUNT"] == "3"
    assert entry["PATH"] == "/x/a.png"
    assert entry["RATIO"] == "0.5"
    assert entry["NOTE"] == "µm long\nline two"  # non-ASCII and newlines survive
    assert "journald_probe_hidden" not in journal_run["by_event"]  # below the level


def test_warning_and_exception_priorities(journal_run: dict[str, Any]) -> None:
    warning = journal_run["by_event"]["journald_probe_warning"]
    assert warning["PRIORITY"] == "4"
    assert warning["REASON"] == "truncated"
    failed = journal_run["by_event"]["journald_probe_failed"]
    assert failed["PRIORITY"] == "3"
    assert "ZeroDivisionError" in failed["EXCEPTION"]
    assert "Traceback" in failed["MESSAGE"]
    assert failed["PATH"] == "/x/b.png"


def test_stdlib_records_reach_the_journal(journal_run: dict[str, Any]) -> None:
    entry = journal_run["by_event"]["library said hi"]
    assert entry["PRIORITY"] == "4"
    assert entry["LOGGER"] == "some.library"


def test_entries_name_the_log_call_not_the_renderer(journal_run: dict[str, Any]) -> None:
    # python-systemd fills CODE_* with its caller unless given: that was log.py for every entry.
    for event, line in _HELPER_LINES.items():
        entry = journal_run["by_event"][event]
        assert entry["CODE_FILE"] == journal_run["helper"], event
        assert entry["CODE_FUNC"] == "emit", event
        assert entry["CODE_LINE"] == str(line), event


@pytest.mark.usefixtures("restore_logging")
def test_code_location_reaches_the_sender_without_python_systemd() -> None:
    entries: list[dict[str, Any]] = []

    def sender(**fields: Any) -> None:
        entries.append(fields)

    configure_logging("journald", "info", environ={}, sender=sender)
    line = sys._getframe().f_lineno + 1
    get_logger("crop_clusterd.t").info("located", code_line="user value")
    logging.getLogger("other").warning("foreign")
    located, foreign = entries
    assert located["CODE_FILE"] == __file__
    assert located["CODE_LINE"] == line  # python-systemd formats it with {:d}
    assert located["CODE_FUNC"] == "test_code_location_reaches_the_sender_without_python_systemd"
    assert located["F_CODE_LINE"] == "user value"  # a user field cannot forge the location
    assert foreign["CODE_LINE"] == line + 1
