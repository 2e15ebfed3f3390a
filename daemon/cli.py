"""The ``crop-clusterd`` command line.

``crop-clusterd run`` is the daemon, ``crop-clusterd status`` reads its state,
``crop-clusterd export`` writes a session's ``embeddings.pkl`` from it,
``crop-clusterd simulate`` writes demo data. ``crop-clusterd cluster`` takes the
old batch tool's flags (``-i -o -mf
--time_format -d -e -fp -kp -gs -c -th -se -sl -x``) with their meanings, plus
new long options. Settings come from built-in defaults, then ``--config FILE``,
then flags: a flag always wins.
"""

from __future__ import annotations

import argparse
import signal
import sys
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from . import __version__, defaults
from .config import (
    Config,
    ConfigError,
    EmbedConfig,
    InputConfig,
    LinkConfig,
    LogConfig,
    LogFormat,
    LogLevel,
    OutputConfig,
    SessionSplit,
    StateConfig,
    format_config,
    load_config,
    parse_config,
    read_toml,
)
from .log import configure_logging, get_logger

if TYPE_CHECKING:
    from .batch import BatchResult

log = get_logger(__name__)

# Each subcommand's flags as data: argparse dest -> the ``section.key`` it sets.
# A flag that was given overrides the file's value before the one validation.
CLUSTER_FLAGS: Final[Mapping[str, str]] = {
    "out_folder": "output.folder",
    "meta_folder": "input.meta_folder",
    "time_format": "input.time_format",
    "device": "embed.device",
    "embed": "embed.model",
    "from_pretrained": "embed.from_pretrained",
    "dedup": "output.dedup",
    "gen_cluster_dirs": "output.gen_cluster_dirs",
    "cluster": "link.method",
    "threshold": "link.threshold",
    "save_embs": "output.save_embeddings",
    "save_labels": "output.save_labels",
    "recursive": "input.recursive",
    "arch": "embed.arch",
    "batch_size": "embed.batch_size",
    "workers": "input.workers",
    "background": "input.background",
    "allow_download": "embed.allow_download",
    "log_format": "log.format",
    "log_level": "log.level",
    "session_split": "session.split",
    "track_idle_frames": "link.track_idle_frames",
    "track_max_move": "link.track_max_move",
    "track_stitch": "link.track_stitch",
}
RUN_FLAGS: Final[Mapping[str, str]] = {
    "watch": "watch.folder",
    "state": "state.folder",
    "out_folder": "output.folder",
    "cluster": "link.method",
    "threshold": "link.threshold",
    "embed": "embed.model",
    "from_pretrained": "embed.from_pretrained",
    "device": "embed.device",
    "batch_size": "embed.batch_size",
    "time_format": "input.time_format",
    "metadata": "metadata.enabled",
    "polling": "watch.polling",
    "gen_cluster_dirs": "output.gen_cluster_dirs",
    "log_format": "log.format",
    "log_level": "log.level",
    "session_split": "session.split",
    "track_idle_frames": "link.track_idle_frames",
    "track_max_move": "link.track_max_move",
    "track_stitch": "link.track_stitch",
}
EXPORT_FLAGS: Final[Mapping[str, str]] = {"state": "state.folder"}
FLAG_TABLES: Final[Mapping[str, Mapping[str, str]]] = {
    "cluster": CLUSTER_FLAGS,
    "run": RUN_FLAGS,
    "export": EXPORT_FLAGS,
}

_INPUT, _EMBED, _OUTPUT = InputConfig(), EmbedConfig(), OutputConfig()
_LOG, _STATE = LogConfig(), StateConfig()
_LOG_FORMATS = typing.get_args(LogFormat)
_SPLITS = typing.get_args(SessionSplit)
_LOG_LEVELS = typing.get_args(LogLevel)


def _add_cluster_arguments(p: argparse.ArgumentParser) -> None:
    _add_old_flags(p.add_argument_group("the old batch tool's flags"))
    _add_new_options(p.add_argument_group("crop-clusterd options"))


