"""splitnn.wire.budget: a received segment's allocations are computed on meta tensors, per input signature, and
refused over the budget, naming the node; a segment within it computes exactly what it computes unguarded."""

from __future__ import annotations

import resource

import pytest
import torch
from torch import fx, nn

import splitnn
from splitnn.cli.worker import parse_size
from splitnn.errors import ConfigurationError, MemoryBudgetError, SpecError
from splitnn.wire import module_to_spec, spec_to_module
from splitnn.wire.budget import DEFAULT_MAX_SESSION_MEMORY, guard_segment
from tests.cut_models import BasicBlock, SmallResNet

TRUST = splitnn.wire.Trust(["tests.cut_models"])


def received(m: nn.Module, budget: int = DEFAULT_MAX_SESSION_MEMORY):
    """What a worker does with a segment: build it from its spec, load the weights, guard it with its meta twin."""
    spec = module_to_spec(m)
    built = spec_to_module(spec, trust=TRUST)
    built.load_state_dict(m.state_dict())
    with torch.device("meta"):
        twin = spec_to_module(spec, trust=TRUST)
    return built, guard_segment(built, twin, budget, "segment 's': spec")


def graph(build) -> fx.GraphModule:
    g = fx.Graph()
    x = g.placeholder("x")
    g.output(build(g, x))
    return fx.GraphModule(nn.Module(), g)


@pytest.mark.parametrize("leaves", [(), (BasicBlock,)], ids=["per-op", "trusted-blocks"])
def test_guarded_segments_compute_what_the_model_computes(leaves):
    torch.manual_seed(0)
    model = SmallResNet(width=4)
    segments = splitnn.cut(model, at=["layer1.1", "layer2"] if leaves else ["layer1.1.conv2", "layer2"], leaves=leaves)
    built = [received(s) for s in segments]
    for train in (True, False):
        model.train(train)
        for b, _ in built:
            b.train(train)
        x = torch.randn(3, 1, 12, 12)
        torch.manual_seed(1)
        want = model(x)
        value = x
        for b, _ in built:
            value = b(*value) if isinstance(value, tuple) else b(value)
        assert torch.equal(value, want)
    for _, guard in built:  # one meta run per (shape, mode), each well within the budget
        assert len(guard.checked) == 2 and all(0 < n < 1 << 20 for n in guard.checked.values())


def test_a_graph_over_the_budget_is_refused_naming_the_node_before_anything_is_allocated():
    seg, _ = received(graph(lambda g, x: g.call_function(torch.add, (x, g.call_function(torch.ones, (2**28,))))))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(MemoryBudgetError) as e:
        seg(torch.ones(1))
    assert "segment 's': spec.nodes[2] (call_function torch.add): this forward would allocate 2.00 GiB" in str(e.value)
    assert "1.00 GiB (splitnn worker --max-session-memory)" in str(e.value)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB: nothing near 1 GiB


def test_a_factory_asking_for_the_cpu_is_checked_on_meta_too():
    seg, _ = received(graph(lambda g, x: g.call_function(torch.ones, (2**27,), {"device": "cpu"})), budget=1 << 20)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(MemoryBudgetError, match=r"nodes\[1\] \(call_function torch.ones\).*512.00 MiB.*1.00 MiB"):
        seg(torch.ones(1))
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000


def test_the_budget_holds_at_every_new_input_shape():
    seg, guard = received(graph(lambda g, x: g.call_method("repeat", (x, 4, 1, 1))))
    guard.budget = 4096
    assert seg(torch.ones(1, 8, 8)).shape == (4, 8, 8)  # 1 KiB
    with pytest.raises(MemoryBudgetError, match=r"nodes\[1\] \(call_method repeat\): this forward would allocate"):
        seg(torch.ones(1, 32, 32))  # 16 KiB
    assert seg(torch.ones(1, 8, 8)).shape == (4, 8, 8)
    views, _ = received(graph(lambda g, x: g.call_method("expand", (x, 2**8, -1))), budget=4096)
    assert views(torch.ones(1, 4)).shape == (2**8, 4)  # a view (4 KiB) allocates nothing: the total stays 0
    with pytest.raises(MemoryBudgetError, match=r"nodes\[1\] \(call_method expand\): makes a tensor of 4.00 GiB"):
        views(torch.ones(1, 2**22))  # but none may be larger than the budget: a reduction would read all of it


