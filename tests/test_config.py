"""Tests for crop_clusterd.config: schema, validation messages, TOML round trip."""

from __future__ import annotations

import dataclasses
import math
import re
import subprocess
import sys
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from crop_clusterd import defaults
from crop_clusterd.config import (
    Check,
    Config,
    ConfigError,
    EmbedConfig,
    InputConfig,
    LinkConfig,
    LinkMethod,
    LogConfig,
    OutputConfig,
    above,
    at_least,
    format_config,
    has_time_directive,
    is_colour,
    load_config,
    matches,
    non_empty,
    parse_colour,
    parse_config,
    parse_dataclass,
    within,
)

REPO = Path(__file__).resolve().parents[1]
CONFIG_TOML = REPO / "config.toml"


def errors_of(data: dict[str, Any], **kw: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, "test", **kw)
    errors: list[str] = info.value.errors
    return errors


def one_error(data: dict[str, Any], **kw: Any) -> str:
    errs = errors_of(data, **kw)
    assert len(errs) == 1, errs
    return errs[0]


# --- the shipped file -------------------------------------------------------


def test_config_toml_equals_code_defaults() -> None:
    assert load_config(CONFIG_TOML) == Config()


def test_load_none_gives_defaults() -> None:
    assert load_config(None) == Config()


def test_config_toml_lists_every_key_of_the_schema() -> None:
    data = tomllib.loads(CONFIG_TOML.read_text())
    for section in dataclasses.fields(Config):
        keys = {f.name for f in dataclasses.fields(getattr(Config(), section.name))}
        assert set(data[section.name]) == keys, section.name


def test_every_key_in_config_toml_has_a_comment_stating_its_default() -> None:
    lines = CONFIG_TOML.read_text().splitlines()
    keys = 0
    for i, line in enumerate(lines):
        m = re.fullmatch(r"(\w+) = (.+)", line)
        if not m:
            continue
        keys += 1
        block: list[str] = []
        j = i - 1
        while j >= 0 and lines[j].startswith("#"):
            block.insert(0, lines[j])
            j -= 1
        assert block, f"key {m.group(1)!r} has no comment above it"
        # The two gating keys share one sentence; each still states its default.
        assert f"Default: {m.group(2)}" in " ".join(block), m.group(1)
    assert keys == sum(
        len(dataclasses.fields(getattr(Config(), f.name))) for f in dataclasses.fields(Config)
    )


# --- good values -------------------------------------------------------------


def test_partial_config_keeps_other_defaults_and_converts_types() -> None:
    cfg = parse_config(
        {
            "input": {"recursive": True, "meta_folder": "meta", "workers": 4},
            "embed": {"model": "dino", "from_pretrained": "facebook/dinov2-base"},
            "link": {"max_center_dist_px": 50, "threshold": 0.85, "method": "track"},
            "output": {"folder": "/tmp/x"},
            "log": {"format": "json", "level": "debug"},
        }
    )
    assert cfg.input == InputConfig(recursive=True, meta_folder=Path("meta"), workers=4)
    assert cfg.embed.from_pretrained == "facebook/dinov2-base"
    assert cfg.embed.arch is None
    # An int is accepted where a float is expected, and stored as a float.
    assert cfg.link.max_center_dist_px == 50.0
    assert isinstance(cfg.link.max_center_dist_px, float)
    assert cfg.link.threshold == 0.85
    assert cfg.link.method == "track"
    assert cfg.output == OutputConfig(folder=Path("/tmp/x"))
    assert cfg.log == LogConfig(format="json", level="debug")


def test_empty_string_means_none_for_optional_fields() -> None:
    cfg = parse_config({"input": {"meta_folder": ""}, "embed": {"arch": "", "from_pretrained": ""}})
    assert cfg.input.meta_folder is None
    assert cfg.embed.arch is None
    assert cfg.embed.from_pretrained is None


@pytest.mark.parametrize(("raw", "value"), [("auto", None), (0.85, 0.85), (1, 1.0), (-1, -1.0)])
def test_threshold_accepts_auto_and_numbers_in_range(raw: Any, value: float | None) -> None:
    assert parse_config({"link": {"threshold": raw}}).link.threshold == value


def test_config_is_frozen() -> None:
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.embed.batch_size = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "rgb"),
    [("#808080", (128, 128, 128)), ("#FFa000", (255, 160, 0)), ("0, 12,255", (0, 12, 255))],
)
def test_parse_colour(text: str, rgb: tuple[int, int, int]) -> None:
    assert parse_colour(text) == rgb
    assert InputConfig(background=text).background_rgb == rgb


# --- unknown names -----------------------------------------------------------


def test_unknown_key_with_did_you_mean() -> None:
    assert one_error({"embed": {"batchsize": 8}}) == (
        "embed.batchsize: unknown key; did you mean 'batch_size'?"
    )


