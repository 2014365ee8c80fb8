"""runtime/settings.py: one settings object, every field checked when it is made (one line naming the field),
the same ranges as the command line's, and what it builds (config, engine options, what resume compares)."""

from __future__ import annotations

import argparse
import math

import pytest

from runtime.cli_args import add_engine_args, add_limit_args, add_method_args, settings_from_args
from runtime.settings import INT_RANGES, Settings, SettingsError, parse_target


@pytest.mark.parametrize("field", sorted(INT_RANGES))
def test_integer_fields_are_checked_at_both_ends(field):
    lo, hi = INT_RANGES[field]
    Settings(**{field: lo})
    Settings(**{field: hi})
    for bad in (lo - 1, hi + 1, 2.0, True, "3"):
        with pytest.raises(SettingsError, match=rf"^{field} must be an integer in \[{lo:,}, {hi:,}\]"):
            Settings(**{field: bad})


@pytest.mark.parametrize("kw, match", [
    ({"blur_sigma": 0.0}, r"^blur_sigma must be a finite number in \(0, 1000\]"),
    ({"blur_sigma": math.nan}, r"^blur_sigma must be a finite number"),
    ({"max_aspect": 0.5}, r"^max_aspect must be a number in \[1, 1e\+06\]"),
    ({"max_aspect": math.inf}, r"^max_aspect must be a number"),
    ({"engine": "tpu"}, r"^unknown engine 'tpu'; valid: cpu, cuda, trt"),
    ({"precision": "int4"}, r"^unknown precision 'int4'"),
    ({"resize": "pad"}, r"^unknown resize 'pad'"),
    ({"target": True}, r"^target must be a class index, a class name or None"),
    ({"target": 1.5}, r"^target must be a class index"),
    ({"fp16": 1}, r"^fp16 must be True or False"),
    ({"cuda_graph": "yes"}, r"^cuda_graph must be True or False"),
    ({"device_images": 0}, r"^device_images must be True, False or None"),
    ({"method": "nope"}, r"^unknown method 'nope'; valid methods: decomcam, "),
])
def test_bad_values_are_one_line_naming_the_field(kw, match):
    with pytest.raises(SettingsError, match=match) as e:
        Settings(**kw)
    assert "\n" not in str(e.value)


def test_targets_parse_ascii_digits_only():
    assert parse_target("12") == 12 and parse_target("-1") == -1 and parse_target(None) is None
    assert parse_target("\u00b2") == "\u00b2" and parse_target("dog") == "dog" and parse_target("1.0") == "1.0"


def test_the_command_line_builds_the_same_settings():
    p = argparse.ArgumentParser()
    add_engine_args(p)
    add_method_args(p)
    add_limit_args(p)
    args = p.parse_args(["--artifacts", "a", "--method", "gradcam", "--top-p", "7", "--target", "3", "--threads", "2",
                         "--max-aspect", "10", "--cuda-graph", "--engine", "cuda"])
    s = settings_from_args(args)
    assert s == Settings(method="gradcam", top_p=7, target=3, threads=2, max_aspect=10.0, cuda_graph=True,
                         engine="cuda")
    assert s.config().top_p == 7 and s.engine_options().cuda_graph and s.engine_options().intra_op_threads == 2
    with pytest.raises(SystemExit):
        p.parse_args(["--artifacts", "a", "--top-p", "0"])
