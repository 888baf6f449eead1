"""The `link_proxy` fixture: a throttled / cuttable uplink (mobillm.common.netsim) for link-fault tests."""

import pytest

from mobillm.common.netsim import LinkProxy


@pytest.fixture
def link_proxy():
    proxies = []

    def make(target_port, rate=None):
        p = LinkProxy(target_port, rate)
        p.start()
        proxies.append(p)
        return p

    yield make
    for p in proxies:
        p.stop()