def _add_old_flags(old: argparse._ArgumentGroup) -> None:
    old.add_argument(
        "-i",
        "--input",
        nargs="+",
        metavar="SPEC",
        help="image files, directories, glob patterns or .txt lists of them",
    )
    old.add_argument(
        "-o",
        "--out_folder",
        "--out",
        dest="out_folder",
        type=Path,
        help=f"output folder (default: output.folder, '{_OUTPUT.folder}')",
    )
    old.add_argument("-mf", "--meta_folder", type=Path,
                     help="flat-bug metadata folder (searched recursively); turns on "
                     "spatio-temporal gating; a crop takes its own frame's JSON (same "
                     "frame name and identifier, nearest folder)")  # fmt: skip
    old.add_argument("--time_format",
                     help="how frame names carry their capture time, strftime style "
                     f"('{_percent(_INPUT.time_format)}', the default) or the old doubled "
                     "style ('%%YYYY-%%mm-%%dd_%%HH-%%MM-%%SS')")  # fmt: skip
    old.add_argument("-d", "--device", help="torch device (default: cuda:0 if available, else cpu)")
    old.add_argument("-e", "--embed", metavar="NAME",
                     help=f"embedder: {', '.join(defaults.EMBEDDER_NAMES)} "
                     f"(default: {_EMBED.model}, bundled)")  # fmt: skip
    old.add_argument("-fp", "--from_pretrained",
                     help="dino: Hugging Face model id or local folder; "
                     "hierarchical: TorchScript or state-dict file; "
                     "efficientnet-lite0: another state-dict file for it "
                     "(default: the bundled weights)")  # fmt: skip
    old.add_argument("-kp", "--dedup", action="store_true", default=None,
                     help="write dedup/<id>_<name>: one representative crop per cluster of "
                     "2+ crops, singletons in dedup/not-clustered/")  # fmt: skip
    old.add_argument("-gs", "--gen_cluster_dirs", action="store_true", default=None,
                     help="write clusters/<id>/ per cluster, singletons in "
                     "clusters/not-clustered/ (hard links when possible)")  # fmt: skip
    old.add_argument(
        "-c",
        "--cluster",
        choices=defaults.METHODS,
        help=f"clustering method (default: {LinkConfig().method}, the old rule)",
    )
    old.add_argument(
        "-th",
        "--threshold",
        type=float,
        help="cosine similarity needed to link (default: "
        f"{defaults.COSINE_THRESHOLD:g} for cosine, per-embedder for track)",
    )
    old.add_argument("-se", "--save_embs", action="store_true", default=None,
                     help="write embeddings.pkl (on by default; output.save_embeddings = "
                     "false in --config turns it off)")  # fmt: skip
    old.add_argument("-sl", "--save_labels", action="store_true", default=None,
                     help="add a label column to clusters.csv (needs labels)")  # fmt: skip
    old.add_argument("-x", "--num_classes", type=int,
                     help="number of label classes; accepted for compatibility, "
                     "checked against the labels found")  # fmt: skip


def _add_new_options(new: argparse._ArgumentGroup) -> None:
    new.add_argument("--config", type=Path, help="TOML config file (flags override it)")
    new.add_argument("--check-config", action="store_true",
                     help="validate the configuration, print it and exit")  # fmt: skip
    new.add_argument("--gallery", action="store_true",
                     help="also write the cluster gallery (index.html, thumbs/, "
                     "activity.png) next to each clusters.csv")  # fmt: skip
    new.add_argument("--recursive", action="store_true", default=None,
                     help="scan input directories recursively")  # fmt: skip
    new.add_argument("--session-split", choices=_SPLITS,
                     help="session.split: none (default: one result, as the old tool), night "
                          "or gap (one output folder per session)")  # fmt: skip
    new.add_argument("--from-embeddings", type=Path, metavar="PKL",
                     help="re-cluster an embeddings.pkl instead of embedding images")  # fmt: skip
    new.add_argument("--labels", type=Path, metavar="CSV",
                     help="ground-truth labels (filename,label) for evaluation")  # fmt: skip
    new.add_argument("--labels-from-folders", action="store_true",
                     help="use each crop's parent folder name as its label")  # fmt: skip
    new.add_argument("--arch", help="hierarchical: architecture name of a state-dict file")
    new.add_argument("--batch-size", type=int,
                     help=f"crops per model call (default {_EMBED.batch_size})")  # fmt: skip
    new.add_argument("--workers", type=int,
                     help=f"decode/preprocess threads (default {_INPUT.workers})")  # fmt: skip
    new.add_argument(
        "--background", help=f"colour for transparent areas (default {_INPUT.background})"
    )
    new.add_argument("--allow-download", action="store_true", default=None,
                     help="let dino download from the Hugging Face hub")  # fmt: skip
    new.add_argument("--log-format", choices=_LOG_FORMATS,
                     help=f"where logs go (default {_LOG.format}: journald under systemd, "
                     "else console lines on stderr)")  # fmt: skip
    new.add_argument("--log-level", choices=_LOG_LEVELS,
                     help=f"least severe log level shown (default {_LOG.level})")  # fmt: skip
    _add_track_flags(new)


