"""
Models for sledge: the networks that split learning cuts into segments.

A model is an nn.Sequential of named *units*. A cut may fall only on the
boundary between two consecutive units, so a residual block is never split
and its skip connection never has to cross the network (algorithms.md 1.2).

build_model: a "smallcnn" or a "resnet18"; every node that passes the same
seed gets bit-identical initial weights.

cut_points: the unit names after which a cut is allowed.

split_model: consecutive segments that share the model's module objects.

unit_stats: per-unit output shape, parameters and MACs, measured with a real
forward pass (the inputs of the latency model, algorithms.md 11 and 13).

segment_output_shape: the per-sample output shape of one segment, e.g. the
shape of the activation a client sends.

UnitSequential: the nn.Sequential subclass all of the above return; it lets
unit names keep the "layer1.0" spelling of algorithms.md 13.

This module knows nothing about transport, codecs, scheduling or training
schemes; those consume the segments built here.
"""

import inspect
import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import torch
from torch import nn

from nodes.imports import is_reference, resolve

MODEL_NAMES = ("smallcnn", "resnet18")
STEMS = ("auto", "cifar", "imagenet")

__all__ = [
    "MODEL_NAMES",
    "STEMS",
    "BasicBlock",
    "UnitSequential",
    "UnitStats",
    "build_model",
    "cut_points",
    "segment_output_shape",
    "split_model",
    "unit_stats",
]


