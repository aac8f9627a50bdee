"""splitnn.cut: what the segments are (names, values crossing each cut) and the errors raised before training."""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
from torch import fx, nn

import splitnn
from splitnn.errors import ConfigurationError
from splitnn.split.cut import join, merge_states, segment_arity
from tests.cut_models import BasicBlock, Masked, SkipTwo, SmallResNet, Tied, WithBranchy


def _run(segments, *inputs):
    """The segments chained by hand, as the workers chain them."""
    value = inputs if len(inputs) > 1 else inputs[0]
    for seg in segments:
        value = seg(*value) if isinstance(value, tuple) else seg(value)
    return value


def _vgg_like() -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            features=nn.Sequential(
                nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 8, 3, padding=1), nn.ReLU()
            ),
            pool=nn.AdaptiveAvgPool2d(1),
            classifier=nn.Sequential(nn.Flatten(), nn.Linear(8, 10), nn.LogSoftmax(dim=1)),
        )
    )


# ----------------------------------------------------------------------------- sequential


def test_nested_sequential_is_sliced_without_tracing_and_keeps_names():
    torch.manual_seed(0)
    model = _vgg_like()
    segs = splitnn.cut(model, at=["features.3", "classifier"])
    assert all(type(s) is nn.Sequential for s in segs)  # no fx
    assert [list(s.state_dict()) for s in segs] == [
        ["features.0.weight", "features.0.bias"],
        ["features.3.weight", "features.3.bias"],
        ["classifier.1.weight", "classifier.1.bias"],
    ]
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(_run(segs, x), model(x))
    assert merge_states(s.state_dict() for s in segs).keys() == model.state_dict().keys()


def test_cut_copies_the_model():
    model = _vgg_like()
    segs = splitnn.cut(model, at=["pool"])
    with torch.no_grad():
        segs[0][0][0].weight.zero_()
    assert model.features[0].weight.abs().sum() > 0
    assert segs[0][0][0] is not model.features[0]


def test_sequential_cut_at_the_start_leaves_an_empty_segment():
    with pytest.raises(ConfigurationError, match=r"segment 0 would be empty.*before cut point 'features\.0'"):
        splitnn.cut(_vgg_like(), at=["features.0"])
    with pytest.raises(ConfigurationError, match=r"'features' and 'features\.0' fall at the same place"):
        splitnn.cut(_vgg_like(), at=["features", "features.0", "pool"])


# ----------------------------------------------------------------------------- fx


def test_resnet_cut_at_block_boundaries_passes_one_tensor():
    torch.manual_seed(0)
    model = SmallResNet().eval()
    segs = splitnn.cut(model, at=["layer1", "layer2"])
    assert all(isinstance(s, fx.GraphModule) for s in segs)
    assert [segment_arity(s) for s in segs] == [(1, 1), (1, 1), (1, 1)]
    x = torch.randn(4, 1, 12, 12)
    for s in segs:
        s.eval()
    assert torch.equal(_run(segs, x), model(x))
    # every parameter and buffer sits in exactly one segment, under its original name
    assert merge_states(s.state_dict() for s in segs).keys() == model.state_dict().keys()
    assert "layer1.0.conv1.weight" in segs[1].state_dict()


def test_cut_inside_a_block_sends_the_shortcut_too():
    torch.manual_seed(0)
    model = SmallResNet().eval()
    segs = splitnn.cut(model, at=["layer1.1.conv2", "layer2.0.bn1"])
    # cut 0: block 1.1's input (its shortcut) and its hidden activation; cut 1: block 2.0's input
    # (for the 1x1-conv shortcut) and its first convolution's output
    assert [segment_arity(s) for s in segs] == [(1, 2), (2, 2), (2, 1)]
    x = torch.randn(4, 1, 12, 12)
    for s in segs:
        s.eval()
    assert torch.equal(_run(segs, x), model(x))
    joined = join(segs).eval()
    assert torch.equal(joined(x), model(x))
    assert joined.state_dict().keys() == model.state_dict().keys()


def test_a_value_skipping_two_cuts_passes_through_the_middle_segment():
    torch.manual_seed(0)
    model = SkipTwo()
    segs = splitnn.cut(model, at=["mid", "head"])
    assert [segment_arity(s) for s in segs] == [(1, 2), (2, 2), (2, 1)]
    # segment 1 returns its input ``skip`` unchanged: a placeholder is an output
    middle = segs[1].graph
    out = next(n for n in middle.nodes if n.op == "output").args[0]
    assert any(a.op == "placeholder" for a in out)
    x = torch.randn(5, 20)
    assert torch.equal(_run(segs, x), model(x))


