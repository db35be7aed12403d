"""The controller's evaluator scores each client's assembled model; clients whose models are
equal tensor for tensor are scored once, and that must not change any client's score."""

from __future__ import annotations

import torch

from nodes.data import ArrayDataset
from nodes.models import build_model, split_model
from testbed.run.evaluate import Evaluator

KW = {"name": "smallcnn", "num_classes": 10, "in_channels": 1, "image_size": 8}


def _checkpoint(path, seed: int) -> str:
    segs = split_model(build_model(**KW, seed=seed), ["conv2"])
    torch.save({"segments": [s.state_dict() for s in segs]}, path)
    return str(path)


def test_equal_models_are_scored_once_and_every_client_keeps_its_own_score(tmp_path,
                                                                            monkeypatch):
    ckpts = {"c1": _checkpoint(tmp_path / "c1.pt", 1), "c2": _checkpoint(tmp_path / "c2.pt", 1),
             "c3": _checkpoint(tmp_path / "c3.pt", 2), "srv": _checkpoint(tmp_path / "s.pt", 3)}
    parts = {c: [(c, 0), ("srv", 1)] for c in ("c1", "c2")} | {"c3": [("c3", 0), ("c3", 1)]}
    x = 5 * torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ev = Evaluator(KW, ["conv2"], ArrayDataset(x, torch.zeros(64, dtype=torch.long), 10, "-"),
                   batch_size=16)
    # labels are c3's own predictions: c3 scores 1.0, the other model less
    model = build_model(**KW)
    for seg, s in zip(split_model(model, ["conv2"]),
                      [torch.load(ckpts[n], weights_only=True)["segments"][i]
                       for n, i in parts["c3"]], strict=True):
        seg.load_state_dict(s)
    with torch.no_grad():
        ev.test.y = model.eval()(x).argmax(1)
    one_by_one = {c: ev.accuracy([torch.load(ckpts[n], weights_only=True)["segments"][s]
                                  for n, s in p]) for c, p in parts.items()}
    calls = []
    real = ev.accuracy
    monkeypatch.setattr(ev, "accuracy", lambda segs: calls.append(1) or real(segs))
    got = ev.evaluate(ckpts, parts)
    assert got == one_by_one
    assert len(calls) == 2  # c1 and c2 hold the same weights: one score for both
    assert one_by_one["c1"] != one_by_one["c3"]  # the models differ, so would their scores