@pytest.mark.parametrize(
    "build,needle",
    [
        (
            lambda g, x: g.call_function(torch.ones, (g.call_function(__import__("operator").pow, (10, 10**8)),)),
            "pow with exponent 100000000 would exceed 2\\*\\*64",
        ),
        (lambda g, x: g.call_function(__import__("operator").mul, ((1, 2), 10**6)), "more than 65536 items"),
        (
            lambda g, x: g.call_function(__import__("operator").getitem, (x, g.call_function(torch.gt, (x, 0)))),
            "sizes cannot be computed before it runs",
        ),
    ],
    ids=["int-bomb", "tuple-bomb", "value-dependent-size"],
)
def test_python_bombs_and_value_dependent_sizes_are_refused(build, needle):
    seg, _ = received(graph(build))
    with pytest.raises(MemoryBudgetError, match=needle):
        seg(torch.randn(4))


def test_graphs_inside_a_sequential_are_checked_node_by_node():
    inner = graph(lambda g, x: g.call_function(torch.ones, (2**26,)))
    seg, _ = received(nn.Sequential(nn.ReLU(), inner), budget=1 << 20)
    with pytest.raises(MemoryBudgetError, match=r"spec.layers\[1\].nodes\[1\] \(call_function torch.ones\)"):
        seg(torch.ones(1))


def test_sizes_parse_and_bad_budgets_are_refused():
    assert parse_size("512MiB", "--max-session-memory", 1) == 512 << 20
    assert parse_size("2GiB", "--max-session-memory", 1) == 2 << 30
    assert parse_size("4096", "--max-session-memory", 1) == 4096
    assert parse_size(None, "--max-session-memory", 7) == 7
    for bad in ("0", "-1", "1.5GiB", "lots", "12XB", "9" * 16):
        with pytest.raises(ConfigurationError, match="--max-session-memory must be a size"):
            parse_size(bad, "--max-session-memory", 1)
    with pytest.raises(SpecError, match="memory budget"):
        guard_segment(nn.ReLU(), nn.ReLU(), 0)


@pytest.mark.parametrize("kind", ["sequential", "graph"])
def test_a_deep_copy_of_a_guarded_segment_is_guarded_and_runs_on_its_own_weights(kind):
    """The check sits in front of the module's forward, on the instance: a deep copy (a worker's probe copies
    segments) runs its own weights, behind its own copy of the check; the original keeps its check and weights.
    A GraphModule copy is guarded as the worker's probe makes it (``_probe_copy`` puts the check back)."""
    import copy

    from splitnn.workers.engine.segments import _probe_copy

    model = (
        nn.Sequential(nn.Linear(8, 8))
        if kind == "sequential"
        else graph(lambda g, x: g.call_method("repeat", (x, 4, 1)))
    )
    seg, guard = received(model)
    guard.budget = 4096
    clone = copy.deepcopy(seg) if kind == "sequential" else _probe_copy(seg)
    x = torch.ones(2, 8)
    if kind == "sequential":
        with torch.no_grad():
            clone[0].weight.zero_()
            clone[0].bias.fill_(1.0)
        assert torch.equal(clone(x), torch.ones(2, 8))  # the copy's weights, not the original's
        assert not torch.equal(seg(x), torch.ones(2, 8))
    else:
        assert clone(x).shape == seg(x).shape == (8, 8)
    for m in (seg, clone):  # 2 rows in pass; 1024 rows (32 or 128 KiB out) do not, before anything runs
        with pytest.raises(MemoryBudgetError, match="this forward would allocate"):
            m(torch.ones(1024, 8))
