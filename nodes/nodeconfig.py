"""Reading a node's config file, with the paths it stores made absolute again.

The testbed writes node configs into the run folder with paths relative to that folder
(testbed.run.records.RunDir.write_node_config), so a copied or moved run folder still resumes;
`run_dir` says where the folder is relative to the config file itself. Nothing else changes.
"""

from __future__ import annotations

import json
import os
from typing import Any

PATH_KEYS = ("checkpoint",)  # the config entries that are files inside the run folder


def read(path: str) -> dict[str, Any]:
    with open(path) as f:
        config = json.load(f)
    if "run_dir" in config:
        base = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)),
                                             config["run_dir"]))
        config["run_dir"] = base
        for key in PATH_KEYS:
            if config.get(key) and not os.path.isabs(config[key]):
                config[key] = os.path.join(base, config[key])
    return config
