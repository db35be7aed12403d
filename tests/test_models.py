"""Tests for nodes.models: unit layout, splitting, seeding and the algorithms.md 13 tables."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nodes.models import (
    UnitStats,
    build_model,
    cut_points,
    segment_output_shape,
    split_model,
    unit_stats,
)


@pytest.fixture(autouse=True)
def _one_thread():
    # Small batches on 2 cores: OpenMP overhead outweighs the second thread (runtime-notes 5).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _units(model: nn.Sequential) -> dict[str, nn.Module]:
    return dict(model.named_children())


def _split_learning_step(segments: list[nn.Sequential], x: torch.Tensor, y: torch.Tensor):
    """Forward/backward as split learning runs it: every cut is a fresh leaf (algorithms.md 1.3)."""
    boundaries = []  # (output that keeps its segment's graph, leaf fed to the next segment)
    h = x
    for segment in segments[:-1]:
        out = segment(h)
        leaf = out.detach().requires_grad_()
        boundaries.append((out, leaf))
        h = leaf
    loss = F.cross_entropy(segments[-1](h), y)
    loss.backward()
    for out, leaf in reversed(boundaries):
        out.backward(leaf.grad)
    return loss.detach()


SPLIT_CASES = [
    ("smallcnn", {"image_size": 8}, ["conv2"]),
    ("smallcnn", {"image_size": 28}, ["conv1", "fc1"]),
    ("resnet18", {"in_channels": 3, "image_size": 32, "stem": "cifar"}, ["layer1.1", "layer3.0"]),
    ("resnet18", {"in_channels": 3, "image_size": 64, "num_classes": 7}, ["layer1.0"]),
]


@pytest.mark.parametrize(("name", "kwargs", "cuts"), SPLIT_CASES)
def test_split_model_gives_same_loss_and_gradients_as_unsplit(name, kwargs, cuts):
    model = build_model(name, seed=3, **kwargs)
    reference = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(0)
    size = kwargs["image_size"]
    x = torch.randn(4, kwargs.get("in_channels", 1), size, size, generator=gen)
    y = torch.randint(0, kwargs.get("num_classes", 10), (4,), generator=gen)

    segments = split_model(model, cuts)
    assert len(segments) == len(cuts) + 1
    split_loss = _split_learning_step(segments, x, y)
    ref_loss = F.cross_entropy(reference(x), y)
    ref_loss.backward()

    torch.testing.assert_close(split_loss, ref_loss.detach(), rtol=1e-6, atol=1e-7)
    pairs = zip(model.named_parameters(), reference.named_parameters(), strict=True)
    for (pname, p), (_, q) in pairs:
        assert p.grad is not None, pname
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=pname)
    # BN running stats see the same batches, split or not.
    for (bname, b), (_, c) in zip(model.named_buffers(), reference.named_buffers(), strict=True):
        torch.testing.assert_close(b, c, rtol=1e-6, atol=1e-7, msg=bname)


def test_split_segments_share_units_and_keep_their_names():
    model = build_model("smallcnn", seed=0)
    head, tail = split_model(model, ["conv2"])
    assert _units(head)["conv2"] is _units(model)["conv2"]
    assert list(_units(head)) == ["conv1", "conv2"]
    assert list(_units(tail)) == ["fc1", "fc2"]
    assert "conv2.0.weight" in head.state_dict()
    assert "fc2.weight" in tail.state_dict()
    with torch.no_grad():
        head.conv1[0].weight.zero_()
    assert torch.count_nonzero(model.conv1[0].weight) == 0
    assert split_model(model, [])[0].state_dict().keys() == model.state_dict().keys()


def test_resnet_units_keep_dotted_names_and_torchvision_keys():
    model = build_model("resnet18", in_channels=3, image_size=32, seed=0)
    _, server = split_model(model, ["layer2.1"])
    assert next(iter(_units(server))) == "layer3.0"
    assert "layer3.0.downsample.0.weight" in server.state_dict()
    # nn.Module forbids dots in child names; UnitSequential must keep these working.
    assert model.get_submodule("layer1.0.conv1") is _units(model)["layer1.0"].conv1
    assert model.get_parameter("layer4.1.bn2.bias").shape == (512,)
    assert list(_units(model[2:4])) == ["layer1.1", "layer2.0"]
    assert copy.deepcopy(server).state_dict().keys() == server.state_dict().keys()


def test_cut_points_are_all_units_but_the_last():
    assert cut_points(build_model("smallcnn")) == ["conv1", "conv2", "fc1"]
    blocks = [f"layer{s}.{b}" for s in range(1, 5) for b in range(2)]
    cifar = build_model("resnet18", in_channels=3, image_size=32)
    assert cut_points(cifar) == ["stem", *blocks, "pool"]
    imagenet = build_model("resnet18", in_channels=3, image_size=64)
    assert cut_points(imagenet) == ["stem", "maxpool", *blocks, "pool"]
    assert cut_points(build_model("resnet18", image_size=32, stem="imagenet"))[1] == "maxpool"


@pytest.mark.parametrize(("name", "kwargs"), [("smallcnn", {}), ("resnet18", {"image_size": 64})])
def test_same_seed_gives_identical_parameters_and_other_seed_does_not(name, kwargs):
    a, b, c = (build_model(name, seed=s, **kwargs) for s in (7, 7, 8))
    for (key, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), key
    # Every random weight differs; BN affine params start at (1, 0) whatever the seed.
    pairs = zip(a.parameters(), c.parameters(), strict=True)
    assert all(not torch.equal(pa, pc) for pa, pc in pairs if pa.dim() > 1)


def test_seeded_build_leaves_global_rng_untouched():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_model("smallcnn", seed=5)
    assert torch.equal(torch.rand(3), expected)


# algorithms.md 13, "ResNet-18 (CIFAR stem: 3x3/1 conv, no maxpool), input 3x32x32,
# 10 classes - 11,173,962 params, 555.4 M MACs": elems/sample and cum. client params.
CIFAR32_ELEMS = {
    "stem": 65_536,
    "layer1.0": 65_536,
    "layer2.0": 32_768,
    "layer3.1": 16_384,
    "layer4.1": 8_192,
    "pool": 512,
    "fc": 10,
}
CIFAR32_CUM_PARAMS = {"stem": 1_856, "layer1.0": 75_840, "layer4.0": 6_448_192}
# algorithms.md 13, "ResNet-18 (ImageNet stem), input 3x224x224, 7 classes - total 11,180,103
# params, 1813.6 M MACs": elems/sample, unit params and unit MACs (M).
IMAGENET224_ELEMS = {
    "stem": 802_816,
    "maxpool": 200_704,
    "layer2.1": 100_352,
    "layer3.0": 50_176,
    "layer4.1": 25_088,
    "fc": 7,
}
IMAGENET224_PARAMS = {
    "stem": 9_536,
    "maxpool": 0,
    "layer1.0": 73_984,
    "layer2.0": 230_144,
    "layer3.0": 919_040,
    "layer4.0": 3_673_088,
    "layer4.1": 4_720_640,
    "fc": 3_591,
}
IMAGENET224_MMACS = {"stem": 118.01, "layer1.0": 231.21, "layer2.0": 179.83, "fc": 0.004}
# algorithms.md 13, "input 3x64x64 (HAM10000 as in SplitFed), 7 classes - 148.0 M MACs".
IMAGENET64_ELEMS = {
    "stem": 65_536,
    "maxpool": 16_384,
    "layer1.0": 16_384,
    "layer2.1": 8_192,
    "layer4.1": 2_048,
}


def _by_name(stats: list[UnitStats]) -> dict[str, UnitStats]:
    return {s.name: s for s in stats}


def test_resnet18_cifar_stem_matches_algorithms_table():
    model = build_model("resnet18", in_channels=3, image_size=32, seed=0)
    assert sum(p.numel() for p in model.parameters()) == 11_173_962
    stats = unit_stats(model, (3, 32, 32))
    assert "maxpool" not in _by_name(stats)
    for name, elems in CIFAR32_ELEMS.items():
        assert _by_name(stats)[name].out_elems == elems, name
    cumulative = 0
    for s in stats:
        cumulative += s.params
        if s.name in CIFAR32_CUM_PARAMS:
            assert cumulative == CIFAR32_CUM_PARAMS[s.name], s.name
    assert sum(s.macs for s in stats) / 1e6 == pytest.approx(555.43, abs=0.01)


def test_resnet18_imagenet_stem_matches_algorithms_table():
    model = build_model("resnet18", num_classes=7, in_channels=3, image_size=224, seed=0)
    assert sum(p.numel() for p in model.parameters()) == 11_180_103
    stats = _by_name(unit_stats(model, (3, 224, 224)))
    assert stats["stem"].out_shape == (64, 112, 112)
    for name, elems in IMAGENET224_ELEMS.items():
        assert stats[name].out_elems == elems, name
    for name, params in IMAGENET224_PARAMS.items():
        assert stats[name].params == params, name
    for name, mmacs in IMAGENET224_MMACS.items():
        assert stats[name].macs / 1e6 == pytest.approx(mmacs, abs=0.005), name
    assert sum(s.macs for s in stats.values()) / 1e6 == pytest.approx(1813.56, abs=0.01)

    small = _by_name(
        unit_stats(
            build_model("resnet18", num_classes=7, in_channels=3, image_size=64), (3, 64, 64)
        )
    )
    for name, elems in IMAGENET64_ELEMS.items():
        assert small[name].out_elems == elems, name
    assert sum(s.macs for s in small.values()) / 1e6 == pytest.approx(148.05, abs=0.01)


def test_smallcnn_sizes_match_runtime_notes():
    # runtime-notes 5: 0.42 M params at 28x28, 0.05 M at 8x8; conv1 25 KiB, conv2 12.5 KiB,
    # fc1 512 B of fp32 activations per sample.
    stats = unit_stats(build_model("smallcnn"), (1, 28, 28))
    assert [s.out_shape for s in stats] == [(32, 14, 14), (64, 7, 7), (128,), (10,)]
    assert [s.out_elems * 4 for s in stats[:3]] == [25_088, 12_544, 512]
    assert sum(s.params for s in stats) == 421_642
    assert stats[0].macs == 28 * 28 * 32 * 9
    digits = unit_stats(build_model("smallcnn", image_size=8), (1, 8, 8))
    assert sum(s.params for s in digits) == 53_002
    assert digits[2].macs == 64 * 2 * 2 * 128


def test_segment_output_shape_is_per_sample():
    model = build_model("smallcnn")
    head, tail = split_model(model, ["conv2"])
    assert segment_output_shape(head, (1, 28, 28)) == (64, 7, 7)
    assert segment_output_shape(tail, (64, 7, 7)) == (10,)
    resnet = build_model("resnet18", num_classes=7, in_channels=3, image_size=64)
    client, _ = split_model(resnet, ["layer1.0"])
    # algorithms.md 13: SplitFed's cut after layer1.0 ships 64x16x16 at 64x64.
    assert segment_output_shape(client, (3, 64, 64)) == (64, 16, 16)


def test_measuring_leaves_no_hooks_and_restores_modes_and_stats():
    model = build_model("resnet18", in_channels=3, image_size=32, seed=0)
    model.train()
    model.fc.eval()  # a mixed state must survive too
    before = copy.deepcopy(model.state_dict())
    unit_stats(model, (3, 32, 32))
    segment_output_shape(model, (3, 32, 32))
    assert all(not m._forward_hooks for m in model.modules())
    assert model.training and _units(model)["layer1.0"].bn1.training
    assert not model.fc.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_unknown_model_name_is_rejected_with_choices():
    with pytest.raises(ValueError, match=r"name='vgg16'.*smallcnn.*resnet18"):
        build_model("vgg16")


def test_bad_build_arguments_are_rejected():
    with pytest.raises(ValueError, match="stem='tiny'"):
        build_model("resnet18", stem="tiny")
    with pytest.raises(ValueError, match="stem='cifar'"):
        build_model("smallcnn", stem="cifar")
    with pytest.raises(ValueError, match="image_size=3"):
        build_model("smallcnn", image_size=3)


@pytest.mark.parametrize(
    ("cuts", "bad"),
    [
        (["conv3"], "conv3"),
        (["fc2"], "fc2"),  # the last unit: nothing would be left after it
        (["conv1", "conv1"], "conv1"),
        (["fc1", "conv2"], "conv2"),
    ],
)
def test_bad_or_out_of_order_cuts_are_rejected(cuts, bad):
    with pytest.raises(ValueError, match=f"cut '{bad}'"):
        split_model(build_model("smallcnn"), cuts)


def test_cuts_given_as_one_string_are_rejected():
    with pytest.raises(TypeError, match="conv1"):
        split_model(build_model("smallcnn"), "conv1")


def test_resnet_segments_load_their_own_state_dicts_strictly():
    # Checkpoints, evaluation and FedAvg load segment state dicts whose keys hold dotted unit
    # names ("layer1.0.conv1.weight"): they must load, and a stray key must still be refused.
    cuts = ["layer1.1"]
    src = split_model(build_model("resnet18", in_channels=3, image_size=32, seed=0), cuts)
    dst = split_model(build_model("resnet18", in_channels=3, image_size=32, seed=1), cuts)
    for a, b in zip(src, dst, strict=True):
        b.load_state_dict(a.state_dict())
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                     b.state_dict().values(), strict=True))
        with pytest.raises(RuntimeError, match="layer9.0.stray"):
            b.load_state_dict({**a.state_dict(), "layer9.0.stray": torch.zeros(1)})
