"""`sledge list schemes|models|datasets|cuts`: what a run can name, read from the registries."""

from __future__ import annotations

import argparse
from typing import Any

from testbed.errors import ConfigError


def cmd_list(a: argparse.Namespace) -> int:
    if a.what == "schemes":
        from nodes.schemes import REGISTRY

        for name, cls in sorted(REGISTRY.items()):
            opts = ", ".join(f"{k}={v!r}" for k, v in cls.options.items())
            print(f"{name:10} {cls.label or name:10} roles {'/'.join(cls.roles)}"
                  f"{'; options ' + opts if opts else ''}")
    elif a.what == "topologies":
        from testbed.emu.topology import TOPOLOGIES, known_topologies

        for name in known_topologies():
            doc = (TOPOLOGIES / f"{name}.py").read_text().split('"""')
            first = doc[1].strip().splitlines()[0] if len(doc) > 2 else ""
            print(f"{name:14} {first}")
    elif a.what == "models":
        from nodes.models import MODEL_NAMES

        print("\n".join(MODEL_NAMES))
    elif a.what == "datasets":
        from nodes.data import DATASETS

        for name, spec in sorted(DATASETS.items()):
            where = ("bundled with a Python package" if not spec.needs_root else
                     f"files in {spec.default_root} (data.root)" if spec.default_root else
                     "files in data.root")
            print(f"{name:14} {spec.num_classes} classes, {spec.in_channels}x{spec.image_size}"
                  f"x{spec.image_size}; {where}")
    else:
        from nodes.data import dataset_info
        from nodes.models import build_model, cut_points

        try:
            info = dataset_info(a.dataset)
            model = build_model(a.model, num_classes=info["num_classes"],
                                in_channels=info["in_channels"], image_size=info["image_size"])
        except ValueError as e:
            raise ConfigError(f"sledge list cuts: {e}") from None
        print("\n".join(cut_points(model)))
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("list", help="list the schemes, models, data sets, topologies or a "
                                    "model's cut points")
    p.add_argument("what", choices=["schemes", "models", "datasets", "cuts", "topologies"])
    p.add_argument("--model", default="smallcnn", help="for cuts: the model (default smallcnn)")
    p.add_argument("--dataset", default="digits",
                   help="for cuts: the data set that shapes its input (default digits)")
    p.set_defaults(func=cmd_list)
