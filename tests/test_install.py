"""install.sh: every run goes into a scratch --prefix; the real /etc, /opt, users and
systemd are never touched. The Python environment is reused (--python), so no venv
is built and nothing is downloaded."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "install.sh"
UNIT_NAME = "crop-clusterd.service"
CONF = Path("etc/crop-clusterd/config.toml")
UNIT = Path("etc/systemd/system") / UNIT_NAME
DROP_IN = Path("etc/systemd/system") / f"{UNIT_NAME}.d" / "paths.conf"
BIN = Path("opt/crop-clusterd/bin/crop-clusterd")
PATH_LINK = Path("usr/local/bin/crop-clusterd")
SCRIPT_NEXT_TO_PYTHON = Path(sys.executable).parent / "crop-clusterd"


def run_install(
    prefix: Path | None, *args: str, env: dict[str, str] | None = None, reuse: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run install.sh; with a prefix unless the test checks argument errors only."""
    argv = [shutil.which("bash") or "/bin/bash", str(SCRIPT)]
    if prefix is not None:
        argv += ["--prefix", str(prefix)]
    if reuse:
        argv += ["--python", sys.executable]
    argv += list(args)
    # A real install could only happen without --prefix and without an error
    # exit before any change; argument-error tests must fail before anything.
    assert prefix is not None or "--dry-run" in args or not reuse or "--help" in args
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env if env is not None else {**os.environ, "TMPDIR": str(prefix or "/tmp")},
    )


@pytest.fixture
def prefix(tmp_path: Path) -> Path:
    """An empty scratch root; install.sh's own temporary files go beside it."""
    if not SCRIPT_NEXT_TO_PYTHON.is_file():
        pytest.skip(f"crop-clusterd is not installed next to {sys.executable}")
    root = tmp_path / "root"
    root.mkdir()
    return root


def tree(root: Path) -> dict[str, bytes | str]:
    """Every path under root with its content (files) or link target / 'dir'."""
    found: dict[str, bytes | str] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            found[rel] = f"-> {os.readlink(path)}"
        elif path.is_dir():
            found[rel] = "dir"
        else:
            found[rel] = path.read_bytes()
    return found


def load_config(prefix: Path) -> dict[str, dict[str, object]]:
    """The installed config, parsed."""
    return tomllib.loads((prefix / CONF).read_text(encoding="utf-8"))


def drop_in_settings(prefix: Path) -> dict[str, str]:
    """The drop-in's key=value lines (each key once)."""
    settings: dict[str, str] = {}
    for line in (prefix / DROP_IN).read_text(encoding="utf-8").splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            assert key not in settings, f"{key} twice in the drop-in"
            settings[key] = value
    return settings


