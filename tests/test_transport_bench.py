"""The transport benchmark's measurement runs end to end and writes the JSON the docs rely on.

Structure only: speed depends on the machine and its load, so nothing here is timed.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # benchmarks/ is not an installed package

from benchmarks import transport  # noqa: E402


def test_measure_one_small_size_gives_every_method_mode_and_ratio(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Few messages: worker start-up (two fresh interpreters per method) dominates anyway.
    monkeypatch.setitem(transport.PLANS, True, {"reps": 1, "latency_bytes": 2 * 1024 * 1024,
                                                "stream_bytes": 4 * 1024 * 1024, "min_n": 3})
    size = 64 * 1024
    result = transport.measure((size,), quick=True, reps=1)
    json.loads(json.dumps(result))  # JSON-serialisable as written by main()
    methods = list(transport.DEFAULT_METHODS)
    assert result["config"]["methods"] == methods and result["config"]["sizes"] == [size]
    assert result["reference"] == "gloo" and result["host"]["cpus"] >= 1
    assert [(r["size"], r["mode"]) for r in result["rows"]] == [
        (size, "latency"), (size, "throughput")]
    latency, throughput = result["rows"]
    for m in methods:
        assert latency[m]["samples"] == transport.counts(size, True)["latency"][0]
        assert 0 < latency[m]["rtt_us_p10"] <= latency[m]["rtt_us"] <= latency[m]["rtt_us_p90"]
        assert throughput[m]["messages"] == transport.counts(size, True)["throughput"][0]
        for row in (latency, throughput):
            assert row[m]["mbps"] > 0 and row[m]["cpu_us_per_msg"] > 0
    for row in (latency, throughput):
        assert set(row["ratios"]) == set(methods) - {"gloo"}
        for r in row["ratios"].values():
            assert 0 < r["min"] <= r["median"] <= r["max"]
    table = transport.table(result)
    assert "64 KiB" in table and all(f"{m}/gloo" in table for m in methods if m != "gloo")
