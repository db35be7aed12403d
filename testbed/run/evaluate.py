"""Test accuracy, measured outside the emulated network from the nodes' checkpoints.

Evaluation is instrumentation, not part of the algorithm under test, so it must not add
traffic to the links being measured: after each round the controller assembles each client's
model from the checkpointed segments (which node holds which segment is the scheme's
placement) and scores it on the common test set. Clients whose assembled models are equal tensor for
tensor (FL and SFL after FedAvg) are scored once: the score would be the same.
"""

from __future__ import annotations

import torch

from nodes.compression import Codec
from nodes.data import ArrayDataset
from nodes.migrate import state_hash
from nodes.models import build_model, split_model


class Evaluator:
    def __init__(self, model_kwargs: dict, cuts: list[str], test: ArrayDataset,
                 batch_size: int = 500, codec: Codec | None = None) -> None:
        self.model_kwargs, self.cuts = model_kwargs, cuts
        self.test, self.batch_size = test, batch_size
        self.codec = codec  # a run's cut compression is part of its model (nodes.compression)

    @torch.no_grad()
    def accuracy(self, segments: list[dict]) -> float:
        model = build_model(**self.model_kwargs)
        segs = split_model(model, self.cuts)
        for seg, state in zip(segs, segments, strict=True):
            seg.load_state_dict(state)
        model.eval()
        correct = 0
        for i in range(0, len(self.test), self.batch_size):
            x, y = self.test.x[i:i + self.batch_size], self.test.y[i:i + self.batch_size]
            for j, seg in enumerate(segs):
                x = seg(x if j == 0 or self.codec is None else self.codec.roundtrip(x))
            correct += int((x.argmax(1) == y).sum())
        return correct / len(self.test)

    def evaluate(self, ckpt_paths: dict[str, str],
                 parts: dict[str, list[tuple[str, int]]]) -> dict[str, float]:
        """parts: client -> [(node, segment index)] in model order."""
        states = {n: torch.load(p, weights_only=True)["segments"] for n, p in ckpt_paths.items()}
        digest: dict[tuple[str, int], str] = {}
        scores: dict[tuple[str, ...], float] = {}
        out = {}
        for c, plist in parts.items():
            for n, s in plist:
                if (n, s) not in digest:
                    digest[n, s] = state_hash(states[n][s], {})  # names, dtypes, bytes
            key = tuple(digest[n, s] for n, s in plist)
            if key not in scores:
                scores[key] = self.accuracy([states[n][s] for n, s in plist])
            out[c] = scores[key]
        return out

