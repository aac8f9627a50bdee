import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from splitnn.data import (
    PartitionSpec,
    column_partition,
    dirichlet_shards,
    iid_shards,
    parse_partition,
    vertical_split,
)
from splitnn.errors import ConfigurationError

FAST = settings(max_examples=60, deadline=None)


def _check_cover(shards, n):
    allidx = torch.cat(shards)
    assert all(s.dtype == torch.int64 for s in shards)
    assert allidx.numel() == n
    assert torch.equal(allidx.sort().values, torch.arange(n))


@FAST
@given(st.integers(1, 400).flatmap(lambda n: st.tuples(st.just(n), st.integers(1, n))), st.integers(0, 2**31))
def test_iid_properties(nk, seed):
    n, k = nk
    shards = iid_shards(n, k, seed)
    assert len(shards) == k
    _check_cover(shards, n)
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    assert [torch.equal(a, b) for a, b in zip(shards, iid_shards(n, k, seed))] == [True] * k


def test_iid_is_shuffled_and_seeded():
    a, b = iid_shards(1000, 2, 0), iid_shards(1000, 2, 1)
    assert not torch.equal(a[0], torch.arange(500))
    assert not torch.equal(a[0], b[0])


@pytest.mark.parametrize("n, k", [(5, 0), (5, 6), (0, 1), (3, -1)])
def test_bad_k(n, k):
    with pytest.raises(ConfigurationError) as info:
        iid_shards(n, k, 0)
    assert f"k={k}" in str(info.value) and f"n={n}" in str(info.value)


@FAST
@given(
    st.lists(st.integers(0, 4), min_size=1, max_size=300),
    st.integers(1, 8),
    st.floats(0.01, 100.0),
    st.integers(0, 1000),
    st.integers(1, 3),
)
def test_dirichlet_properties(labels, k, alpha, seed, min_size):
    n = len(labels)
    y = torch.tensor(labels)
    if k * min_size > n:
        with pytest.raises(ConfigurationError):
            dirichlet_shards(y, k, alpha, seed, min_size=min_size)
        return
    shards = dirichlet_shards(y, k, alpha, seed, min_size=min_size)
    assert len(shards) == k
    _check_cover(shards, n)
    assert min(len(s) for s in shards) >= min_size
    again = dirichlet_shards(y, k, alpha, seed, min_size=min_size)
    assert all(torch.equal(a, b) for a, b in zip(shards, again))


def _skew(shards, y):
    """Mean total-variation distance between each shard's label mix and the uniform one."""
    tv = [0.5 * (y[s].bincount(minlength=10).float() / len(s) - 0.1).abs().sum().item() for s in shards]
    return sum(tv) / len(tv)


def test_dirichlet_small_alpha_is_skewed():
    y = torch.arange(10).repeat_interleave(200)
    for seed in range(3):
        skewed = _skew(dirichlet_shards(y, 5, 0.05, seed=seed), y)
        flat = _skew(dirichlet_shards(y, 5, 1000.0, seed=seed), y)
        iid = _skew(iid_shards(len(y), 5, seed), y)
        assert skewed > 0.5
        assert flat < 0.1 and iid < 0.1


@pytest.mark.parametrize("alpha", [0, -1, float("nan"), float("inf")])
def test_dirichlet_bad_alpha(alpha):
    with pytest.raises(ConfigurationError, match="alpha"):
        dirichlet_shards(torch.zeros(10, dtype=torch.int64), 2, alpha, 0)


def test_parse_partition():
    assert parse_partition("iid") == PartitionSpec("iid")
    assert parse_partition(" IID ") == PartitionSpec("iid")
    spec = parse_partition("dirichlet:0.5")
    assert spec == PartitionSpec("dirichlet", 0.5) and str(spec) == "dirichlet:0.5"
    y = torch.arange(4).repeat(25)
    assert sum(len(s) for s in spec(y, 3, seed=1)) == 100
    iid = parse_partition("iid")(y, 4, seed=2)
    assert [len(s) for s in iid] == [25] * 4


@pytest.mark.parametrize(
    "bad, match",
    [
        ("random", "unknown"),
        ("dirichlet", "alpha"),
        ("dirichlet:", "alpha"),
        ("dirichlet:x", "not a number"),
        ("dirichlet:-1", "> 0"),
        ("dirichlet:nan", "> 0"),
        (3, "string"),
    ],
)
def test_parse_partition_errors(bad, match):
    with pytest.raises(ConfigurationError, match=match) as info:
        parse_partition(bad)
    assert "dirichlet:0.5" in str(info.value)


def test_halves_left_right():
    left, right = column_partition((1, 28, 28), 2, "halves")
    x = torch.randn(3, 1, 28, 28)
    a, b = vertical_split(x, [left, right])
    assert a.shape == (3, 392) and b.shape == (3, 392)
    assert torch.equal(a.reshape(3, 1, 28, 14), x[..., :14])
    assert torch.equal(b.reshape(3, 1, 28, 14), x[..., 14:])
    assert column_partition((28, 28), 2)[0].tolist() == left.tolist()


@FAST
@given(st.integers(1, 6), st.integers(1, 12), st.integers(1, 12), st.data())
def test_column_partition_properties(c, h, w, data):
    total = c * h * w
    for how, limit in (("halves", w), ("contiguous", total)):
        k = data.draw(st.integers(1, limit))
        parts = column_partition((c, h, w), k, how)
        assert len(parts) == k
        _check_cover(parts, total)
        sizes = [len(p) for p in parts]
        step = c * h if how == "halves" else 1
        assert max(sizes) - min(sizes) <= step


def test_contiguous_flat():
    parts = column_partition(10, 3, "contiguous")
    assert [p.tolist() for p in parts] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]


def test_column_partition_errors():
    with pytest.raises(ConfigurationError, match="k=29"):
        column_partition((28, 28), 29, "halves")
    with pytest.raises(ConfigurationError, match="image shape"):
        column_partition(784, 2, "halves")
    with pytest.raises(ConfigurationError, match="unknown how"):
        column_partition((28, 28), 2, "diagonal")
    with pytest.raises(ConfigurationError, match="outside"):
        vertical_split(torch.zeros(2, 4), [torch.tensor([4])])


def test_dirichlet_repair_guarantees_min_size():
    # one class, tiny alpha: almost every draw leaves shards empty, so the repair step runs
    y = torch.zeros(8, dtype=torch.int64)
    shards = dirichlet_shards(y, 8, 0.001, seed=0, max_tries=2)
    assert sorted(len(s) for s in shards) == [1] * 8
    _check_cover(shards, 8)
