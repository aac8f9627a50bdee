"""A data holder's gate, attacked by a researcher who holds the federation token (issue 24, item 2).

Real ``splitnn worker`` processes hold the same small images (``--data toy=...``) under four policies:

* ``closed``: no ``--policy`` at all -- a data holder's default (docs/security.md);
* ``strict``: the attacker's policy of the issue (``refuse_passthrough``, ``min_reduction = 4``,
  ``peers``, ``release_outputs = false``), the rest at the data holder's defaults;
* ``optin``: the same, plus ``accept_any_segment = true`` (the heuristic as the only judge of segments);
* ``pinned``: ``accept_segments`` pins a reviewed BatchNorm -> Linear -> ReLU, and
  ``release_weights = true``;

and ``labels`` holds the labels (``release_weights = true``, closed otherwise).

Each attack asserts the rule that refused it (the message names it), that the worker lives on,
and that the data did not leave (no activation of a refused segment was made; the weights of a
chosen-batch attack hold the statistics of rows the holder drew, not the researcher's).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import fx, nn

import splitnn
from splitnn.data.batching import BatchDraw, epoch_batches
from splitnn.errors import PolicyError, SpecError
from splitnn.wire.fingerprint import fingerprint
from splitnn.workers import BatchRef
from tests.transport.cluster import Cluster
from tests.workers.task_data import toy_images

IMAGES = toy_images().features  # what every worker holds as dataset "toy" (320 x 1 x 8 x 8)
N = len(IMAGES)
HELD = ("--data", "toy=tests.workers.task_data:toy_images,parts=features", "--trust", "tests.workers.task_data")


def reviewed() -> nn.Module:
    """The segment the ``pinned`` worker's operator reviewed and pinned."""
    return nn.Sequential(nn.Flatten(), nn.BatchNorm1d(64), nn.Linear(64, 8), nn.ReLU())


def near_miss() -> nn.Module:
    """A segment whose fingerprint the ``pinned`` worker pins only the first 16 hex digits of."""
    return nn.Sequential(nn.Flatten(), nn.BatchNorm1d(64), nn.Linear(64, 4), nn.ReLU())


def _near_miss_pin() -> str:
    fp = fingerprint(near_miss())
    return fp[:16] + "".join("0" if c != "0" else "1" for c in fp[16:])  # same 16-digit prefix, every other differs


STRICT = 'refuse_passthrough = true\nmin_reduction = 4\npeers = ["bob"]\nrelease_outputs = false\n'


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("gate")
    policies = {
        "strict": STRICT,
        "optin": STRICT + "accept_any_segment = true\n",
        "pinned": f'accept_segments = ["{fingerprint(reviewed())}", "{_near_miss_pin()}"]\nrelease_weights = true\n'
        "release_grad_norms = true\n",
    }
    labels = root / "labels.toml"
    labels.write_text("release_weights = true\nrelease_grad_norms = true\n")  # closed otherwise: it draws the rows too
    with Cluster(root, lifetime=400, open_data=False) as cl:
        cl.start("closed", *HELD)
        for name, text in policies.items():
            path = root / f"{name}.toml"
            path.write_text(text)
            cl.start(name, *HELD, "--policy", str(path))
        cl.start("labels", *[a.replace("features", "labels") for a in HELD], "--policy", str(labels))
        yield cl


def draw(position: int = 0, batch_size: int = 8, seed: int = 0) -> BatchRef:
    """A batch as an honest researcher asks for it: the draw, and the rows it makes."""
    return BatchRef("toy", epoch_batches(N, batch_size, seed=seed)[position])


def test_closed_holders_train_exactly_like_in_process_workers(connect):
    """The holders draw the rows from the researcher's seed with the same epoch_batches: same weights, bit for bit."""
    torch.manual_seed(0)
    segments = [reviewed(), nn.Sequential(nn.Linear(8, 10), nn.LogSoftmax(1))]
    twins = [copy.deepcopy(s) for s in segments]
    fit = dict(epochs=2, batch_size=32, seed=3, progress=False)
    model = splitnn.SplitNN(segments, [connect("pinned"), connect("labels")], optimizer="sgd:lr=0.05")
    history = model.fit("toy", **fit)
    ev = model.evaluate("toy", batch_size=40)
    twin = splitnn.SplitNN(twins, [splitnn.VirtualWorker("a"), splitnn.VirtualWorker("b")], optimizer="sgd:lr=0.05")
    twin_history = twin.fit(toy_images(), **fit)
    assert history.losses() == twin_history.losses()
    assert ev.loss == twin.evaluate(toy_images(), batch_size=40).loss
    ours, theirs = model.collect().state_dict(), twin.collect().state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def refused(worker, rule: str, call, *args, match: str = "", **kwargs) -> PolicyError:
    """``call(*args)`` (then a drain) is refused by ``worker``'s rule ``rule``; the worker still answers."""
    with pytest.raises(PolicyError, match=rf"\(policy rule {rule}\){match}") as info:
        call(*args, **kwargs)
        worker.drain()
    assert worker.dataset_stats("toy").size == N  # alive, and this session still works
    return info.value