def test_unknown_section_with_did_you_mean() -> None:
    assert one_error({"inptu": {}}) == "inptu: unknown section; did you mean 'input'?"


def test_unknown_name_without_close_match_has_no_hint() -> None:
    assert one_error({"link": {"zzz": 1}}) == "link.zzz: unknown key"


def test_section_that_is_not_a_table() -> None:
    msg = one_error({"input": 3})
    assert msg.startswith("input: expected a table")
    assert "got an integer (3)" in msg


# --- wrong types and values --------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"input": {"workers": "two"}}, 'input.workers: expected an integer, got a string ("two")'),
        ({"input": {"workers": True}}, "input.workers: expected an integer, got a boolean (true)"),
        ({"input": {"workers": 2.0}}, "input.workers: expected an integer, got a float (2.0)"),
        (
            {"input": {"recursive": 1}},
            "input.recursive: expected a boolean (true or false), got an integer (1)",
        ),
        (
            {"output": {"dedup": 0}},
            "output.dedup: expected a boolean (true or false), got an integer (0)",
        ),
        (
            {"link": {"near_window_s": "5"}},
            'link.near_window_s: expected a number, got a string ("5")',
        ),
        (
            {"link": {"near_window_s": False}},
            "link.near_window_s: expected a number, got a boolean (false)",
        ),
        ({"embed": {"model": 3}}, "embed.model: expected a string, got an integer (3)"),
        ({"output": {"folder": ""}}, "output.folder: expected a path, got an empty string"),
        (
            {"output": {"folder": ["a"]}},
            'output.folder: expected a path string, got an array (["a"])',
        ),
    ],
)
def test_wrong_types(data: dict[str, Any], expected: str) -> None:
    assert one_error(data) == expected


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"input": {"workers": 0}}, "input.workers: must be >= 1, got an integer (0)"),
        ({"embed": {"batch_size": -3}}, "embed.batch_size: must be >= 1, got an integer (-3)"),
        ({"input": {"max_pixels": 0}}, "input.max_pixels: must be >= 1, got an integer (0)"),
        ({"link": {"threshold": 1.5}}, "link.threshold: must be in [-1, 1], got a float (1.5)"),
        ({"link": {"threshold": -2}}, "link.threshold: must be in [-1, 1], got an integer (-2)"),
        (
            {"link": {"max_center_dist_px": 0}},
            "link.max_center_dist_px: must be > 0, got an integer (0)",
        ),
        ({"link": {"any_window_s": -0.5}}, "link.any_window_s: must be >= 0, got a float (-0.5)"),
        ({"link": {"hnsw_m": 1}}, "link.hnsw_m: must be >= 2, got an integer (1)"),
    ],
)
def test_out_of_range(data: dict[str, Any], expected: str) -> None:
    assert one_error(data) == expected


@pytest.mark.parametrize("raw", ["abc", "", True, [0.9]])
def test_threshold_rejects_non_numbers_other_than_auto(raw: Any) -> None:
    msg = one_error({"link": {"threshold": raw}})
    assert msg.startswith('link.threshold: expected a number or "auto", got ')


def test_bad_literal_lists_choices_and_suggests() -> None:
    msg = one_error({"link": {"method": "cosin"}})
    assert msg == (
        "link.method: must be one of 'cosine', 'track'; got a string (\"cosin\"); "
        "did you mean 'cosine'?"
    )


def test_bad_literal_log_level() -> None:
    msg = one_error({"log": {"level": "verbose"}})
    assert msg.startswith("log.level: must be one of 'debug', 'info', 'warning', 'error'")


@pytest.mark.parametrize("colour", ["grey", "#80808", "#gg8080", "1,2", "256,0,0", "#8080808"])
def test_bad_colour(colour: str) -> None:
    msg = one_error({"input": {"background": colour}})
    assert msg.startswith("input.background: must be a colour as '#rrggbb' or 'r,g,b'")
    with pytest.raises(ValueError):
        parse_colour(colour)


@pytest.mark.parametrize("device", ["gpu", "cuda:", "cuda:x", "CPU", ""])
def test_bad_device(device: str) -> None:
    assert one_error({"embed": {"device": device}}).startswith("embed.device: must be 'auto'")


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1", "mps"])
def test_good_device(device: str) -> None:
    assert parse_config({"embed": {"device": device}}).embed.device == device


def test_time_format_needs_a_directive() -> None:
    assert one_error({"input": {"time_format": "yyyymmdd"}}).startswith("input.time_format: must")
    old_style = "%YYYY-%mm-%dd_%HH-%MM-%SS"
    assert parse_config({"input": {"time_format": old_style}}).input.time_format == old_style


