"""pipelines.tools.bench.config: the CLI's sizes and the config's checks."""

from __future__ import annotations

import pytest

from pipelines.tools.bench.config import BenchConfig, parse_sizes


def test_parse_sizes():
    assert parse_sizes(["4096", "8192,16k"]) == (4096, 8192, 16384)
    assert parse_sizes(["32K"]) == (32768,)
    with pytest.raises(ValueError, match="'4x'"):
        parse_sizes(["4x"])
    with pytest.raises(ValueError, match="no scene size"):
        parse_sizes([" , "])


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="sizes"):
        BenchConfig(sizes=())
    with pytest.raises(ValueError, match="tile_overlap"):
        BenchConfig(tile_overlap=1.0)
    with pytest.raises(ValueError, match="device"):
        BenchConfig(device="tpu")
    assert BenchConfig(sizes=[256]).sizes == (256,)  # type: ignore[arg-type]
