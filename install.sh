#!/usr/bin/env bash
# Install crop-clusterd as a systemd service. Run `./install.sh --help`.
if [ -z "${BASH_VERSION:-}" ]; then
    echo "install.sh: run it with bash (./install.sh or bash install.sh), not sh" >&2
    exit 1
fi
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: sudo ./install.sh [OPTIONS]

Install crop-clusterd from this checkout as the systemd service crop-clusterd:
  - the system user and group crop-clusterd (no login, home /var/lib/crop-clusterd);
  - a virtual environment in /opt/crop-clusterd with this checkout installed
    (pip install '<checkout>[systemd]'); the service runs
    /opt/crop-clusterd/bin/crop-clusterd;
  - /etc/crop-clusterd/config.toml, from the checkout's config.toml with the
    service paths filled in ([watch] folder, [state] folder, [output] folder,
    [log] format = "auto"). An existing config is never overwritten;
  - the state folder /var/lib/crop-clusterd and the output folder, owned by
    crop-clusterd; the watch folder is created when missing (make it writable
    for whoever runs flat-bug);
  - /etc/systemd/system/crop-clusterd.service and the drop-in
    crop-clusterd.service.d/paths.conf, written from the config (read-only
    access to the watch folder, write access to the output folder);
  - systemctl daemon-reload and enable (skipped, with a note, when systemd is
    not running as PID 1). The service is not started: `systemctl start
    crop-clusterd` when the config suits you.
Running it again is safe: it updates the package, unit and drop-in, and keeps
the config. After editing [watch] folder, [output] folder or [state] folder in
the config, run it again to rewrite the drop-in.

Options:
  --model HUB_ID     Download a Hugging Face model (e.g. facebook/dinov2-base;
                     needs network) and its image processor into
                     /opt/crop-clusterd/models/<HUB_ID with / as -->, for offline
                     use; a new config gets [embed] model = "dino" and
                     from_pretrained = <that folder>; for an existing config the
                     lines to add are printed. Already staged: not downloaded again.
  --model-dir PATH   Stage a model folder brought in by hand (save_pretrained
                     output, with config.json): copied to
                     /opt/crop-clusterd/models/<folder name>; config as --model.
  --watch DIR        Watch folder for a new config (absolute).
                     Default: /srv/crop-clusterd/crops.
  --output DIR       Output folder for a new config (absolute).
                     Default: /var/lib/crop-clusterd/output.
  --python PY        Reuse the Python environment of interpreter PY (crop-clusterd
                     already installed in it) instead of building the venv:
                     /opt/crop-clusterd/bin/crop-clusterd becomes a link to the
                     crop-clusterd script next to PY. Works offline, in seconds.
  --prefix DIR       Stage everything under DIR as if it were / (for CI and
                     packaging): files and folders go to DIR/etc, DIR/opt, DIR/var,
                     but their contents name the real paths; no user is created,
                     nothing is chowned, apt-get and systemctl are not run (what
                     would be run is printed). Root is not needed.
  --dry-run          Print every action and change nothing.
  -h, --help         Show this help.

Environment:
  CROP_CLUSTERD_PIP_ARGS  Extra arguments for pip install, split on spaces, e.g.
                          "--no-index --find-links /srv/wheels" for an offline
                          install, or an --extra-index-url for a CUDA torch build.
  PYTHON                  Interpreter that creates the venv (>= 3.11). Default: python3.

Building the venv compiles hnswlib (C++; no wheel for most platforms) and
systemd-python (the [systemd] extra, C against libsystemd): it needs the
Debian/Ubuntu packages g++, python3-dev, python3-venv, pkg-config and
libsystemd-dev. Missing ones are installed with apt-get when it exists;
otherwise the install stops and names them. A failed build shows the compiler's
error lines.

After the install, /usr/local/bin/crop-clusterd links to the service's
crop-clusterd, so `crop-clusterd status` works from any shell.

Exit status: 0 done, 1 failed, 2 bad command line.
EOF
}