def _add_track_flags(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    link = LinkConfig()
    p.add_argument("--track-idle-frames", type=int, metavar="N",
                   help="track: frames of its trap a track stays matchable "
                   f"(link.track_idle_frames, default {link.track_idle_frames})")  # fmt: skip
    p.add_argument("--track-max-move", type=float, metavar="FRACTION",
                   help="track: how far a track may move, a fraction of the frame diagonal "
                   f"(link.track_max_move, default {link.track_max_move:g})")  # fmt: skip
    p.add_argument("--track-stitch", action=argparse.BooleanOptionalAction, default=None,
                   help="track, with metadata: stitch tracklets in a second pass "
                   f"(link.track_stitch, default {str(link.track_stitch).lower()})")  # fmt: skip


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="TOML config file (flags override it)")
    p.add_argument("--check-config", action="store_true",
                   help="validate the configuration, print it, exit (2 on errors)")  # fmt: skip
    p.add_argument("--watch", type=Path, metavar="DIR", help="crop folder to watch (watch.folder)")
    p.add_argument("--state", type=Path, metavar="DIR",
                   help=f"state folder (state.folder, default {_STATE.folder})")  # fmt: skip
    p.add_argument("-o", "--out", dest="out_folder", type=Path, metavar="DIR",
                   help="output folder for the snapshots (output.folder)")  # fmt: skip
    p.add_argument("-c", "--cluster", choices=defaults.METHODS, help="link.method")
    p.add_argument("-th", "--threshold", type=float, help="link.threshold")
    p.add_argument("--session-split", choices=_SPLITS,
                   help="session.split: one output folder per night (default), per run of "
                        "activity (gap), or one for everything (none)")  # fmt: skip
    p.add_argument("-e", "--embed", metavar="NAME",
                   help=f"embed.model: {', '.join(defaults.EMBEDDER_NAMES)}")  # fmt: skip
    p.add_argument("-fp", "--from_pretrained", help="embed.from_pretrained")
    p.add_argument("-d", "--device", help="embed.device")
    p.add_argument("--batch-size", type=int, help="embed.batch_size")
    p.add_argument("--time_format", help="input.time_format")
    p.add_argument("--metadata", action="store_true", default=None,
                   help="read flat-bug metadata JSON (metadata.enabled)")  # fmt: skip
    p.add_argument("--polling", action="store_true", default=None,
                   help="poll instead of inotify (watch.polling)")  # fmt: skip
    p.add_argument("-gs", "--gen_cluster_dirs", action="store_true", default=None,
                   help="keep clusters/<id>/ folders (output.gen_cluster_dirs)")  # fmt: skip
    p.add_argument(
        "--log-format",
        choices=_LOG_FORMATS,
        help=f"log.format ({_LOG.format}: journald under systemd, else console)",
    )
    p.add_argument("--log-level", choices=_LOG_LEVELS, help="log.level")
    _add_track_flags(p)
    p.add_argument("--exit-when-idle", type=float, metavar="SECONDS",
                   help="stop cleanly once nothing new has arrived for this long "
                   "(demos and tests; a service runs until stopped)")  # fmt: skip


