"""A researcher's own model, data set and scheme, named by import path, with no edit inside
sledge: they run end to end (the node processes import the same references), their cut points
are listed from the model's children, and every mistake is named before any node starts."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from nodes.models import build_model, cut_points, split_model
from testbed.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "topologies" / "tiny.py")

MODEL = '''
import torch
from torch import nn


class Net(nn.Module):  # not an nn.Sequential: its units are found by tracing forward
    def __init__(self, num_classes, in_channels):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


class Skip(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 1, 1), nn.Conv2d(1, 1, 1)

    def forward(self, x):
        return self.b(self.a(x)) + x
'''
DATA = '''
import torch
from torch.utils.data import TensorDataset


def load(root=None):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(240, 1, 8, 8, generator=g)
    y = (x.mean(dim=(1, 2, 3)) > 0).long() + 2 * (x[:, 0, 0, 0] > 0).long()
    return (x[:200], y[:200]), TensorDataset(x[200:], y[200:])
'''
SCHEME = '''
from nodes.schemes.psl import PSL


class CountingPSL(PSL):  # PSL that reports how many rounds the server ran it
    name = "counting_psl"
    options = {**PSL.options, "tag": "x"}

    def server_round(self, ctx, rnd, iters):
        super().server_round(ctx, rnd, iters)
        ctx.extra["counting_psl"] = f"{self.opts['tag']}{rnd}"
'''


@pytest.fixture
def own(tmp_path, monkeypatch):
    pkg = tmp_path / "mylab"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "data.py").write_text(textwrap.dedent(DATA))
    (tmp_path / "mymodel.py").write_text(textwrap.dedent(MODEL))
    (tmp_path / "myscheme.py").write_text(textwrap.dedent(SCHEME))
    monkeypatch.chdir(tmp_path)  # `mylab.data:load` resolves from where sledge runs
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


@pytest.mark.net
def test_own_model_data_and_scheme_train_over_mininet_and_the_report_shows_them(own, no_leaks):
    """Outside the repository (a tmp dir): a model cut by a child's name, a data set in a
    package, a scheme subclass; over a real Mininet topology, the zygote importing them first."""
    out = own / "runs"
    assert main(["run", TINY, "--set", "run.launcher=zygote",
                 "--model", "mymodel.py:Net", "--cut", "features",
                 "--dataset", "mylab.data:load", "--scheme", "myscheme.py:CountingPSL,tag=r",
                 "--rounds", "2", "--set", "iters_per_round=3", "--out", str(out)]) == 0
    (run,) = out.iterdir()
    rounds = [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()]
    assert [r["nodes"]["srv"]["counting_psl"] for r in rounds] == ["r1", "r2"]  # node-side code
    config = json.loads((run / "config.json").read_text())
    assert config["config"]["model"]["name"] == f"{own}/mymodel.py:Net"  # made absolute
    assert config["model"]["num_classes"] == 4 and config["model"]["image_size"] == 8
    assert all(0.0 <= r["test_acc"] <= 1.0 for r in rounds)
    assert config["network"] == "mininet"
    report = (run / "report.md").read_text()
    assert f"model {own}/mymodel.py:Net cut after features" in report
    assert "data: mylab.data:load" in report and f"{own}/myscheme.py:CountingPSL" in report


def test_cut_points_of_an_own_model_are_its_children_in_forward_order(own, capsys):
    m = build_model(f"{own}/mymodel.py:Net", num_classes=4, in_channels=1, image_size=8)
    assert cut_points(m) == ["features", "pool"]
    assert main(["list", "cuts", "--model", "mymodel.py:Net", "--dataset", "mylab.data:load"]
                ) == 0
    assert capsys.readouterr().out.split() == ["features", "pool"]
    import torch

    x = torch.randn(3, 1, 8, 8)
    first, rest = split_model(m, ["pool"])
    assert torch.equal(rest(first(x)), m(x))


@pytest.mark.parametrize(("flags", "names"), [
    (["--model", "mymodel.py:Nope"], "'model.name': model '"),
    (["--model", "mymodel.py:Skip"], "skip connection"),
    (["--model", "nomodule.sub:Net"], "cannot import 'nomodule.sub'"),
    (["--dataset", "mylab.data:missing"], "'data.dataset': dataset 'mylab.data:missing'"),
    (["--scheme", "mymodel.py:Net"], "not a subclass of nodes.schemes.base.Scheme"),
    (["--model", "mymodel.py:Net", "--cut", "head"], "'model.cuts'"),
])
def test_a_wrong_reference_is_named_before_any_node_starts(own, capsys, flags, names):
    data = [] if "--dataset" in flags else ["--dataset", "mylab.data:load"]
    assert main(["run", TINY, "--loopback", *data, *flags, "--out", str(own / "runs")]) == 2
    err = capsys.readouterr().err
    assert names in err and err.count("\n") == 1, err
    assert not (own / "runs").exists()  # refused before anything was made