# Paths as the service sees them. With --prefix they are staged under the prefix.
readonly APP_DIR=/opt/crop-clusterd
readonly MODELS_DIR=$APP_DIR/models
readonly CONF_DIR=/etc/crop-clusterd
readonly CONF=$CONF_DIR/config.toml
readonly STATE_DIR=/var/lib/crop-clusterd
readonly UNIT_DIR=/etc/systemd/system
readonly UNIT_NAME=crop-clusterd.service
readonly SERVICE_USER=crop-clusterd
readonly DEFAULT_WATCH=/srv/crop-clusterd/crops
readonly DEFAULT_OUTPUT=$STATE_DIR/output
readonly APT_PACKAGES="g++ python3-dev python3-venv pkg-config libsystemd-dev"
readonly PATH_LINK=/usr/local/bin/crop-clusterd

CHECKOUT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PREFIX=""
DRY_RUN=0
REUSE_PYTHON=""
MODEL_ID=""
MODEL_SRC=""
WATCH=""
OUTPUT=""
BASE_PYTHON=${PYTHON:-python3}
TMP_WORK=""

say() { printf 'install.sh: %s\n' "$*"; }
die() {
    printf 'install.sh: error: %s\n' "$*" >&2
    exit 1
}
usage_error() {
    printf 'install.sh: %s (see ./install.sh --help)\n' "$*" >&2
    exit 2
}
cleanup() { if [ -n "$TMP_WORK" ]; then rm -rf -- "$TMP_WORK"; fi; }
trap cleanup EXIT

# Print a command the way a shell would read it.
show() {
    local out="" arg
    for arg in "$@"; do out+=" $(printf '%q' "$arg")"; done
    printf '%s' "${out# }"
}

# A change to files under the target root: printed, then run unless --dry-run.
act() {
    if [ "$DRY_RUN" = 1 ]; then
        say "would run: $(show "$@")"
    else
        say "run: $(show "$@")"
        "$@"
    fi
}

# A change to the running system (users, ownership, packages, systemd): not
# done under --prefix or --dry-run, only printed.
system_act() {
    if [ -n "$PREFIX" ]; then
        say "skipped (--prefix), would run: $(show "$@")"
    elif [ "$DRY_RUN" = 1 ]; then
        say "would run: $(show "$@")"
    else
        say "run: $(show "$@")"
        "$@"
    fi
}

# Where a target path lives on this machine: under the prefix, if any.
staged() { printf '%s%s' "$PREFIX" "$1"; }

# Write stdin to staged path $1 (target path) with mode $2, only when different.
write_file() {
    local target=$1 mode=$2 dest tmp
    dest=$(staged "$target")
    tmp=$(mktemp "$TMP_WORK/content.XXXXXX")
    cat >"$tmp"
    if [ -f "$dest" ] && cmp -s "$tmp" "$dest"; then
        say "unchanged: $dest"
        return 0
    fi
    if [ "$DRY_RUN" = 1 ]; then
        say "would write: $dest ($(wc -l <"$tmp") lines, mode $mode)"
        return 0
    fi
    mkdir -p -- "$(dirname "$dest")"
    # Written next to the destination, then renamed: never a half-written file.
    local part="$dest.install-tmp"
    cp -- "$tmp" "$part"
    chmod "$mode" "$part"
    mv -f -- "$part" "$dest"
    say "wrote: $dest"
}

make_dir() {
    local dest
    dest=$(staged "$1")
    if [ -d "$dest" ]; then
        say "exists: $dest"
    else
        act mkdir -p -m "$2" -- "$dest"
    fi
}

need_value() {
    if [ $# -lt 2 ] || [ -z "$2" ] || [[ $2 == --* ]]; then
        usage_error "option $1 needs a value"
    fi
}

parse_args() {
    while [ $# -gt 0 ]; do
        case $1 in
        -h | --help)
            usage
            exit 0
            ;;
        --dry-run) DRY_RUN=1 ;;
        --prefix | --python | --model | --model-dir | --watch | --output)
            need_value "$@"
            case $1 in
            --prefix) PREFIX=$2 ;;
            --python) REUSE_PYTHON=$2 ;;
            --model) MODEL_ID=$2 ;;
            --model-dir) MODEL_SRC=$2 ;;
            --watch) WATCH=$2 ;;
            --output) OUTPUT=$2 ;;
            esac
            shift
            ;;
        --prefix=* | --python=* | --model=* | --model-dir=* | --watch=* | --output=*)
            local opt=${1%%=*}
            parse_args "$opt" "${1#*=}"
            ;;
        *) usage_error "unknown option '$1'" ;;
        esac
        shift
    done
}