def test_model_with_two_inputs_and_an_integer_value_at_the_cut():
    torch.manual_seed(0)
    model = Masked()
    segs = splitnn.cut(model, at=["table"])
    assert [segment_arity(s) for s in segs] == [(2, 2), (2, 1)]
    x, mask = torch.randn(6, 20), (torch.rand(6, 16) > 0.5).float()
    h, bucket = segs[0](x, mask)
    assert bucket.dtype == torch.int64
    assert torch.equal(segs[1](h, bucket), model(x, mask))


def test_leaves_are_kept_whole():
    model = SmallResNet()
    segs = splitnn.cut(model, at=["layer1.1", "layer2"], leaves=[BasicBlock])
    targets = [n.target for n in segs[1].graph.nodes if n.op == "call_module"]
    assert targets == ["layer1.1"]
    assert isinstance(segs[1].get_submodule("layer1.1"), BasicBlock)


# ----------------------------------------------------------------------------- errors


def test_unknown_cut_point_suggests_close_names():
    with pytest.raises(
        ConfigurationError, match=r"'layer3' is not a submodule of SmallResNet. Did you mean 'layer2' or 'layer1'"
    ):
        splitnn.cut(SmallResNet(), at=["layer3"])
    with pytest.raises(ConfigurationError, match=r"'layer1\.0\.con1'.*Did you mean 'layer1\.0\.conv1'"):
        splitnn.cut(SmallResNet(), at=["layer1.0.con1"])


def test_cut_points_out_of_execution_order():
    with pytest.raises(ConfigurationError, match=r"out of execution order.*give at=\['layer1', 'layer2'\]"):
        splitnn.cut(SmallResNet(), at=["layer2", "layer1"])
    with pytest.raises(ConfigurationError, match=r"out of execution order.*\['features\.3', 'classifier'\]"):
        splitnn.cut(_vgg_like(), at=["classifier", "features.3"])


def test_empty_segment_between_two_cut_points():
    with pytest.raises(ConfigurationError, match=r"segment 1 would be empty.*'layer2' and 'layer2\.0'"):
        splitnn.cut(SmallResNet(), at=["layer2", "layer2.0"])
    with pytest.raises(ConfigurationError, match=r"segment 0 would be empty.*before cut point 'enc'"):
        splitnn.cut(Masked(), at=["enc"])


def test_untraceable_model_names_the_module_and_the_fixes():
    with pytest.raises(ConfigurationError, match=r"while tracing 'branchy' \(Branchy\).*leaves=\['branchy'\]") as e:
        splitnn.cut(WithBranchy(), at=["post"])
    assert "by hand" in str(e.value)
    # the fix it suggests works: the untraceable module stays whole inside a segment
    torch.manual_seed(0)
    model = WithBranchy()
    segs = splitnn.cut(model, at=["post"], leaves=["branchy"])
    x = torch.randn(3, 4)
    assert torch.equal(_run(segs, x), model(x))


def test_cut_inside_a_leaf_is_refused():
    with pytest.raises(ConfigurationError, match=r"'layer1\.0\.conv2' lies inside 'layer1\.0' \(BasicBlock\)"):
        splitnn.cut(SmallResNet(), at=["layer1.0.conv2"], leaves=[BasicBlock])


def test_tied_weights_across_a_cut_are_refused():
    with pytest.raises(ConfigurationError, match=r"'emb\.weight' \(segment 0\).*segment 1.*tied weights"):
        splitnn.cut(Tied(), at=["mid"])
    shared = nn.Linear(4, 4)
    with pytest.raises(ConfigurationError, match=r"'0\.weight' \(segment 0\) and '2\.weight' \(segment 1\)"):
        splitnn.cut(nn.Sequential(shared, nn.ReLU(), shared), at=["1"])


def test_module_called_twice_or_never_is_refused():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.a(self.b(self.a(x)))

    with pytest.raises(ConfigurationError, match=r"'a' runs 2 times"):
        splitnn.cut(Twice(), at=["a"])

    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return torch.nn.functional.linear(self.a(x), self.b.weight)

    with pytest.raises(ConfigurationError, match=r"'b' \(Linear\) never runs as a module call"):
        splitnn.cut(Unused(), at=["b"])


def test_bad_arguments():
    with pytest.raises(ConfigurationError, match="at least one cut point"):
        splitnn.cut(SmallResNet(), at=[])
    with pytest.raises(ConfigurationError, match="given twice"):
        splitnn.cut(SmallResNet(), at=["layer1", "layer1"])
    with pytest.raises(ConfigurationError, match="whole model"):
        splitnn.cut(SmallResNet(), at=[""])
    with pytest.raises(ConfigurationError, match="takes an nn.Module"):
        splitnn.cut(copy, at=["x"])


def test_merge_states_refuses_clashing_names():
    a, b = nn.Sequential(nn.Linear(2, 2)), nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ConfigurationError, match="'0.weight'"):
        merge_states([a.state_dict(), b.state_dict()])