def eye_linear(width: int, bias: float = 0.0) -> nn.Linear:
    lin = nn.Linear(width, width)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(width))
        lin.bias.fill_(bias)
    return lin


def plus_minus() -> nn.Module:
    """[I; -I] + ReLU: relu(x) and relu(-x) give x back exactly."""
    lin = nn.Linear(64, 128, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.cat([torch.eye(64), -torch.eye(64)]))
    return nn.Sequential(nn.Flatten(), lin, nn.ReLU())


def conv_identity(bias: float | None = None) -> nn.Module:
    conv = nn.Conv2d(1, 1, 1, bias=bias is not None)
    with torch.no_grad():
        conv.weight.fill_(1.0)
        if bias is not None:
            conv.bias.fill_(bias)
    return nn.Sequential(conv, nn.ReLU()) if bias is not None else conv


def permutation() -> nn.Module:
    lin = nn.Linear(64, 64, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(64)[torch.randperm(64, generator=torch.Generator().manual_seed(1))])
    return nn.Sequential(nn.Flatten(), lin)


def twice() -> nn.Module:
    lin = nn.Linear(64, 64, bias=False)
    with torch.no_grad():
        lin.weight.copy_(2 * torch.eye(64))
    return nn.Sequential(nn.Flatten(), lin)


PASSTHROUGH = {
    "identity": nn.Identity,
    "permutation": permutation,
    "2I": twice,
    "1x1 conv": conv_identity,
    "upsampling": lambda: nn.Upsample(scale_factor=2),
}
HEURISTIC_MISSES = {
    "Linear(I, bias=100)+ReLU": lambda: nn.Sequential(nn.Flatten(), eye_linear(64, 100.0), nn.ReLU()),
    "[I; -I]+ReLU": plus_minus,
    "1x1 conv with bias + ReLU": lambda: conv_identity(100.0),
}


# -- segments nobody accepted do not run on the holder's data ----------------------------------------
@pytest.mark.parametrize("worker", ["closed", "strict"])
@pytest.mark.parametrize("attack", [*PASSTHROUGH, *HEURISTIC_MISSES])
def test_a_segment_nobody_accepted_never_runs_on_the_data(connect, worker, attack):
    w = connect(worker)
    segment = {**PASSTHROUGH, **HEURISTIC_MISSES}[attack]()
    w.add_segment("leak", segment, None)
    err = refused(w, "accept_segments", w.forward, "leak", draw(), match=r".*cannot be decided by looking at it")
    assert fingerprint(segment) in str(err) and "splitnn fingerprint" in str(err)  # how to pin it, if reviewed
    assert w.ledger.total(kind="activation") == 0


# -- state derived from the data leaves only through the gate ----------------------------------------
def out_buffer_graph() -> nn.Module:
    """Attack (a): a graph that copies its input into a buffer with ``out=`` beside a small Linear."""

    class Copier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("stash", torch.zeros(8, 64))
            self.lin = nn.Linear(64, 2)

        def forward(self, x):
            flat = torch.flatten(x, 1)
            torch.add(flat, 0, out=self.stash)
            return torch.relu(self.lin(flat))

    return fx.symbolic_trace(Copier())


def test_gradient_norms_leave_only_where_the_operator_allows(connect):
    """Clipping by the global norm asks every party for its gradients' norms each batch: a data holder's defaults
    refuse them (release_grad_norms); holders whose operators opted in train clipped exactly like in-process
    workers."""
    w = connect("closed")
    w.add_segment("seg", reviewed(), None)
    refused(w, "release_grad_norms", w.grad_norms, "seg", match=r": gradients are derived from this party's data")
    torch.manual_seed(0)
    segments = [reviewed(), nn.Sequential(nn.Linear(8, 10), nn.LogSoftmax(1))]
    twins = [copy.deepcopy(s) for s in segments]
    fit = dict(epochs=1, batch_size=32, seed=3, progress=False, clip_grad_norm=0.05)
    model = splitnn.SplitNN(segments, [connect("pinned"), connect("labels")], optimizer="sgd:lr=0.05")
    history = model.fit("toy", **fit)
    twin = splitnn.SplitNN(twins, [splitnn.VirtualWorker("a"), splitnn.VirtualWorker("b")], optimizer="sgd:lr=0.05")
    assert history.losses() == twin.fit(toy_images(), **fit).losses()
    ours, theirs = model.collect().state_dict(), twin.collect().state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_out_buffer_then_get_state_is_refused(connect):
    w = connect("optin")
    try:
        w.add_segment("copier", out_buffer_graph(), None)
        installed = True
    except SpecError:  # the op vocabulary refuses out= outright: the gate must hold anyway
        installed = False
    if installed:
        w.forward("copier", draw())
        w.drain()
    else:
        w.add_segment("copier", nn.Sequential(nn.Flatten(), nn.Linear(64, 2), nn.ReLU()), None)
        w.forward("copier", draw())
        w.drain()
    refused(w, "release_weights", w.get_state, "copier", match=r": state derived from this party's data")
    refused(w, "release_weights", w.fetch_segment, "copier")
    assert w.ledger.total(kind="weights") == 0


