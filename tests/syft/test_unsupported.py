"""PySyft 0.2 features the facade does not provide raise an error naming the feature and what to use instead."""

from __future__ import annotations

import pytest
import torch

import splitnn
import splitnn.syft as sy
from splitnn.syft import UnsupportedFeatureError


@pytest.fixture
def places():
    hook = sy.TorchHook(torch)
    return tuple(sy.VirtualWorker(hook, id=name) for name in ("alice", "bob"))


@pytest.mark.parametrize(
    ("call", "feature"),
    [
        (lambda x, w: x.send(w[0], inplace=True), "inplace=True"),
        (lambda x, w: x.send(w[0], local_autograd=True), "AutogradTensor"),
        (lambda x, w: x.send(w[0], preinitialize_grad=True), "AutogradTensor"),
        (lambda x, w: x.send(w[0], no_wrap=True), "no_wrap"),
        (lambda x, w: x.send(*w), "MultiPointerTensor"),
        (lambda x, w: x.send(w[0]).get(get_copy=True), "get_copy"),
        (lambda x, w: x.send(w[0]).get(inplace=True), "get(inplace=True)"),
        (lambda x, w: x.send(w[0]).get(user="me"), "private tensors"),
        (lambda x, w: x.send(w[0]).share(*w), "secret sharing"),
        (lambda x, w: x.send(w[0]).fix_precision(), "fixed-precision"),
        (lambda x, w: x.send(w[0]).get_(), "in-place get"),
        (lambda x, w: x.send(w[0]).remote_get(), "pointer chains"),
        (lambda x, w: x.send(w[0]).send(w[1]), "pointer chain"),
    ],
)
def test_tensor_features_not_provided(places, call, feature):
    with pytest.raises(UnsupportedFeatureError) as exc:
        call(torch.ones(2), places)
    assert feature in exc.value.feature and "PySyft 0.2" in str(exc.value) and exc.value.instead
    assert isinstance(exc.value, splitnn.SplitNNError) and isinstance(exc.value, NotImplementedError)


def test_options_at_their_pysyft_defaults_are_accepted(places):
    alice = places[0]
    x = torch.ones(2).send(alice, inplace=False, garbage_collect_data=False, requires_grad=False)
    assert torch.equal(x.get(inplace=False, get_copy=False, deregister_ptr=True), torch.ones(2))


def test_unknown_keywords_are_type_errors(places):
    with pytest.raises(TypeError, match="unexpected keyword argument 'colour'"):
        torch.ones(2).send(places[0], colour="red")
    with pytest.raises(TypeError, match="unexpected keyword argument 'colour'"):
        torch.ones(2).send(places[0]).get(colour="red")


@pytest.mark.parametrize(
    ("name", "advice"),
    [
        ("Plan", "ordinary Python"),
        ("func2plan", "ordinary Python"),
        ("FederatedDataLoader", "FedAvg"),
        ("WebsocketClientWorker", "splitnn worker"),
        ("AdditiveSharingTensor", "Privacy at the cut"),
        ("local_worker", ".get()"),
    ],
)
def test_module_attributes_not_provided(name, advice):
    with pytest.raises(UnsupportedFeatureError, match=advice) as exc:
        getattr(sy, name)
    assert exc.value.feature == f"sy.{name}"
    assert isinstance(exc.value, AttributeError)  # hasattr/getattr with a default keep working
    assert not hasattr(sy, name) and getattr(sy, name, None) is None
    with pytest.raises(AttributeError, match="no attribute 'NoSuchThing'"):
        sy.NoSuchThing  # noqa: B018 - the lookup is the test


def test_pointer_attributes_not_provided_are_attribute_errors(places):
    x = torch.ones(2).send(places[0])
    assert not hasattr(x, "share") and not hasattr(x, "fix_prec")
    assert hasattr(x, "view")
