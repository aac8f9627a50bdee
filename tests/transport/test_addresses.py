"""HOST:PORT addresses (splitnn.transport.addresses): what is accepted where, and IPv6 brackets both ways."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from splitnn.errors import ConfigurationError, WireError
from splitnn.transport.addresses import join_host_port, split_host_port


@pytest.mark.parametrize(
    "address,host,port",
    [("127.0.0.1:7001", "127.0.0.1", 7001), ("[::1]:65535", "::1", 65535), ("alice.example:1", "alice.example", 1)],
)
def test_an_address_splits_into_host_and_port_and_joins_back(address, host, port):
    assert split_host_port(address, "x") == (host, port)
    assert join_host_port(host, port) == address


@given(host=st.sampled_from(["10.0.0.1", "::1", "fe80::2", "bob", ""]), port=st.integers(1, 65535))
def test_join_then_split_round_trips(host, port):
    assert split_host_port(join_host_port(host, port), "x", host_optional=True) == (host, port)


@pytest.mark.parametrize("address", ["7001", "host:", "host:port", "host:-1", "host:65536", "h:7001x", 7001, None])
def test_malformed_addresses_are_refused_naming_the_setting(address):
    with pytest.raises(ConfigurationError, match=r"--data-listen must be HOST:PORT like 127\.0\.0\.1:7101"):
        split_host_port(address, "--data-listen", any_port=True, host_optional=True)


def test_port_zero_and_no_host_only_where_allowed():
    assert split_host_port("127.0.0.1:0", "--listen", any_port=True) == ("127.0.0.1", 0)
    assert split_host_port(":7001", "hello", host_optional=True) == ("", 7001)
    for address, kwargs in (("127.0.0.1:0", {}), (":7001", {}), ("h" * 300 + ":1", {"host_optional": True})):
        with pytest.raises(WireError, match="a peer's address must be HOST:PORT"):
            split_host_port(address, "a peer's address", error=WireError, **kwargs)
