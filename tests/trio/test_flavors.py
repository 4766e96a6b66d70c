"""Every stub flavour, unchanged, calls from trio; every service flavour serves as trio code.

The echo services and stub wrappers of ``tests/flavors`` are reused as they
are: their code only awaits grpclib stream methods, so here the services run
as trio handlers on a ``tunnel.trio.TunnelServiceHandler`` and the stubs are
called from trio tasks over ``tunnel.trio.open_tunnel``, for all four call
kinds.  betterproto's bidi stubs send from an asyncio task of their own; that
path is covered too.
"""

from __future__ import annotations

import pytest

from tests.flavors.test_flavors import CLIENTS, PAYLOADS, SERVERS
from tests.trio.support import grpclib_channel, network_server
from tunnel.trio import open_tunnel

pytestmark = [
    pytest.mark.parametrize("server_flavor", list(SERVERS)),
    pytest.mark.parametrize("stub_flavor", list(CLIENTS)),
]


async def test_four_call_kinds(server_flavor: str, stub_flavor: str) -> None:
    async with (
        network_server([SERVERS[server_flavor]()]) as server,
        grpclib_channel(server.port) as network,
        open_tunnel(network) as channel,
    ):
        client = CLIENTS[stub_flavor](channel)
        assert await client.unary(b"hello") == b"hello"
        assert await client.client_stream(PAYLOADS) == (b"last", 4)
        assert await client.server_stream(b"copy", 3) == [b"copy"] * 3
        assert await client.bidi(PAYLOADS) == PAYLOADS
