"""Bad input gets a clear error naming the field; topology scripts load by Mininet's rules."""

from __future__ import annotations

import os

import pytest

from testbed.cli.main import main
from testbed.emu.topology import load_topology
from testbed.errors import ConfigError
from testbed.plan.config import RunConfig

TINY = os.path.join(os.path.dirname(os.path.dirname(__file__)), "topologies", "tiny.py")


@pytest.mark.parametrize("field,value", [("run.rounds", 0), ("train.batch_size", -1),
                                         ("train.lr", 0), ("data.partition", "zipf"),
                                         ("model.cuts", []), ("train.momentum", 1.5),
                                         ("run.name", "a b")])
def test_bad_config_value_names_the_dotted_field(field, value):
    """Given flat (the command line's names), dotted or nested, the error names the field."""
    section, name = field.split(".")
    flat = {"model.cuts": "cuts", "run.name": "name"}.get(field, name)
    for given in ({flat: value}, {field: value}, {section: {name: value}}):
        with pytest.raises(ConfigError, match=repr(field)):
            RunConfig.from_dict(given)


def test_unknown_config_field_is_named():
    with pytest.raises(ConfigError, match="roundz"):
        RunConfig.from_dict({"roundz": 3})


def test_topology_script_loads_with_parameters():
    topo, name = load_topology(TINY, params={"clients": 3, "bw": 5})
    assert name == "tiny"
    assert sorted(topo.hosts()) == ["c1", "c2", "c3", "srv"]
    assert topo.nodeInfo("srv")["role"] == "server"
    assert topo.linkInfo("c3", "s1")["bw"] == 5


def test_unknown_topology_parameter_is_named():
    with pytest.raises(ConfigError, match="bandwidth"):
        load_topology(TINY, params={"bandwidth": 5})


def test_cli_exits_2_with_the_field_named(capsys):
    assert main(["run", TINY, "--rounds", "0"]) == 2
    assert "'run.rounds'" in capsys.readouterr().err
    assert main(["run", "/nonexistent/topo.py"]) == 2
