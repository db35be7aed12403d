"""Experiment files and the command line: one file runs a whole experiment, `--set` and flags
override it in a stated order, errors name the dotted field, the examples run, and `sledge
compare` honours every run option (it once dropped --compress and --select silently)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import testbed.cli.compare as cli_compare
from testbed.cli.main import build_parser, main, prepared
from testbed.errors import ConfigError, RunFailed
from testbed.plan.config import RunConfig
from testbed.scenario.spec import prepare, read

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
QUICK = ["--loopback", "--set", "train.iters_per_round=1", "--set",
         "data.train_limit=200", "--set", "data.test_limit=100", "--set", "run.launcher=zygote"]


def test_the_examples_cover_every_topology_and_load():
    scripts = {Path(read(str(p))["topology"]["script"]).name for p in EXAMPLES}
    assert scripts == {p.name for p in (ROOT / "topologies").glob("*.py")}
    for p in EXAMPLES:
        prepared_ = prepare(read(str(p)))
        assert prepared_.cfg.run.name.startswith(prepared_.topo_name)


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_each_example_runs(example, tmp_path):
    """On loopback, one round of one step: the topology's roles, tiers and cuts fit together
    (each example runs on Mininet as `sudo sledge run examples/<name>.yaml`)."""
    timed = read(str(example)).get("run", {}).get("scenario")  # its events need its rounds
    rounds = [] if timed else ["--rounds", "1"]
    assert main(["run", str(example), *QUICK, *rounds, "--out", str(tmp_path),
                 "--set", "data.dataset=digits"]) == 0
    (run,) = tmp_path.iterdir()
    assert json.loads((run / "summary.json").read_text())["status"] == "ok"
    again = yaml.safe_load((run / "experiment.yaml").read_text())
    assert again["loopback"] is True and again["train"]["iters_per_round"] == 1
    assert ("scenario" in again) == bool(timed) and not again["run"]["scenario"]
    assert Path(again["topology"]["script"]).is_absolute()


def test_file_then_set_then_flags(tmp_path):
    exp = tmp_path / "e.yaml"
    exp.write_text(yaml.safe_dump({
        "topology": {"script": str(ROOT / "topologies" / "tiny.py"), "params": {"clients": 3}},
        "train": {"lr": 0.2, "batch_size": 8}, "run": {"rounds": 7, "seed": 4},
        "scheme": "epsl,phi=0.5" and {"name": "epsl", "options": {"phi": 0.5}}}))
    a = build_parser().parse_args(["run", str(exp), "--set", "train.lr=0.1", "--set",
                                   "rounds=9", "--rounds", "2", "--scheme", "epsl,phi=1",
                                   "-p", "bw=5", "--set", "cycles.client=3e8"])
    p = prepared(a)
    assert (p.cfg.train.lr, p.cfg.train.batch_size) == (0.1, 8)      # --set over the file
    assert (p.cfg.run.rounds, p.cfg.run.seed) == (2, 4)              # the flag over --set
    assert (p.cfg.scheme.name, p.cfg.scheme.options) == ("epsl", {"phi": 1})
    assert p.cfg.devices.cycles == {"client": 3e8}
    assert p.kwargs["topology_args"]["params"] == {"clients": 3, "bw": 5}
    assert sorted(p.topo.hosts()) == ["c1", "c2", "c3", "srv"]


@pytest.mark.parametrize(("doc", "names"), [
    ({"train": {"lr": -1}}, "'train.lr'"),
    ({"train": {"lr": 0.1, "rate": 2}}, "'train.rate'"),
    ({"nets": {}}, "'nets'"),
    ({"topology": {"script": "tiny.py", "parms": {}}}, "'topology.parms'"),
    ({"devices": {"cpu": {"c1": 2}}}, "'devices.cpu.c1'"),
])
def test_a_bad_experiment_file_names_the_dotted_field(doc, names, tmp_path):
    exp = tmp_path / "e.yaml"
    exp.write_text(yaml.safe_dump({"topology": str(ROOT / "topologies" / "tiny.py"), **doc}))
    with pytest.raises(ConfigError, match=names):
        prepare(read(str(exp)))


def test_config_round_trips_through_its_dict_and_refuses_what_it_does_not_know():
    cfg = RunConfig(rounds=2, cycles={"client": 3e8}, compression={"method": "quant", "bits": 8})
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    assert RunConfig.from_dict({"run.rounds": 2, "devices.cycles.client": 3e8,
                                "efficiency": {"compression": {"method": "quant", "bits": 8}}}
                               ) == cfg
    with pytest.raises(ConfigError, match="'efficiency.compression'"):
        RunConfig(compression={"method": "zip"})
    with pytest.raises(ConfigError):  # checked when set, too
        cfg.with_changes(lr=-1)


def test_compare_runs_every_scheme_with_every_run_option(tmp_path, monkeypatch):
    """The dropped-options bug: --compress and --select reach every scheme's run, and so do
    --set and the other run options; the schemes take the run's spec syntax."""
    seen = []

    def fake_run(self):
        seen.append(self.cfg)
        raise RunFailed("not run (test)")

    monkeypatch.setattr(cli_compare.Experiment, "run", fake_run)
    rc = main(["compare", str(ROOT / "topologies" / "tiny.py"), "--loopback",
               "--schemes", "psl", "epsl,phi=0.5", "fl", "--compress", "quant,bits=8",
               "--select", "rpowd,m=1,d=2", "--set", "train.lr=0.01", "--rounds", "2",
               "--out", str(tmp_path)])
    assert rc == 1 and len(seen) == 3
    assert [(c.scheme.name, c.scheme.options) for c in seen] == [
        ("psl", {}), ("epsl", {"phi": 0.5}), ("fl", {})]
    for c in seen:
        assert c.efficiency.compression == {"method": "quant", "bits": 8}
        assert c.efficiency.selection == {"policy": "rpowd", "m": 1, "d": 2}
        assert (c.train.lr, c.run.rounds, c.data.dataset) == (0.01, 2, "digits")
        assert c.devices.cycles  # the seed's modelled device speeds by default


def test_sledge_list_names_what_a_run_can_use(capsys):
    from nodes.schemes import REGISTRY

    assert main(["list", "schemes"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == sorted(REGISTRY)
    assert main(["list", "cuts", "--model", "smallcnn"]) == 0
    assert capsys.readouterr().out.split() == ["conv1", "conv2", "fc1"]
    assert main(["list", "cuts", "--model", "nope"]) == 2
    assert "nope" in capsys.readouterr().err


def test_the_readme_api_example_runs(tmp_path, monkeypatch):
    """The Python example of the README, as written (its relative paths from a folder that
    has the project's topologies)."""
    import re

    code = re.search(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    (tmp_path / "topologies").symlink_to(ROOT / "topologies")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["summary"]["status"] == "ok" and scope["summary"]["rounds"] == 2
    (run,) = (tmp_path / "runs").iterdir()
    assert (run / "report.md").exists() and (run / "report.html").exists()
    assert scope["exp"]._torn_down