def test_all_errors_are_reported_together() -> None:
    errs = errors_of(
        {
            "inptu": {},
            "input": {"workers": 0, "recursive": "yes"},
            "embed": {"batchsize": 8},
            "link": {"threshold": 1.5, "method": "nn"},
        }
    )
    assert len(errs) == 6, errs
    prefixes = {e.split(":", 1)[0] for e in errs}
    assert prefixes == {
        "inptu",
        "input.workers",
        "input.recursive",
        "embed.batchsize",
        "link.threshold",
        "link.method",
    }


def test_config_error_str_is_one_error_per_line() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"input": {"workers": 0}, "embed": {"batch_size": 0}}, "x.toml")
    assert str(info.value).splitlines() == info.value.errors
    assert info.value.source == "x.toml"


# --- embedder names (validated against a list passed in) ---------------------


def test_embedders_list_validates_model() -> None:
    names = ["efficientnet-lite0", "dino", "hierarchical"]
    msg = one_error({"embed": {"model": "dinov2"}}, embedders=names)
    assert msg.startswith("embed.model: unknown embedder 'dinov2'; choose one of")
    assert msg.endswith("did you mean 'dino'?")
    assert parse_config({"embed": {"model": "dino"}}, embedders=names).embed.model == "dino"
    # Without a list any non-empty name passes (the CLI checks it against the registry).
    assert parse_config({"embed": {"model": "dinov2"}}).embed.model == "dinov2"


def test_default_model_is_checked_against_embedders_too() -> None:
    msg = one_error({}, embedders=["dino"])
    assert msg.startswith("embed.model: unknown embedder 'efficientnet-lite0'")


# --- files --------------------------------------------------------------------


def test_toml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[input]\nrecursive = true\nworkers = = 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (msg,) = info.value.errors
    assert msg.startswith(f"{path}: invalid TOML")
    assert "line 3" in msg


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.toml")


