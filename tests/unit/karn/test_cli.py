"""`esper karn evolve`: registration, site parsing, bad arguments."""

from __future__ import annotations

import pytest

from esper.cli import build_parser, main
from esper.errors import ConfigError
from esper.karn.cli import parse_site, run_evolve
from generated.esper.common.v1 import seed_pb2


def test_registered_with_defaults():
    args = build_parser().parse_args(["karn", "evolve", "--generations", "3"])
    assert args.func is run_evolve
    assert (args.generations, args.per_generation, args.site) == (3, 4, "NCL:8:40")


@pytest.mark.parametrize(("text", "layout", "channels", "spatial"), [
    ("NCL:8:40", seed_pb2.ACTIVATION_LAYOUT_NCL, 8, [40]),
    ("nchw:16:8x8", seed_pb2.ACTIVATION_LAYOUT_NCHW, 16, [8, 8]),
    ("NC:32", seed_pb2.ACTIVATION_LAYOUT_NC, 32, []),
])
def test_parse_site(text, layout, channels, spatial):
    site = parse_site(text)
    assert (site.layout, site.channels, list(site.spatial)) == (layout, channels, spatial)


@pytest.mark.parametrize("text", ["NCL", "XYZ:8", "NCL:eight:40", "NC:8:4x4", "NCL:0:40"])
def test_parse_site_rejects(text):
    with pytest.raises(ConfigError, match="--site"):
        parse_site(text)


def test_bad_counts_and_missing_platform(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("ESPER_ENDPOINTS", raising=False)
    assert main(["karn", "evolve", "--generations", "0", "--data-dir", str(tmp_path)]) == 2
    assert "--generations=0" in capsys.readouterr().err
    assert main(["karn", "evolve", "--generations", "1", "--data-dir", str(tmp_path)]) == 2
    assert "endpoints.json" in capsys.readouterr().err