def test_batchnorm_momentum_1_running_mean_is_refused(connect):
    leak = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(64, momentum=1.0), nn.Linear(64, 4), nn.ReLU())
    w = connect("optin")
    w.add_segment("bn", leak, "sgd:lr=0.1")
    w.forward("bn", draw())
    w.drain()
    for read in (w.get_state, w.fetch_segment, w.get_grads):
        refused(w, "release_weights", read, "bn")
    assert w.ledger.total(kind="weights") == 0
    # by default (no policy) the segment does not even run on the data
    closed = connect("closed")
    closed.add_segment("bn", leak, None)
    refused(closed, "accept_segments", closed.forward, "bn", draw())


def test_replace_re_runs_every_check(connect):
    # the attack (c): a benign segment passes its checks once, then an Identity replaces it
    w = connect("optin")
    w.add_segment("seg", reviewed(), None)
    w.forward("seg", draw())
    w.drain()
    w.add_segment("seg", nn.Identity(), None, replace=True)
    refused(w, "refuse_passthrough", w.forward, "seg", draw(position=1), match=r": it only moves values around")
    # a worker that pins its segments refuses the replacement as it is installed
    w = connect("pinned")
    w.add_segment("seg", reviewed(), None)
    w.forward("seg", draw(), train=False)
    w.drain()
    refused(w, "accept_segments", w.add_segment, "seg", nn.Identity(), None, replace=True)


# -- the holder draws the rows --------------------------------------------------------------------------
def test_chosen_batches_cannot_rebuild_rows_from_a_pinned_batchnorm(connect):
    w = connect("pinned")
    i = 5
    w.add_segment("bn", reviewed(), "sgd:lr=0.1")
    chosen = torch.tensor([i, i])
    refused(w, "draw_rows", w.forward, "bn", BatchRef("toy", chosen), match=r": this party draws its batches")
    refused(w, "min_batch_size", w.forward, "bn", draw(batch_size=2), match=r": it holds 2 rows")
    # the researcher's indices ride along with an honest draw: the holder ignores them and draws its own rows
    honest = BatchDraw(seed=7, epoch=0, position=3, batch_size=8)
    w.forward("bn", BatchRef("toy", torch.full((8,), i), honest))
    w.drain()
    state = w.get_state("bn")  # release_weights = true: the weights leave, at the end
    rows = epoch_batches(N, 8, seed=7)[3]
    assert i not in rows.tolist()
    drawn_mean = 0.1 * IMAGES[rows].flatten(1).mean(0)  # momentum 0.1 from zeros
    assert torch.allclose(state["1.running_mean"], drawn_mean, atol=1e-6)
    assert not torch.allclose(state["1.running_mean"], 0.1 * IMAGES[i].flatten(), atol=1e-3)
    # the end: a released segment is frozen, so a second batch cannot be differenced against the first
    refused(w, "release_weights", w.forward, "bn", draw(), match=r": its weights were released")
    refused(w, "release_weights", w.step, "bn")


def test_a_short_tail_is_refused_and_a_tail_of_the_minimum_is_not(connect):
    w = connect("pinned")
    w.add_segment("bn", reviewed(), None)
    assert N % 9 == 5 and N % 12 == 8
    for position in (0, N // 9):  # refused from the epoch's first batch on, before any work
        refused(w, "min_batch_size", w.forward, "bn", draw(position, batch_size=9), match=r": it holds 5 rows")
    w.forward("bn", draw(position=N // 12, batch_size=12), train=False)  # a tail of 8 rows: allowed
    w.drain()


# -- the fingerprint check is exact ----------------------------------------------------------------------
def test_a_fingerprint_sharing_a_16_digit_prefix_is_not_accepted(connect):
    w = connect("pinned")
    fp = fingerprint(near_miss())
    assert _near_miss_pin()[:16] == fp[:16] and _near_miss_pin() != fp
    err = refused(w, "accept_segments", w.add_segment, "near", near_miss(), None)
    assert f"its fingerprint {fp} is not among the 2 accepted" in str(err)
    w.add_segment("ok", reviewed(), None)  # the exact pin is accepted
    w.drain()