def test_load_config_reports_value_errors(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[embed]\nbatchsize = 3\n\n[link]\nthreshold = "abc"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.errors == [
        "embed.batchsize: unknown key; did you mean 'batch_size'?",
        'link.threshold: expected a number or "auto", got a string ("abc")',
    ]


# --- format_config -----------------------------------------------------------


def test_format_config_round_trips_defaults() -> None:
    assert parse_config(tomllib.loads(format_config(Config()))) == Config()


def test_format_config_round_trips_non_defaults(tmp_path: Path) -> None:
    cfg = Config(
        input=InputConfig(
            recursive=True,
            meta_folder=Path("/data/meta dir"),
            time_format="%YYYY-%mm-%dd_%HH-%MM-%SS",
            background="10,20,30",
            max_pixels=123,
            workers=7,
        ),
        embed=EmbedConfig(
            model="hierarchical",
            from_pretrained='C:\\weights\\"best".pt',
            arch="efficientnet_v2_s",
            device="cuda:1",
            batch_size=5,
            allow_download=True,
        ),
        link=LinkConfig(method="track", threshold=-0.25, near_window_s=1e-5, hnsw_m=48),
        output=OutputConfig(folder=Path("res"), dedup=True, save_embeddings=False),
        log=LogConfig(format="journald", level="warning"),
    )
    path = tmp_path / "c.toml"
    path.write_text(format_config(cfg))
    assert load_config(path) == cfg


def test_format_config_comments_each_key() -> None:
    lines = format_config(Config()).splitlines()
    key_lines = [i for i, line in enumerate(lines) if re.match(r"\w+ = ", line)]
    assert key_lines
    assert all(lines[i - 1].startswith("# ") for i in key_lines)


# --- the generic loader, for sections added later ------------------------------


@dataclass(frozen=True)
class _Extra:
    names: tuple[str, ...] = ("a",)
    ratio: float = field(
        default=0.5, metadata={"check": Check(lambda v: 0 < v <= 1, "must be in (0, 1]")}
    )
    label: str | None = None


@dataclass(frozen=True)
class _Schema:
    extra: _Extra = field(default_factory=_Extra)


def test_generic_loader_tuple_of_str_and_custom_check() -> None:
    got = parse_dataclass(_Schema, {"extra": {"names": ["x", "y"], "ratio": 1, "label": "l"}})
    assert got == _Schema(_Extra(names=("x", "y"), ratio=1.0, label="l"))
    with pytest.raises(ConfigError) as info:
        parse_dataclass(_Schema, {"extra": {"names": ["x", 3], "ratio": 0}})
    assert info.value.errors == [
        "extra.names: item 1: expected a string, got an integer (3)",
        "extra.ratio: must be in (0, 1], got an integer (0)",
    ]
    assert parse_dataclass(_Schema, tomllib.loads(format_config(got))) == got


def test_paths_expand_home() -> None:
    cfg = parse_config({"output": {"folder": "~/out"}, "input": {"meta_folder": "meta"}})
    assert cfg.output.folder == Path.home() / "out"
    assert cfg.input.meta_folder == Path("meta")


def test_importing_config_does_not_import_torch() -> None:
    code = "import sys, crop_clusterd.config; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


# --- named checks, defaults, the metadata rule ------------------------------


@pytest.mark.parametrize(
    ("check", "good", "bad", "help"),
    [
        (at_least(1), [1, 2.5], [0, -1, math.nan], "must be >= 1"),
        (at_least(0), [0, 0.0, 7], [-0.5], "must be >= 0"),
        (above(0), [1e-9, 3], [0, -1, math.nan], "must be > 0"),
        (within(-1.0, 1.0), [-1.0, 0.0, 1.0], [1.01, -2, math.nan], "must be in [-1, 1]"),
        (non_empty(), ["x"], [""], "must not be empty"),
        (matches(re.compile(r"a+"), "must be a's"), ["a", "aaa"], ["", "ab"], "must be a's"),
        (
            is_colour,
            ["#808080", "1,2,3"],
            ["grey", "1,2,300"],
            "must be a colour as '#rrggbb' or 'r,g,b' with components 0..255",
        ),
        (
            has_time_directive,
            ["%Y", "x%YYYYx"],
            ["2024", "%", "a\n%"],
            "must contain a % time directive such as %Y",
        ),
    ],
)
def test_named_checks_carry_their_message(
    check: Check, good: list[Any], bad: list[Any], help: str
) -> None:
    assert check.help == help
    assert all(check(v) for v in good)
    assert not any(check(v) for v in bad)


def test_a_named_check_reports_key_help_and_value() -> None:
    assert one_error({"embed": {"batch_size": 0}}) == (
        "embed.batch_size: must be >= 1, got an integer (0)"
    )
    assert one_error({"link": {"max_center_dist_px": 0}}) == (
        "link.max_center_dist_px: must be > 0, got an integer (0)"
    )


def test_schema_defaults_come_from_defaults_module() -> None:
    link, embed = LinkConfig(), EmbedConfig()
    assert embed.model == defaults.DEFAULT_EMBEDDER
    assert link.method == defaults.DEFAULT_METHOD
    assert (link.max_center_dist_px, link.near_window_s, link.any_window_s) == (
        defaults.MAX_CENTER_DIST_PX,
        defaults.NEAR_WINDOW_S,
        defaults.ANY_WINDOW_S,
    )
    assert (link.track_idle_frames, link.track_idle_cap_s, link.track_memory) == (
        defaults.TRACK_IDLE_FRAMES,
        defaults.TRACK_IDLE_CAP_S,
        defaults.TRACK_MEMORY,
    )
    assert (link.track_max_move, link.track_move_penalty, link.track_margin) == (
        defaults.TRACK_MAX_MOVE,
        defaults.TRACK_MOVE_PENALTY,
        defaults.TRACK_MARGIN,
    )
    assert (
        link.track_stitch_threshold,
        link.track_stitch_gap_frames,
        link.track_stitch_max_move,
        link.track_stitch_cap_s,
    ) == (
        defaults.STITCH_THRESHOLD,
        defaults.STITCH_GAP_FRAMES,
        defaults.STITCH_MAX_MOVE,
        defaults.STITCH_CAP_S,
    )
    assert (link.hnsw_m, link.hnsw_ef_construction, link.hnsw_ef_search) == (
        defaults.HNSW_M,
        defaults.HNSW_EF_CONSTRUCTION,
        defaults.HNSW_EF_SEARCH,
    )


@pytest.mark.parametrize(
    ("key", "new"),
    [
        ("track_gap_s", "link.track_idle_cap_s"),
        ("track_gap_frames", "link.track_idle_frames"),
        ("track_max_move_px", "link.track_max_move"),
    ],
)
def test_replaced_track_keys_are_refused_naming_their_replacement(key: str, new: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"link": {"method": "track", key: 300}})
    message = str(err.value)
    assert f"link.{key}: no longer a setting; use {new}" in message
    assert "unknown" not in message  # one clear message, not also an unknown-key one


def test_method_choices_are_the_engines_methods() -> None:
    # A Literal type cannot be built from a tuple, so the schema spells the
    # methods again; this keeps the two the same.
    assert typing.get_args(LinkMethod) == defaults.METHODS


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({}, False),
        ({"metadata": {"enabled": True}}, True),
        ({"input": {"meta_folder": "meta"}}, True),
        ({"input": {"meta_folder": "meta"}, "metadata": {"enabled": True}}, True),
        ({"input": {"meta_folder": ""}, "metadata": {"enabled": False}}, False),
    ],
)
def test_one_metadata_rule(data: dict[str, Any], expected: bool) -> None:
    # The batch command and the daemon both decide with this property.
    assert parse_config(data).with_metadata is expected