def _add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("session", metavar="SESSION",
                   help="session id: the date a night began (YYYY-MM-DD), a gap session's "
                   "YYYY-MM-DDTHH-MM-SS, or 'all' with session.split = none")  # fmt: skip
    p.add_argument("--state", type=Path, metavar="DIR",
                   help=f"state folder (state.folder, default {_STATE.folder})")  # fmt: skip
    p.add_argument("--config", type=Path, help="TOML config file (flags override it)")
    p.add_argument("-o", "--out", dest="out_file", type=Path, metavar="FILE",
                   help="where to write (default: embeddings-SESSION.pkl in the "
                   "current folder)")  # fmt: skip


def _percent(text: str) -> str:
    # argparse %-formats help texts.
    return text.replace("%", "%%")


def apply_overrides(
    data: Mapping[str, Any], ns: argparse.Namespace, table: Mapping[str, str]
) -> dict[str, Any]:
    """``data`` (parsed TOML) with each flag of ``table`` that was given set in it.

    ``table`` maps an argparse dest to the ``section.key`` it sets; a flag was
    given when its value is not ``None``. Paths become strings, as the file
    spells them. A section that is not a table is left for validation to report.
    """
    merged = {k: dict(v) if isinstance(v, Mapping) else v for k, v in data.items()}
    for dest, key in table.items():
        value = getattr(ns, dest)
        if value is None:
            continue
        section_name, name = key.split(".")
        section = merged.setdefault(section_name, {})
        if isinstance(section, dict):
            section[name] = str(value) if isinstance(value, Path) else value
    return merged


def config_from_args(ns: argparse.Namespace) -> Config:
    """Defaults, then ``--config`` FILE, then the flags of ``ns.command`` that were given.

    Validated once, as one mapping. Raises `ConfigError` listing every problem;
    one that a flag caused names the flag too.
    """
    table = FLAG_TABLES[ns.command]
    data: Mapping[str, Any] = {} if ns.config is None else read_toml(ns.config)
    source = "<defaults>" if ns.config is None else str(ns.config)
    try:
        return parse_config(apply_overrides(data, ns, table), source, embedders=_embedder_names())
    except ConfigError as exc:
        flags = _flag_names(ns.command)
        given = {key: flags[dest] for dest, key in table.items() if getattr(ns, dest) is not None}
        raise ConfigError([_name_flag(e, given) for e in exc.errors], exc.source) from None


def _name_flag(error: str, given: Mapping[str, str]) -> str:
    key = error.split(":", 1)[0]
    return f"{error} (from {given[key]})" if key in given else error


def _flag_names(command: str) -> dict[str, str]:
    """argparse dest -> the flag's longest spelling, for the subcommand ``command``."""
    parser = argparse.ArgumentParser(add_help=False)
    adders = {"cluster": _add_cluster_arguments, "export": _add_export_arguments}
    adders.get(command, _add_run_arguments)(parser)
    return {a.dest: max(a.option_strings, key=len) for a in parser._actions if a.option_strings}


