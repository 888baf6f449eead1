"""The `link_proxy` fixture: a throttled / cuttable uplink (mobillm.common.netsim) for link-fault tests."""

import pytest
from helpers import started_each

from mobillm.common.netsim import LinkProxy


@pytest.fixture
def link_proxy():
    """link_proxy(target_port, rate=None, capture=False) -> a started LinkProxy; stopped at teardown."""
    yield from started_each(LinkProxy)
