"""A round-robin TCP load balancer on loopback, for the replicas' tests.

``python -m tests.programs.balancer HOST:PORT [HOST:PORT ...]`` listens on
127.0.0.1 (a free port), prints ``listening 127.0.0.1:PORT``, and sends
each connection it accepts to the next backend in turn, skipping one that
refuses the connection (as a load balancer's health check would, at once).
When either side closes, the other is closed too.  It runs until killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sys


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


async def main(backends: list[tuple[str, int]]) -> None:
    turn = itertools.cycle(range(len(backends)))

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in backends:
            host, port = backends[next(turn)]
            try:
                upstream_reader, upstream_writer = await asyncio.open_connection(host, port)
            except OSError:
                continue
            break
        else:
            writer.close()
            return
        await asyncio.gather(
            _pipe(reader, upstream_writer), _pipe(upstream_reader, writer), return_exceptions=True
        )

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    print(f"listening 127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    addresses = []
    for arg in sys.argv[1:]:
        host, _, port = arg.rpartition(":")
        addresses.append((host, int(port)))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(addresses))