class UnitSequential(nn.Sequential):
    """nn.Sequential whose unit names may contain dots, e.g. "layer1.0".

    nn.Module bans dots in child names only because get_submodule() splits
    paths on them. Units here are addressed by their whole name, so dotted
    names are registered directly and get_submodule() matches them as whole
    path prefixes. State-dict keys then read "layer1.0.conv1.weight", as in
    torchvision; to find a key's unit, match unit-name prefixes rather than
    splitting on the first dot.
    """

    def add_module(self, name: str, module: nn.Module | None) -> None:
        if not isinstance(name, str) or "." not in name:
            super().add_module(name, module)
            return
        if module is not None and not isinstance(module, nn.Module):
            raise TypeError(f"{torch.typename(module)} is not a Module subclass")
        self._modules[name] = module

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict,
                              strict: bool, missing_keys: list[str],
                              unexpected_keys: list[str], error_msgs: list[str]) -> None:
        # nn.Module flags a key as unexpected when its first dotted component names no child;
        # "layer1.0.conv1.weight" belongs to unit "layer1.0", which load_state_dict loads.
        seen = len(unexpected_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        dotted = tuple(f"{prefix}{n}." for n in self._modules if "." in n)
        unexpected_keys[seen:] = [k for k in unexpected_keys[seen:] if not k.startswith(dotted)]

    def get_submodule(self, target: str) -> nn.Module:
        for name, unit in self._modules.items():
            if unit is None or "." not in name:
                continue
            if target == name:
                return unit
            if target.startswith(name + "."):
                return unit.get_submodule(target[len(name) + 1 :])
        return super().get_submodule(target)


class BasicBlock(nn.Module):
    """ResNet basic block with torchvision's parameter names and 1x1 projection shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + identity)


# No in-place ReLUs anywhere: a segment's input may be a leaf that requires grad,
# and its output a tensor whose detached alias is shipped, so mutation would break autograd.


def _smallcnn(num_classes: int, in_channels: int, image_size: int) -> UnitSequential:
    side = image_size // 4  # two floor-mode 2x2 max-pools
    if side < 1:
        raise ValueError(f"image_size={image_size} is too small for smallcnn (need >= 4)")

    def conv_unit(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))

    units = [
        ("conv1", conv_unit(in_channels, 32)),
        ("conv2", conv_unit(32, 64)),
        # Flatten sits inside fc1 so a cut after conv2 ships the 4-D feature map.
        ("fc1", nn.Sequential(nn.Flatten(), nn.Linear(64 * side * side, 128), nn.ReLU())),
        ("fc2", nn.Linear(128, num_classes)),
    ]
    return UnitSequential(OrderedDict(units))


def _resnet18(num_classes: int, in_channels: int, image_size: int, stem: str) -> UnitSequential:
    if stem == "auto":
        stem = "cifar" if image_size <= 32 else "imagenet"
    units: list[tuple[str, nn.Module]] = []
    if stem == "cifar":
        conv = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        units.append(("stem", nn.Sequential(conv, nn.BatchNorm2d(64), nn.ReLU())))
    else:
        conv = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        units.append(("stem", nn.Sequential(conv, nn.BatchNorm2d(64), nn.ReLU())))
        units.append(("maxpool", nn.MaxPool2d(3, 2, 1)))
    in_planes = 64
    for stage, planes in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            stride = 2 if stage > 1 and block == 0 else 1
            units.append((f"layer{stage}.{block}", BasicBlock(in_planes, planes, stride)))
            in_planes = planes
    # Adaptive pooling works for any input size (SplitFed's avg_pool2d(7) breaks at 64x64).
    units.append(("pool", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())))
    units.append(("fc", nn.Linear(512, num_classes)))
    model = UnitSequential(OrderedDict(units))
    for m in model.modules():  # torchvision's conv init; BN already starts at (1, 0)
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model


def build_model(
    name: str,
    *,
    num_classes: int = 10,
    in_channels: int = 1,
    image_size: int = 28,
    stem: str = "auto",
    seed: int | None = None,
) -> nn.Sequential:
    """Build model `name` as a UnitSequential of named units (the cut candidates).

    stem applies to resnet18 only: "cifar" (3x3/1 conv, no maxpool unit),
    "imagenet" (7x7/2 conv + "maxpool" unit), or "auto" (cifar iff image_size <= 32).
    With a seed, weights are drawn under torch.manual_seed(seed) in a forked RNG,
    so the global RNG stream is left exactly as it was.
    """
    if is_reference(name):  # the user's own: pkg.module:factory or file.py:factory
        def build_user() -> UnitSequential:
            return user_model(name, num_classes=num_classes, in_channels=in_channels,
                              image_size=image_size)

        if seed is None:
            return build_user()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return build_user()
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model name={name!r}; valid choices: {', '.join(MODEL_NAMES)} "
                         f"or your own as pkg.module:factory or path/to/file.py:factory")
    if stem not in STEMS:
        raise ValueError(f"unknown stem={stem!r}; valid choices: {', '.join(STEMS)}")
    if name == "smallcnn" and stem != "auto":
        raise ValueError(f"stem={stem!r} applies only to resnet18; smallcnn takes stem='auto'")
    for field, value in (
        ("num_classes", num_classes),
        ("in_channels", in_channels),
        ("image_size", image_size),
    ):
        if value < 1:
            raise ValueError(f"{field}={value} must be a positive integer")

    def build() -> UnitSequential:
        if name == "smallcnn":
            return _smallcnn(num_classes, in_channels, image_size)
        return _resnet18(num_classes, in_channels, image_size, stem)

    if seed is None:
        return build()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def user_model(ref: str, **shape: int) -> UnitSequential:
    """The user's model `ref` (an nn.Module factory, called with those of num_classes,
    in_channels and image_size it takes) as named units: the children of an nn.Sequential,
    else the top-level children in the order its forward calls them (torch.fx), each with the
    functions between them, provided one tensor passes from each to the next."""
    factory = resolve(ref, "model")
    if not callable(factory):
        raise ValueError(f"model {ref!r}: {type(factory).__name__} is not a factory (a class "
                         f"or function returning an nn.Module)")
    params = inspect.signature(factory).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    try:
        model = factory(**{k: v for k, v in shape.items() if takes_any or k in params})
    except Exception as e:  # the user's code: say whose and what
        raise ValueError(f"model {ref!r}: building it raised {type(e).__name__}: {e}") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {ref!r}: returned {type(model).__name__}, not an nn.Module")
    if isinstance(model, nn.Sequential):
        return UnitSequential(OrderedDict(model.named_children()))
    return _units_by_tracing(model, ref)


def _units_by_tracing(model: nn.Module, ref: str) -> UnitSequential:
    from torch.fx import symbolic_trace
    from torch.fx.passes.split_module import split_module

    try:
        gm = symbolic_trace(model)
    except Exception as e:
        raise ValueError(f"model {ref!r}: not an nn.Sequential and torch.fx cannot trace it "
                         f"({type(e).__name__}: {e}); return an nn.Sequential of its parts"
                         ) from None
    order: list[str] = []
    unit_of: dict[Any, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            top = str(node.target).split(".")[0]
            if not order or order[-1] != top:
                if top in order:
                    raise ValueError(f"model {ref!r}: child {top!r} is called again after "
                                     f"{order[-1]!r}; its parts are not one sequence")
                order.append(top)
        unit_of[node] = max(len(order) - 1, 0)
    if not order:
        raise ValueError(f"model {ref!r}: has no child modules to cut between")
    split = split_module(gm, model, lambda n: unit_of[n])
    calls = [n for n in split.graph.nodes if n.op == "call_module"]
    prev = next(n for n in split.graph.nodes if n.op == "placeholder")
    for i, call in enumerate(calls):
        if len(call.args) != 1 or call.args[0] is not prev or call.kwargs:
            raise ValueError(f"model {ref!r}: more than one tensor passes into "
                             f"{order[i]!r} (a skip connection across top-level children?); "
                             f"wrap such parts in one child module")
        prev = call
    return UnitSequential(OrderedDict((order[i], getattr(split, str(c.target)))
                                      for i, c in enumerate(calls)))


def cut_points(model: nn.Sequential) -> list[str]:
    """Unit names after which a cut is allowed: every unit but the last."""
    return [name for name, _ in model.named_children()][:-1]


def split_model(model: nn.Sequential, cuts: Sequence[str]) -> list[nn.Sequential]:
    """Split into len(cuts) + 1 consecutive segments, cutting after each named unit.

    Segments hold the model's own unit objects (no copies) under the same names,
    so training a segment trains the model and segment state_dict keys are stable.
    """
    if isinstance(cuts, str):
        raise TypeError(f"cuts must be a list of unit names, not the string {cuts!r}")
    units = list(model.named_children())
    names = [name for name, _ in units]
    allowed = names[:-1]
    edges = [0]
    for cut in cuts:
        if cut not in allowed:
            raise ValueError(f"cut {cut!r} is not a cut point; valid cuts: {', '.join(allowed)}")
        end = names.index(cut) + 1
        if end <= edges[-1]:
            raise ValueError(
                f"cut {cut!r} is out of order: cuts must be distinct and follow the unit order "
                f"{', '.join(allowed)}"
            )
        edges.append(end)
    edges.append(len(units))
    segments: list[nn.Sequential] = []
    for start, stop in pairwise(edges):
        segment = UnitSequential(OrderedDict(units[start:stop]))
        segment.training = model.training  # the container only; never touch shared units' modes
        segments.append(segment)
    return segments


@dataclass(frozen=True)
class UnitStats:
    """Size and cost of one unit for a single sample."""

    name: str
    out_shape: tuple[int, ...]  # per sample, without the batch dim
    out_elems: int
    params: int
    macs: int  # forward multiply-accumulates of convs and linears; BN/ReLU/pool ignored


_MAC_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _layer_macs(layer: nn.Module, out: torch.Tensor) -> int:
    # Called on a batch of 1, so out.numel() is per sample.
    if isinstance(layer, nn.Linear):
        return out.numel() * layer.in_features
    return out.numel() * (layer.in_channels // layer.groups) * math.prod(layer.kernel_size)


@contextmanager
def _probing(module: nn.Module) -> Iterator[None]:
    """Eval mode and no_grad for one measurement pass, restoring each submodule's own mode.

    Eval mode keeps BN running stats untouched and lets BN accept a batch of 1.
    """
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in modes:
            m.training = mode


def _probe_input(module: nn.Module, input_shape: tuple[int, ...]) -> torch.Tensor:
    ref = next(module.parameters(), None)
    if ref is None:
        return torch.zeros(1, *input_shape)
    return torch.zeros(1, *input_shape, dtype=ref.dtype, device=ref.device)


def unit_stats(model: nn.Sequential, input_shape: tuple[int, ...]) -> list[UnitStats]:
    """Per-unit stats for a per-sample input_shape, from one forward of a batch of 1."""
    units = list(model.named_children())
    unit_name = {unit: name for name, unit in units}
    owner = {
        layer: name
        for name, unit in units
        for layer in unit.modules()
        if isinstance(layer, _MAC_LAYERS)
    }
    shapes: dict[str, tuple[int, ...]] = {}
    macs = dict.fromkeys(unit_name.values(), 0)

    def record_shape(unit: nn.Module, _args: object, out: torch.Tensor) -> None:
        shapes[unit_name[unit]] = tuple(out.shape[1:])

    def count_macs(layer: nn.Module, _args: object, out: torch.Tensor) -> None:
        macs[owner[layer]] += _layer_macs(layer, out)

    handles = [unit.register_forward_hook(record_shape) for _, unit in units]
    handles += [layer.register_forward_hook(count_macs) for layer in owner]
    try:
        with _probing(model):
            model(_probe_input(model, input_shape))
    finally:
        for handle in handles:
            handle.remove()
    return [
        UnitStats(
            name=name,
            out_shape=shapes[name],
            out_elems=math.prod(shapes[name]),
            params=sum(p.numel() for p in unit.parameters()),
            macs=macs[name],
        )
        for name, unit in units
    ]


def segment_output_shape(segment: nn.Sequential, input_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Per-sample output shape of segment for a per-sample input_shape (no batch dims)."""
    with _probing(segment):
        out = segment(_probe_input(segment, input_shape))
    return tuple(out.shape[1:])