def _cmd_run(ns: argparse.Namespace) -> int:
    # Importing torch takes seconds; a stop request meanwhile must lead to a
    # clean stop, not Python's default death by SIGTERM (systemd calls that a
    # failure). The daemon installs its own handlers once it runs.
    early: list[str] = []

    def remember(signum: int, _frame: object) -> None:
        early.append(signal.Signals(signum).name)

    previous = {s: signal.signal(s, remember) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _run_daemon(ns, early)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _run_daemon(ns: argparse.Namespace, early: list[str]) -> int:
    from .embed import EmbedderError
    from .store import StateError
    from .supervisor import Daemon

    try:
        config = config_from_args(ns)
    except ConfigError as exc:
        print(f"crop-clusterd: configuration error:\n{exc}", file=sys.stderr)
        return 2
    if ns.check_config:
        print(format_config(config), end="")
        return 0
    configure_logging(config.log.format, config.log.level)
    daemon = Daemon(config, exit_when_idle_s=ns.exit_when_idle)
    if early:
        daemon.request_stop(f"{early[0]} during start-up")
    try:
        summary = daemon.run()
    except (StateError, EmbedderError) as exc:
        log.error("daemon_failed", reason=str(exc))
        print(f"crop-clusterd run: {exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:  # a stage failed; its traceback is in the log
        print(f"crop-clusterd run: {exc}", file=sys.stderr)
        return 1
    print(
        f"{summary.crops} crops -> {summary.clusters} clusters "
        f"({summary.clusters - summary.singletons} with 2+ crops, {summary.singletons} "
        f"singletons); {summary.new_crops} new in this run, {summary.skipped} files skipped; "
        f"outputs in {config.output.folder}/"
    )
    return 0


def _cmd_status(ns: argparse.Namespace) -> int:
    from .status import main_status

    state = ns.state
    if state is None:
        try:
            state = load_config(ns.config, embedders=_embedder_names()).state.folder
        except ConfigError as exc:
            print(f"crop-clusterd: configuration error:\n{exc}", file=sys.stderr)
            return 2
    return main_status(state, ns.json, sys.stdout)


def _cmd_export(ns: argparse.Namespace) -> int:
    from .sessionfiles import ExportError, export_session
    from .store import StateError

    try:
        config = config_from_args(ns)
    except ConfigError as exc:
        print(f"crop-clusterd: configuration error:\n{exc}", file=sys.stderr)
        return 2
    target = ns.out_file if ns.out_file is not None else Path(f"embeddings-{ns.session}.pkl")
    try:
        n = export_session(config.state.folder, ns.session, target)
    except (ExportError, StateError, OSError) as exc:
        print(f"crop-clusterd export: {exc}", file=sys.stderr)
        return 1
    print(f"{n} crops of session {ns.session} written to {target}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The full ``crop-clusterd`` parser with its subcommands."""
    from .simulate import add_simulate_arguments

    parser = argparse.ArgumentParser(
        prog="crop-clusterd",
        description="Group camera-trap arthropod crops into individuals.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    cluster = sub.add_parser(
        "cluster",
        help="cluster crops in one batch (the old tool's flags)",
        description="Embed crops and cluster them in one batch; writes clusters.csv, "
        "errors.csv, embeddings.pkl (not when re-clustering --from-embeddings) and, "
        "with labels, eval.json into the output folder (and with --gallery the gallery "
        "index.html).",
    )
    _add_cluster_arguments(cluster)
    simulate = sub.add_parser(
        "simulate",
        help="write a synthetic trap session (demo data with ground truth)",
        description="Write a seeded synthetic trap session in flat-bug's naming, "
        "with metadata JSON and labels.csv.",
    )
    add_simulate_arguments(simulate)
    run = sub.add_parser(
        "run",
        help="run the daemon: watch a folder, cluster crops as they land",
        description="Watch the crop folder, embed new crops in micro-batches, assign them to "
        "clusters incrementally, keep the state in the state folder and snapshots "
        "(clusters.csv, merges.csv, errors.csv, embeddings/ parts, the gallery index.html "
        "with thumbs/ and activity.png; embeddings.pkl and "
        "summary.json when a session closes) in the output folder, one folder per "
        "session (OUT/<id>/, OUT/current the newest) unless session.split = none. "
        "SIGTERM or Ctrl-C stops cleanly with a final snapshot.",
    )
    _add_run_arguments(run)
    status = sub.add_parser(
        "status",
        help="show what a running (or stopped) daemon has done",
        description="Read the state folder (safe while the daemon runs) and print processed "
        "crops, clusters, queue, errors, crops/s over the last minute and the last snapshot.",
    )
    status.add_argument("--state", type=Path, metavar="DIR",
                        help="state folder (default: state.folder of --config)")  # fmt: skip
    status.add_argument("--config", type=Path, help="TOML config file to take state.folder from")
    status.add_argument("--json", action="store_true", help="print JSON for scripts")
    export = sub.add_parser(
        "export",
        help="write a session's embeddings.pkl (the old tool's format) from the state",
        description="Write the embeddings of one session's crops as embeddings.pkl, the old "
        "batch tool's format (filename, embedding), from the state folder. Safe while the "
        "daemon runs. Fails for an unknown session and for one whose embeddings were "
        "dropped from the state (state.keep_sessions); its output folder keeps them as "
        "embeddings/ Parquet parts.",
    )
    _add_export_arguments(export)
    gallery = sub.add_parser(
        "gallery",
        help="write the cluster gallery of a batch output folder",
        description="Write index.html (open it in a browser, offline), thumbs/ (keeping those "
        "made before), activity.csv and activity.png next to each clusters.csv in OUT or its "
        "session folders. Relative crop names are read from the current folder.",
    )
    gallery.add_argument("out", type=Path, metavar="OUT", help="the batch command's output folder")
    gallery.add_argument("--config", type=Path,
                         help="TOML config file (input.background, input.time_format, "
                              "input.meta_folder: the box tracks)")  # fmt: skip
    return parser


def _embedder_names() -> list[str]:
    # The names from defaults, not the registry: --from-embeddings must not import torch.
    return list(defaults.EMBEDDER_NAMES)


def _cmd_cluster(ns: argparse.Namespace) -> int:
    from .batch import BatchRequest, run_batch
    from .inputs import InputError

    try:
        config = config_from_args(ns)
    except ConfigError as exc:
        print(f"crop-clusterd: configuration error:\n{exc}", file=sys.stderr)
        return 2
    if ns.check_config:
        print(format_config(config), end="")
        return 0
    if not ns.input and ns.from_embeddings is None:
        print("crop-clusterd cluster: give inputs with -i/--input or --from-embeddings",
              file=sys.stderr)  # fmt: skip
        return 2
    if ns.input and ns.from_embeddings is not None:
        print("crop-clusterd cluster: -i/--input and --from-embeddings exclude each other",
              file=sys.stderr)  # fmt: skip
        return 2
    configure_logging(config.log.format, config.log.level)
    request = BatchRequest(
        config=config,
        inputs=tuple(ns.input or ()),
        from_embeddings=ns.from_embeddings,
        labels_csv=ns.labels,
        labels_from_folders=ns.labels_from_folders,
        num_classes=ns.num_classes,
    )
    try:
        result = run_batch(request)
    except (InputError, FileNotFoundError, ValueError, OSError) as exc:
        print(f"crop-clusterd cluster: {exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:  # model loading problems (EmbedderError) land here
        print(f"crop-clusterd cluster: {exc}", file=sys.stderr)
        return 1
    _print_summary(result)
    if ns.gallery:
        return _write_galleries(config.output.folder, config, "cluster")
    return 0


def _cmd_gallery(ns: argparse.Namespace) -> int:
    try:
        config = load_config(ns.config, embedders=_embedder_names())
    except ConfigError as exc:
        print(f"crop-clusterd: configuration error:\n{exc}", file=sys.stderr)
        return 2
    configure_logging(config.log.format, config.log.level)
    return _write_galleries(ns.out, config, "gallery")


def _write_galleries(out: Path, config: Config, command: str) -> int:
    from .gallerybuild import build_galleries

    try:
        built = build_galleries(
            out,
            background=config.input.background_rgb,
            time_format=config.input.time_format,
            meta_folder=config.input.meta_folder,
        )
    except (FileNotFoundError, ValueError, OSError) as exc:
        print(f"crop-clusterd {command}: {exc}", file=sys.stderr)
        return 1
    for b in built:
        missing = f", {b.thumbs_failed} crops without a thumbnail" if b.thumbs_failed else ""
        print(f"gallery of {b.crops} crops, {b.clusters} clusters{missing}: {b.page}")
    return 0


def _print_summary(result: BatchResult) -> None:
    print(
        f"{result.n_crops} crops -> {result.n_clusters} clusters "
        f"({result.n_clusters - result.n_singletons} with 2+ crops, "
        f"{result.n_singletons} singletons); method {result.method}, "
        f"threshold {result.threshold:g}"
    )
    if result.skipped:
        print(f"{len(result.skipped)} files skipped, listed in {result.out / 'errors.csv'}")
    for line in result.warnings:
        print(f"warning: {line}")
    if result.evaluation is not None:
        print(result.evaluation.format_table())
    print(f"outputs in {result.out}/")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``crop-clusterd`` console command."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.command == "cluster":
        return _cmd_cluster(ns)
    if ns.command == "run":
        return _cmd_run(ns)
    if ns.command == "status":
        return _cmd_status(ns)
    if ns.command == "export":
        return _cmd_export(ns)
    if ns.command == "gallery":
        return _cmd_gallery(ns)
    if ns.command == "simulate":
        from .simulate import main as simulate_main

        return simulate_main(sys.argv[2:] if argv is None else list(argv)[1:])
    parser.error(f"unknown command {ns.command}")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