def test_help_names_every_option() -> None:
    """--help exits 0 and documents each flag and the pip environment variable."""
    result = run_install(None, "--help", reuse=False)
    assert result.returncode == 0, result.stderr
    for flag in ("--prefix", "--dry-run", "--python", "--model", "--model-dir", "--watch"):
        assert flag in result.stdout
    assert "CROP_CLUSTERD_PIP_ARGS" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bogus"], "unknown option '--bogus'"),
        (["--prefix"], "option --prefix needs a value"),
        (["--model", "--dry-run"], "option --model needs a value"),
        (["--model", "not a/hub id!"], "is not a Hugging Face hub id"),
        (["--watch", "relative/crops"], "--watch must be an absolute path"),
        (["--model", "a/b", "--model-dir", "/x"], "--model and --model-dir exclude each other"),
    ],
)
def test_bad_command_line_is_refused_with_exit_2(
    tmp_path: Path, args: list[str], message: str
) -> None:
    """Command-line mistakes exit 2 with a message naming the problem, changing nothing."""
    result = run_install(tmp_path, *args, reuse=False)
    assert result.returncode == 2
    assert message in result.stderr
    assert "--help" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_dry_run_lists_actions_and_changes_nothing(prefix: Path) -> None:
    """--dry-run prints each step it would take and leaves the prefix as it was."""
    (prefix / "keep.txt").write_text("untouched")
    before = tree(prefix)
    result = run_install(prefix, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert tree(prefix) == before
    out = result.stdout
    for expected in (
        "would run: useradd --system",
        f"would write: {prefix / CONF}",
        f"would write: {prefix / UNIT}",
        f"would write: {prefix / DROP_IN}",
        f"would run: ln -sfn -- {SCRIPT_NEXT_TO_PYTHON} {prefix / BIN}",
        f"would run: ln -sfn -- /opt/crop-clusterd/bin/crop-clusterd {prefix / PATH_LINK}",
        "would run: chown crop-clusterd:crop-clusterd -- /var/lib/crop-clusterd",
        "would run: systemctl enable crop-clusterd.service",
        "nothing was changed",
    ):
        assert expected in out, f"{expected!r} missing from:\n{out}"


def test_install_creates_config_folders_unit_and_drop_in(prefix: Path) -> None:
    """A run into a prefix stages everything, with the service's real paths inside."""
    result = run_install(prefix)
    assert result.returncode == 0, result.stderr

    config = load_config(prefix)
    assert config["watch"]["folder"] == "/srv/crop-clusterd/crops"
    assert config["state"]["folder"] == "/var/lib/crop-clusterd"
    assert config["output"]["folder"] == "/var/lib/crop-clusterd/output"
    assert config["log"]["format"] == "auto"
    # Everything else is the checkout's config, untouched.
    template = tomllib.loads((REPO / "config.toml").read_text(encoding="utf-8"))
    for section in ("watch", "state", "output"):
        config[section].pop("folder")
        template[section].pop("folder")
    assert config == template

    for folder in ("var/lib/crop-clusterd/output", "srv/crop-clusterd/crops"):
        assert (prefix / folder).is_dir()
    assert (prefix / UNIT).read_bytes() == (REPO / "service" / UNIT_NAME).read_bytes()
    assert drop_in_settings(prefix) == {
        "ReadOnlyPaths": "-/srv/crop-clusterd/crops",
        "ReadWritePaths": "/var/lib/crop-clusterd/output",
    }
    assert (prefix / BIN).resolve() == SCRIPT_NEXT_TO_PYTHON.resolve()
    # `crop-clusterd status` on the PATH: the link names the real path, not the prefix.
    assert os.readlink(prefix / PATH_LINK) == "/opt/crop-clusterd/bin/crop-clusterd"
    assert "skipped (--prefix), would run: systemctl daemon-reload" in result.stdout


def test_second_run_is_idempotent_and_keeps_an_edited_config(prefix: Path) -> None:
    """Rerunning changes nothing; an edited config survives and drives the drop-in."""
    assert run_install(prefix).returncode == 0
    first = tree(prefix)
    again = run_install(prefix)
    assert again.returncode == 0, again.stderr
    assert tree(prefix) == first
    assert f"unchanged: {prefix / DROP_IN}" in again.stdout

    conf = prefix / CONF
    edited = conf.read_text().replace(
        'folder = "/srv/crop-clusterd/crops"', 'folder = "/data/trap crops"'
    )
    edited = edited.replace('folder = "/var/lib/crop-clusterd/output"', 'folder = "results"')
    conf.write_text(edited)
    third = run_install(prefix, "--watch", "/ignored")
    assert third.returncode == 0, third.stderr
    assert conf.read_text() == edited
    assert "keeping the existing config" in third.stdout
    assert "--watch/--output only apply to a new config" in third.stdout
    # Relative folders resolve against the unit's WorkingDirectory, the state folder.
    assert drop_in_settings(prefix) == {
        "ReadOnlyPaths": '"-/data/trap crops"',
        "ReadWritePaths": "/var/lib/crop-clusterd/results",
    }
    assert (prefix / "data/trap crops").is_dir()
    assert (prefix / "var/lib/crop-clusterd/results").is_dir()


def test_state_folder_elsewhere_and_home_paths_are_made_reachable(prefix: Path) -> None:
    """A state folder outside /var/lib becomes writable; /home folders lift ProtectHome."""
    conf = prefix / CONF
    conf.parent.mkdir(parents=True)
    conf.write_text(
        '[watch]\nfolder = "/home/field/crops"\n'
        '[state]\nfolder = "/srv/state"\n'
        '[output]\nfolder = "/srv/out%1"\n'
    )
    result = run_install(prefix)
    assert result.returncode == 0, result.stderr
    assert drop_in_settings(prefix) == {
        "ReadOnlyPaths": "-/home/field/crops",
        "ReadWritePaths": "/srv/state /srv/out%%1",
        "ProtectHome": "read-only",
    }


def test_folders_under_tmp_are_refused(prefix: Path) -> None:
    """PrivateTmp hides /tmp from the service, so a watch folder there is an error."""
    result = run_install(prefix, "--watch", "/tmp/crops")
    assert result.returncode == 1
    assert "PrivateTmp" in result.stderr
    assert not (prefix / UNIT).exists()


def test_model_dir_is_staged_and_set_in_a_new_config(prefix: Path, tmp_path: Path) -> None:
    """--model-dir copies the folder under /opt/crop-clusterd/models and uses it."""
    model = tmp_path / "my-dino"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text('{"model_type": "dinov2"}')
    (model / "sub" / "weights.bin").write_bytes(bytes(range(256)))
    result = run_install(prefix, "--model-dir", str(model))
    assert result.returncode == 0, result.stderr
    staged = prefix / "opt/crop-clusterd/models/my-dino"
    assert tree(staged) == tree(model)
    embed = load_config(prefix)["embed"]
    assert embed["model"] == "dino"
    assert embed["from_pretrained"] == "/opt/crop-clusterd/models/my-dino"

    (model / "config.json").write_text('{"model_type": "dinov2", "changed": true}')
    (prefix / CONF).write_text('[watch]\nfolder = "/srv/c"\n')
    again = run_install(prefix, "--model-dir", str(model))
    assert again.returncode == 0, again.stderr
    assert tree(staged) == tree(model)
    assert (prefix / CONF).read_text() == '[watch]\nfolder = "/srv/c"\n'
    assert 'from_pretrained = "/opt/crop-clusterd/models/my-dino"' in again.stdout


def test_model_dir_must_hold_a_saved_model(prefix: Path, tmp_path: Path) -> None:
    """A folder without config.json is refused before anything is installed."""
    result = run_install(prefix, "--model-dir", str(tmp_path))
    assert result.returncode == 1
    assert "no config.json" in result.stderr
    assert list(prefix.iterdir()) == []


def test_hub_model_already_staged_is_not_downloaded(prefix: Path) -> None:
    """--model with its folder in place skips the download and configures it."""
    staged = prefix / "opt/crop-clusterd/models/facebook--dinov2-base"
    staged.mkdir(parents=True)
    (staged / "config.json").write_text("{}")
    env = {**os.environ, "TMPDIR": str(prefix), "HF_HUB_OFFLINE": "1"}
    result = run_install(prefix, "--model", "facebook/dinov2-base", env=env)
    assert result.returncode == 0, result.stderr
    assert "already staged" in result.stdout
    embed = load_config(prefix)["embed"]
    assert embed["from_pretrained"] == "/opt/crop-clusterd/models/facebook--dinov2-base"


def test_missing_build_packages_are_named(tmp_path: Path) -> None:
    """Building the venv without pkg-config/libsystemd-dev stops and names the packages."""
    tools = ["dirname", "mktemp", "rm", "id", "cat", "mkdir", "env"]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in tools:
        found = shutil.which(tool)
        if found is None:
            pytest.skip(f"{tool} not found")
        (bin_dir / tool).symlink_to(found)
    (bin_dir / "python3").symlink_to(sys.executable)
    root = tmp_path / "root"
    root.mkdir()
    env = {"PATH": str(bin_dir), "TMPDIR": str(tmp_path), "HOME": str(tmp_path)}
    result = run_install(root, env=env, reuse=False)
    assert result.returncode == 1
    assert "libsystemd-dev" in result.stderr
    assert "pkg-config" in result.stderr
    # hnswlib compiles C++: a C compiler alone is not enough.
    assert "g++" in result.stderr
    assert not (root / "opt").exists()


def test_installed_unit_and_drop_in_pass_verify(prefix: Path, tmp_path: Path) -> None:
    """systemd-analyze verify accepts the unit as installed, with the generated drop-in.

    verify checks that ExecStart's program exists, so the staged copy is pointed at
    the prefix's crop-clusterd; verify reads the drop-in folder beside the unit.
    """
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    result = run_install(prefix, "--watch", "/srv/my crops", "--output", "/home/a/out")
    assert result.returncode == 0, result.stderr
    units = tmp_path / "units"
    shutil.copytree(prefix / "etc/systemd/system", units)
    unit = units / UNIT_NAME
    unit.write_text(
        unit.read_text().replace(
            "ExecStart=/opt/crop-clusterd/", f"ExecStart={prefix}/opt/crop-clusterd/"
        )
    )
    checked = subprocess.run(
        [tool, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout + checked.stderr == ""
    # The check reads the drop-in: a broken line there is reported.
    with (units / f"{UNIT_NAME}.d" / "paths.conf").open("a") as f:
        f.write("ReadWritePaths=not/absolute\n")
    broken = subprocess.run(
        [tool, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert "not/absolute" in broken.stderr


def test_hub_model_download_failure_is_explained(prefix: Path) -> None:
    """Without network, --model stops with exit 1 and points at --model-dir."""
    env = {**os.environ, "TMPDIR": str(prefix), "HF_HUB_OFFLINE": "1"}
    result = run_install(prefix, "--model", "facebook/dinov2-base", env=env)
    assert result.returncode == 1
    assert "could not download facebook/dinov2-base" in result.stderr
    assert "--model-dir" in result.stderr
    assert not (prefix / CONF).exists()
    assert not (prefix / "opt/crop-clusterd/models/facebook--dinov2-base").exists()


def test_command_link_keeps_someone_elses_file(prefix: Path) -> None:
    """A program already at /usr/local/bin/crop-clusterd is not replaced; a stale
    link is repointed; a second run leaves the link alone."""
    link = prefix / PATH_LINK
    link.parent.mkdir(parents=True)
    link.write_text("#!/bin/sh\necho mine\n")
    kept = run_install(prefix)
    assert kept.returncode == 0, kept.stderr
    assert link.read_text() == "#!/bin/sh\necho mine\n"
    assert "is not a link; left alone" in kept.stdout

    link.unlink()
    link.symlink_to("/old/venv/bin/crop-clusterd")
    assert run_install(prefix).returncode == 0
    assert os.readlink(link) == "/opt/crop-clusterd/bin/crop-clusterd"
    again = run_install(prefix)
    assert f"unchanged: {link} -> /opt/crop-clusterd/bin/crop-clusterd" in again.stdout


def tool_dir(tmp_path: Path, fakes: dict[str, str]) -> Path:
    """A bin folder with the basic tools install.sh uses, linked from this machine,
    plus the given fake programs (name -> shell script body)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tools = ["dirname", "mktemp", "rm", "id", "cat", "mkdir", "env", "wc", "cmp", "cp", "mv"]
    tools += ["chmod", "stat", "readlink", "ln", "grep", "head", "tail", "tee", "sed", "basename"]
    for tool in tools:
        found = shutil.which(tool)
        if found is None:
            pytest.skip(f"{tool} not found")
        (bin_dir / tool).symlink_to(found)
    for name, body in fakes.items():
        fake = bin_dir / name
        fake.write_text(f"#!/bin/bash\n{body}\n")
        fake.chmod(0o755)
    return bin_dir


def test_dry_run_installs_compilers_and_venv_with_apt(tmp_path: Path) -> None:
    """On a bare Debian (no compilers, no pkg-config, no ensurepip) the install
    would apt-get install every build package, python3-venv included, instead of
    stopping."""
    no_ensurepip = tmp_path / "shadow"
    no_ensurepip.mkdir()
    (no_ensurepip / "ensurepip.py").write_text("raise ImportError('python3-venv missing')\n")
    bin_dir = tool_dir(
        tmp_path,
        {
            "apt-get": "echo apt-get must not run in a dry run >&2; exit 99",
            "python3": f'PYTHONPATH={no_ensurepip} exec {sys.executable} "$@"',
        },
    )
    env = {"PATH": str(bin_dir), "TMPDIR": str(tmp_path), "HOME": str(tmp_path)}
    result = run_install(None, "--dry-run", env=env, reuse=False)
    assert result.returncode == 0, result.stderr
    assert "would run: apt-get update" in result.stdout
    line = next(
        (x for x in result.stdout.splitlines() if "would run: env DEBIAN_FRONTEND" in x), ""
    )
    packages = line.split("--no-install-recommends")[-1].split()
    for package in ("g++", "pkg-config", "libsystemd-dev", "python3-venv"):
        assert package in packages, line
    assert "would run: python3" not in result.stderr
    assert "apt-get must not run" not in result.stderr
    assert "would run: ln -sfn -- /opt/crop-clusterd/bin/crop-clusterd" in result.stdout


FAKE_PYTHON = """\
if [ "$1" = -m ] && [ "$2" = venv ]; then
    mkdir -p "$4/bin" && cp "$0" "$4/bin/python" && exit 0
fi
if [ "$1" = -m ] && [ "$2" = pip ]; then
    printf '%s\\n' "$FAKE_PIP_OUTPUT"
    exit 1
fi
case "$*" in *Python.h*|*systemd.daemon*) exit 0 ;; esac
exec {python} "$@"
"""


@pytest.mark.parametrize(
    ("pip_output", "says", "not_says"),
    [
        (
            "  gcc: fatal error: cannot execute 'cc1plus': No such file or directory\n"
            "  error: command '/usr/bin/gcc' failed with exit code 1\n"
            "  ERROR: Failed building wheel for hnswlib",
            ["building a package from source failed", "cannot execute 'cc1plus'", "g++"],
            ["offline", "reach"],
        ),
        (
            "  src/hnsw.cpp:1:10: fatal error: Python.h: No such file or directory",
            ["building a package from source failed", "Python.h", "python3-dev"],
            ["offline", "reach"],
        ),
        (
            "ERROR: Could not find a version that satisfies the requirement torch==2.13.0",
            ["found no suitable package", "torch==2.13.0"],
            ["compiler", "reach"],
        ),
        (
            "WARNING: Retrying ... NewConnectionError('Failed to establish a new connection')",
            ["could not reach the package index", "NewConnectionError", "offline?"],
            ["compiler"],
        ),
    ],
)
def test_pip_failure_names_its_real_cause(
    tmp_path: Path, pip_output: str, says: list[str], not_says: list[str]
) -> None:
    """A failed pip install is explained from pip's own output: a compile error is
    shown as one (not blamed on the network), a missing package or no network as such."""
    fake_python = FAKE_PYTHON.replace("{python}", sys.executable)
    bin_dir = tool_dir(
        tmp_path,
        {"python3": fake_python, "c++": "exit 0", "cc": "exit 0", "pkg-config": "exit 0"},
    )
    root = tmp_path / "root"
    root.mkdir()
    env = {
        "PATH": str(bin_dir),
        "TMPDIR": str(tmp_path),
        "HOME": str(tmp_path),
        "FAKE_PIP_OUTPUT": pip_output,
    }
    result = run_install(root, env=env, reuse=False)
    assert result.returncode == 1, result.stderr
    assert "pip install of" in result.stderr, result.stderr
    error = result.stderr[result.stderr.index("pip install of") :]
    for text in says:
        assert text in error, error
    for text in not_says:
        assert text not in error, error
    assert not (root / CONF).exists()