# Fail early, before anything changes, on every mistake that can be seen now.
check_args() {
    if [ -n "$PREFIX" ]; then
        case $PREFIX in /*) ;; *) PREFIX=$(pwd)/$PREFIX ;; esac
        PREFIX=${PREFIX%/}
        if [ -z "$PREFIX" ]; then
            usage_error "--prefix / is the real root; leave --prefix out instead"
        fi
    fi
    if [ -n "$MODEL_ID" ] && [ -n "$MODEL_SRC" ]; then
        usage_error "--model and --model-dir exclude each other"
    fi
    if [ -n "$MODEL_ID" ] && ! [[ $MODEL_ID =~ ^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$ ]]; then
        usage_error "--model '$MODEL_ID' is not a Hugging Face hub id like facebook/dinov2-base"
    fi
    if [ -n "$MODEL_SRC" ]; then
        [ -d "$MODEL_SRC" ] || die "--model-dir $MODEL_SRC: no such folder"
        [ -f "$MODEL_SRC/config.json" ] ||
            die "--model-dir $MODEL_SRC: not a saved Hugging Face model (no config.json)"
        MODEL_SRC=$(cd "$MODEL_SRC" && pwd)
    fi
    local opt path
    for opt in watch output; do
        if [ "$opt" = watch ]; then path=$WATCH; else path=$OUTPUT; fi
        case $path in
        "" | /*) ;;
        *) usage_error "--$opt must be an absolute path, got '$path'" ;;
        esac
    done
    if [ -n "$REUSE_PYTHON" ]; then
        case $REUSE_PYTHON in /*) ;; *) REUSE_PYTHON=$(pwd)/$REUSE_PYTHON ;; esac
        [ -x "$REUSE_PYTHON" ] || die "--python $REUSE_PYTHON: not an executable"
        "$REUSE_PYTHON" -c 'import crop_clusterd' 2>/dev/null ||
            die "--python $REUSE_PYTHON: crop_clusterd is not importable there; install the package into that environment first"
        [ -x "$(dirname "$REUSE_PYTHON")/crop-clusterd" ] ||
            die "--python $REUSE_PYTHON: no crop-clusterd script next to it in $(dirname "$REUSE_PYTHON")"
    fi
    local f
    for f in pyproject.toml config.toml service/$UNIT_NAME; do
        [ -f "$CHECKOUT/$f" ] || die "not a crop-clusterd checkout: $CHECKOUT/$f is missing"
    done
    if [ -z "$PREFIX" ] && [ "$DRY_RUN" = 0 ] && [ "$(id -u)" != 0 ]; then
        die "installing into / needs root (sudo ./install.sh); try --dry-run or --prefix DIR"
    fi
}

# An interpreter >= 3.11 (tomllib) for the helper snippets: the environment the
# service runs, or the base interpreter while that does not exist yet.
pick_helper_python() {
    local venv_py
    venv_py=$(staged "$APP_DIR/bin/python")
    if [ -n "$REUSE_PYTHON" ]; then
        HELPER_PY=$REUSE_PYTHON
    elif [ -x "$venv_py" ]; then
        HELPER_PY=$venv_py
    else
        command -v "$BASE_PYTHON" >/dev/null ||
            die "$BASE_PYTHON not found; install Python >= 3.11 or set PYTHON=/path/to/python3.11"
        HELPER_PY=$(command -v "$BASE_PYTHON")
    fi
    "$HELPER_PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
        die "$HELPER_PY is older than Python 3.11, which crop-clusterd needs; set PYTHON=/path/to/python3.11"
}

ensure_user() {
    say "== service user"
    if [ -z "$PREFIX" ] && getent passwd "$SERVICE_USER" >/dev/null; then
        say "user $SERVICE_USER exists"
        return 0
    fi
    local nologin=/usr/sbin/nologin
    [ -x "$nologin" ] || nologin=/bin/false
    if [ -z "$PREFIX" ] && [ "$DRY_RUN" = 0 ]; then
        command -v useradd >/dev/null || die "useradd not found; create the system user $SERVICE_USER by hand"
    fi
    system_act useradd --system --user-group --home-dir "$STATE_DIR" --no-create-home \
        --shell "$nologin" --comment "crop-clusterd service" "$SERVICE_USER"
}

# The Debian package that provides part $1 (venv, dev) for $HELPER_PY: python3-X
# for the distribution's python3, python3.N-X for another interpreter.
python_package() {
    local version
    version=$("$HELPER_PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    if [ "$(command -v python3 2>/dev/null)" = "$HELPER_PY" ] ||
        [ "$(python3 -c 'import sys; print(sys.executable)' 2>/dev/null)" = "$HELPER_PY" ]; then
        printf 'python3-%s' "$1"
    else
        printf 'python%s-%s' "$version" "$1"
    fi
}

# What building the venv needs; prints the missing Debian packages. hnswlib has
# no wheel for most platforms and compiles C++; systemd-python compiles C
# against libsystemd; both need the Python headers. A compiler counts only when
# it really compiles, since Debian's gcc without g++ cannot build C++.
missing_build_packages() {
    local missing=()
    command -v pkg-config >/dev/null || missing+=(pkg-config)
    if ! command -v pkg-config >/dev/null || ! pkg-config --exists libsystemd; then
        missing+=(libsystemd-dev)
    fi
    # A file, not a pipe: with pipefail a compiler that exits before reading all
    # of stdin would fail the probe through SIGPIPE.
    printf '#include <vector>\nint main() { return std::vector<int>().size(); }\n' \
        >"$TMP_WORK/cxx-probe.cpp"
    if ! command -v c++ >/dev/null ||
        ! c++ "$TMP_WORK/cxx-probe.cpp" -o "$TMP_WORK/cxx-probe" >/dev/null 2>&1; then
        missing+=(g++)
    fi
    command -v cc >/dev/null || command -v gcc >/dev/null || missing+=(gcc)
    "$HELPER_PY" -c 'import os, sys, sysconfig
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' ||
        missing+=("$(python_package dev)")
    if [ ! -x "$(staged "$APP_DIR/bin/python")" ] && ! "$HELPER_PY" -c 'import ensurepip' 2>/dev/null; then
        missing+=("$(python_package venv)")
    fi
    printf '%s\n' "${missing[*]:-}"
}

# Install the missing build packages with apt-get, or stop and name them.
ensure_build_packages() {
    local missing
    missing=$(missing_build_packages)
    [ -n "$missing" ] || return 0
    if [ -n "$PREFIX" ] || ! command -v apt-get >/dev/null; then
        die "building the environment needs the packages $missing (Debian/Ubuntu names; all of them: $APT_PACKAGES); install them and run install.sh again, or use --python"
    fi
    say "building the environment needs these packages: $missing"
    system_act apt-get update ||
        die "apt-get update failed (see its output above); install $missing by hand and run install.sh again"
    # shellcheck disable=SC2086  # one word per package
    system_act env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $missing ||
        die "apt-get install $missing failed (see its output above); install them by hand and run install.sh again"
}

# Why pip failed, from its output in file $1: a compile error, a package the
# index does not have, or the network, each with the lines that show it.
explain_pip_failure() {
    local log=$1 lines
    lines=$(grep -E "fatal error|error: command|cannot execute|No such file or directory.*\.h|error: '|Failed building wheel|Failed to build" "$log" | head -n 8 || true)
    if [ -n "$lines" ]; then
        printf 'building a package from source failed; the compiler said:\n%s\n' "$lines"
        printf 'it needs %s (installed by install.sh when apt-get exists)' "$APT_PACKAGES"
        return 0
    fi
    lines=$(grep -E "No matching distribution|Could not find a version" "$log" | head -n 4 || true)
    if [ -n "$lines" ]; then
        printf 'pip found no suitable package:\n%s\n' "$lines"
        printf "check the index (CROP_CLUSTERD_PIP_ARGS, e.g. '--no-index --find-links DIR') or use --python"
        return 0
    fi
    lines=$(grep -E "NewConnectionError|Name or service not known|Temporary failure in name resolution|Network is unreachable|ConnectTimeout|ReadTimeout|ProxyError|SSLError|CERTIFICATE_VERIFY_FAILED" "$log" | head -n 4 || true)
    if [ -n "$lines" ]; then
        printf 'pip could not reach the package index:\n%s\n' "$lines"
        printf "offline? set CROP_CLUSTERD_PIP_ARGS, e.g. '--no-index --find-links DIR', or use --python"
        return 0
    fi
    printf 'its last lines:\n%s' "$(tail -n 8 "$log")"
}

ensure_environment() {
    say "== Python environment"
    local bin_dir script
    bin_dir=$(staged "$APP_DIR/bin")
    if [ -n "$REUSE_PYTHON" ]; then
        script=$(dirname "$REUSE_PYTHON")/crop-clusterd
        say "reusing the environment of $REUSE_PYTHON (no venv is built)"
        "$REUSE_PYTHON" -c 'import systemd.journal' 2>/dev/null ||
            say "note: no systemd-python there: the service logs plain lines to the journal"
        if [ -L "$bin_dir/crop-clusterd" ] && [ "$(readlink "$bin_dir/crop-clusterd")" = "$script" ]; then
            say "unchanged: $bin_dir/crop-clusterd -> $script"
            return 0
        fi
        make_dir "$APP_DIR/bin" 0755
        act ln -sfn -- "$script" "$bin_dir/crop-clusterd"
        return 0
    fi

    local venv venv_py
    venv=$(staged "$APP_DIR")
    venv_py=$venv/bin/python
    if [ -x "$venv_py" ] && "$venv_py" -c 'import systemd.daemon, hnswlib' 2>/dev/null; then
        say "systemd-python and hnswlib are already built in $venv"
    else
        ensure_build_packages
    fi
    if [ -x "$venv_py" ]; then
        say "venv exists: $venv"
    else
        act "$HELPER_PY" -m venv -- "$venv" || die "$HELPER_PY -m venv $venv failed (see above)"
    fi
    local pip_args=() pip_log=$TMP_WORK/pip.log
    # shellcheck disable=SC2206  # documented: split on spaces
    [ -z "${CROP_CLUSTERD_PIP_ARGS:-}" ] || pip_args=($CROP_CLUSTERD_PIP_ARGS)
    if ! act "$venv_py" -m pip install --upgrade "${pip_args[@]}" "${CHECKOUT}[systemd]" 2>&1 | tee "$pip_log"; then
        die "pip install of $CHECKOUT failed: $(explain_pip_failure "$pip_log")"
    fi
    if [ "$DRY_RUN" = 0 ] && [ ! -x "$venv/bin/crop-clusterd" ]; then
        die "pip finished but $venv/bin/crop-clusterd is missing"
    fi
}

# `crop-clusterd status` on the PATH: a link in /usr/local/bin to the service's
# script. A file there that is not such a link belongs to someone else: kept.
link_command() {
    say "== command"
    local link target=$APP_DIR/bin/crop-clusterd
    link=$(staged "$PATH_LINK")
    if [ -L "$link" ] && [ "$(readlink "$link")" = "$target" ]; then
        say "unchanged: $link -> $target"
    elif [ -e "$link" ] && [ ! -L "$link" ]; then
        say "warning: $link exists and is not a link; left alone (run $target instead)"
    else
        make_dir "$(dirname "$PATH_LINK")" 0755
        act ln -sfn -- "$target" "$link"
    fi
}

# Sets MODEL_TARGET (path as the service sees it) when a model is staged.
MODEL_TARGET=""
stage_model() {
    [ -n "$MODEL_ID$MODEL_SRC" ] || return 0
    say "== model"
    local name dest
    if [ -n "$MODEL_ID" ]; then name=${MODEL_ID//\//--}; else name=$(basename "$MODEL_SRC"); fi
    MODEL_TARGET=$MODELS_DIR/$name
    dest=$(staged "$MODEL_TARGET")
    make_dir "$MODELS_DIR" 0755
    if [ -n "$MODEL_SRC" ]; then
        if [ -d "$dest" ] && diff -rq -- "$MODEL_SRC" "$dest" >/dev/null 2>&1; then
            say "unchanged: $dest"
            return 0
        fi
        if [ "$DRY_RUN" = 1 ]; then
            say "would copy: $MODEL_SRC -> $dest"
            return 0
        fi
        act rm -rf -- "$dest.install-tmp"
        act cp -R -- "$MODEL_SRC" "$dest.install-tmp"
    else
        if [ -f "$dest/config.json" ]; then
            say "already staged: $dest (delete it to download $MODEL_ID again)"
            return 0
        fi
        local py=$HELPER_PY
        [ -z "$REUSE_PYTHON" ] && py=$(staged "$APP_DIR/bin/python")
        if [ "$DRY_RUN" = 1 ]; then
            say "would download: $MODEL_ID (model and image processor) -> $dest"
            return 0
        fi
        say "downloading $MODEL_ID (model and image processor) -> $dest"
        rm -rf -- "$dest.install-tmp"
        "$py" - "$MODEL_ID" "$dest.install-tmp" <<'PY' ||
import sys

from transformers import AutoImageProcessor, AutoModel

model_id, folder = sys.argv[1], sys.argv[2]
AutoModel.from_pretrained(model_id).save_pretrained(folder)
AutoImageProcessor.from_pretrained(model_id).save_pretrained(folder)
PY
            die "could not download $MODEL_ID (no network, or not a model id?); download it on a machine with network (save_pretrained) and pass --model-dir"
    fi
    act rm -rf -- "$dest"
    act mv -- "$dest.install-tmp" "$dest"
    act chmod -R a+rX -- "$dest"
}

# Render the new config from the checkout's config.toml into file $1.
render_config() {
    "$HELPER_PY" - "$CHECKOUT/config.toml" "$1" "${WATCH:-$DEFAULT_WATCH}" "$STATE_DIR" \
        "${OUTPUT:-$DEFAULT_OUTPUT}" "$MODEL_TARGET" <<'PY'
"""Set the service's keys in the template, keeping its comments and layout."""

import json
import re
import sys
import tomllib

template, out, watch, state, output, model_dir = sys.argv[1:7]
wanted: dict[str, dict[str, str]] = {
    "watch": {"folder": watch},
    "state": {"folder": state},
    "output": {"folder": output},
    "log": {"format": "auto"},
}
if model_dir:
    wanted["embed"] = {"model": "dino", "from_pretrained": model_dir}

header = re.compile(r"^\s*\[([A-Za-z0-9_.-]+)\]\s*(#.*)?$")
lines = open(template, encoding="utf-8").read().splitlines()
result: list[str] = []
section = ""
done: set[tuple[str, str]] = set()
last_content: dict[str, int] = {}  # section -> index in result of its last non-blank line


def toml_str(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)


for line in lines:
    m = header.match(line)
    if m:
        section = m.group(1)
        result.append(line)
        last_content[section] = len(result) - 1
        continue
    for key, value in wanted.get(section, {}).items():
        if re.match(rf"^\s*{re.escape(key)}\s*=", line):
            line = f"{key} = {toml_str(value)}"
            done.add((section, key))
            break
    result.append(line)
    if line.strip():
        last_content[section] = len(result) - 1

# Keys the template lacks go to the end of their section (or a new one).
for sec in sorted(wanted, key=lambda s: -last_content.get(s, -1)):
    missing = [(k, v) for k, v in wanted[sec].items() if (sec, k) not in done]
    if not missing:
        continue
    new = [f"{k} = {toml_str(v)}" for k, v in missing]
    if sec in last_content:
        at = last_content[sec] + 1
        result[at:at] = new
    else:
        result += ["", f"[{sec}]", *new]

intro = [
    "# Written by crop-clusterd's install.sh from the checkout's config.toml, with the",
    "# service's paths filled in. install.sh never overwrites this file. After changing",
    "# [watch] folder, [output] folder or [state] folder, run install.sh again: it",
    "# rewrites the systemd drop-in that lets the service read and write them.",
    "",
]
text = "\n".join(intro + result) + "\n"
parsed = tomllib.loads(text)
for sec, keys in wanted.items():
    for key, value in keys.items():
        assert parsed[sec][key] == value, (sec, key)
open(out, "w", encoding="utf-8").write(text)
PY
}

# Print the folders the config names, as the service resolves them: watch,
# state, output, one a line.
config_paths() {
    "$HELPER_PY" - "$1" "$STATE_DIR" <<'PY'
import os
import sys
import tomllib

path, workdir = sys.argv[1], sys.argv[2]
try:
    with open(path, "rb") as f:
        config = tomllib.load(f)
except (OSError, tomllib.TOMLDecodeError) as e:
    sys.exit(f"install.sh: error: cannot read {path}: {e}")
defaults = {"watch": "crops", "state": "/var/lib/crop-clusterd", "output": "out"}
for section, default in defaults.items():
    value = config.get(section, {}).get("folder", default)
    if not isinstance(value, str) or not value:
        sys.exit(f"install.sh: error: {path}: [{section}] folder must be a non-empty string")
    if value == "~" or value.startswith("~/"):
        value = workdir + value[1:]  # the service user's home is the state folder
    # The unit's WorkingDirectory is the state folder: relative paths start there.
    print(os.path.normpath(os.path.join(workdir, value)))
PY
}

install_config() {
    say "== config"
    local dest rendered
    dest=$(staged "$CONF")
    make_dir "$CONF_DIR" 0755
    if [ -f "$dest" ]; then
        say "keeping the existing config $dest (install.sh never overwrites it)"
        if [ -n "$WATCH$OUTPUT" ]; then
            say "note: --watch/--output only apply to a new config; edit [watch] folder / [output] folder in $dest instead"
        fi
        if [ -n "$MODEL_TARGET" ]; then
            say "to use the staged model, set in the [embed] section of $dest:"
            say '    model = "dino"'
            say "    from_pretrained = \"$MODEL_TARGET\""
        fi
        CONFIG_FILE=$dest
        return 0
    fi
    rendered=$TMP_WORK/config.toml
    render_config "$rendered" || die "could not fill in $CHECKOUT/config.toml"
    write_file "$CONF" 0644 <"$rendered"
    CONFIG_FILE=$rendered
}

# A path for a systemd list setting: quoted when it holds spaces or quotes, and
# % doubled (systemd would read it as a specifier).
unit_path() {
    local p=${1//%/%%}
    if [[ $p =~ [[:space:]\"\'\\] ]]; then
        p=${p//\\/\\\\}
        p=${p//\"/\\\"}
        printf '"%s"' "$p"
    else
        printf '%s' "$p"
    fi
}

# The group of the NVIDIA control node when the service user needs it to open
# the GPU (mode 0660 root:video on some distributions); nothing otherwise, and
# nothing under --prefix (the node belongs to another machine then).
gpu_node_group() {
    local node=$1 mode
    [ -z "$PREFIX" ] && [ -e "$node" ] || return 0
    mode=$(stat -L -c %a -- "$node")
    if (((8#$mode & 8#006) != 8#006)); then
        stat -L -c %G -- "$node"
    fi
}

under() { # under PATH DIR: PATH is DIR or inside it
    [ "$1" = "$2" ] || [[ $1 == "$2"/* ]]
}

install_folders_and_unit() {
    local paths watch state output
    paths=$(config_paths "$CONFIG_FILE") || exit 1
    {
        read -r watch
        read -r state
        read -r output
    } <<<"$paths"
    say "config: watch folder $watch, state folder $state, output folder $output"
    local p
    for p in "$watch" "$state" "$output"; do
        if under "$p" /tmp || under "$p" /var/tmp; then
            die "$p is under /tmp or /var/tmp, which the service cannot see (PrivateTmp=yes); choose another folder in $CONF"
        fi
    done

    say "== folders"
    local dir
    for dir in "$state" "$output"; do
        make_dir "$dir" 0755
        system_act chown "$SERVICE_USER:$SERVICE_USER" -- "$dir"
    done
    if [ -d "$(staged "$watch")" ]; then
        say "exists: $(staged "$watch")"
    else
        make_dir "$watch" 0755
        say "note: the watch folder $watch is new; let the flat-bug user write there"
    fi

    say "== systemd unit"
    write_file "$UNIT_DIR/$UNIT_NAME" 0644 <"$CHECKOUT/service/$UNIT_NAME"
    local home_line="" writable=()
    for p in "$watch" "$state" "$output"; do
        if under "$p" /home || under "$p" /root || under "$p" /run/user; then
            home_line="ProtectHome=read-only"
        fi
    done
    local gpu_group
    gpu_group=$(gpu_node_group /dev/nvidiactl)
    [ "$state" = "$STATE_DIR" ] || writable+=("$(unit_path "$state")")
    writable+=("$(unit_path "$output")")
    {
        printf '%s\n' \
            "# Written by install.sh from $CONF; do not edit: install.sh rewrites it." \
            "# After changing [watch] folder, [state] folder or [output] folder there," \
            "# run install.sh again, then systemctl restart crop-clusterd." \
            "[Service]" \
            "# The daemon never changes crops; a missing watch folder (\"-\") is reported" \
            "# by the daemon instead of failing the sandbox setup." \
            "ReadOnlyPaths=$(unit_path "-$watch")" \
            "# Snapshots (clusters.csv, embeddings.pkl, ...) and a state folder other than" \
            "# $STATE_DIR (StateDirectory= covers that one)." \
            "ReadWritePaths=${writable[*]}"
        if [ -n "$gpu_group" ]; then
            printf '%s\n' \
                "# The NVIDIA device nodes here are not world-writable; their group gives access." \
                "SupplementaryGroups=$gpu_group"
        fi
        if [ -n "$home_line" ]; then
            printf '%s\n' \
                "# The config names a folder under /home, /root or /run/user, which" \
                "# ProtectHome=yes would hide; ReadWritePaths= above still applies." \
                "$home_line"
        fi
    } | write_file "$UNIT_DIR/$UNIT_NAME.d/paths.conf" 0644
}

enable_service() {
    say "== systemd"
    if [ -n "$PREFIX" ]; then
        system_act systemctl daemon-reload
        system_act systemctl enable "$UNIT_NAME"
    elif [ -d /run/systemd/system ]; then
        system_act systemctl daemon-reload
        system_act systemctl enable "$UNIT_NAME"
    else
        say "systemd is not running as PID 1 here: skipped systemctl daemon-reload and enable;"
        say "run them on the machine that runs the service"
    fi
}

check_config() {
    [ -z "$PREFIX" ] && [ "$DRY_RUN" = 0 ] || return 0
    local bin=$APP_DIR/bin/crop-clusterd
    if "$bin" run --config "$CONF" --check-config >/dev/null 2>&1; then
        say "config check passed: $bin run --config $CONF --check-config"
    else
        say "warning: '$bin run --config $CONF --check-config' reports a problem; fix $CONF before starting"
    fi
}

main() {
    parse_args "$@"
    check_args
    TMP_WORK=$(mktemp -d "${TMPDIR:-/tmp}/crop-clusterd-install.XXXXXX")
    pick_helper_python
    if [ "$DRY_RUN" = 1 ]; then say "dry run: nothing is changed"; fi
    if [ -n "$PREFIX" ]; then say "staging under $PREFIX (paths inside files name the real root)"; fi
    ensure_user
    ensure_environment
    link_command
    stage_model
    install_config
    install_folders_and_unit
    enable_service
    check_config
    if [ "$DRY_RUN" = 1 ]; then
        say "dry run finished: nothing was changed"
    else
        say "done. Start with: systemctl start crop-clusterd; logs: journalctl -u crop-clusterd -f"
    fi
}

main "$@"
