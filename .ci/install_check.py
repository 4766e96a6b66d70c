"""What a plain ``pip install grpclib-tunnel`` gives a user, checked end to end.

``make install-check`` builds the sdist and the wheel, installs the wheel
into a fresh virtualenv with its run-time dependencies only (no extras, so
none of the dev extra's packages can hide a missing dependency, as
``typing_extensions`` once did), and runs this file there with ``python -I``
from outside the source tree, so only the installed copy can be imported.

It checks, and exits non-zero with one line saying what failed otherwise:

- ``import tunnel`` works and comes from the virtualenv;
- ``tunnel.__version__`` is the distribution's version, and the license
  metadata and file are there;
- ``python -m tunnel.demo`` without the ``testing`` extra says what to install;
- one forward and one reverse tunneled call, on 127.0.0.1, to grpclib's own
  health service, succeed.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import importlib.util
import socket
import subprocess
import sys
import sysconfig
from pathlib import Path

DISTRIBUTION = "grpclib-tunnel"
#: Generous: the whole of main() takes well under a second on loopback.
TIMEOUT = 30.0


def require(condition: bool, what: str) -> None:
    if not condition:
        sys.exit(f"install check FAILED: {what}")


def check_installation() -> str:
    import tunnel

    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    where = Path(tunnel.__file__).resolve()
    require(where.is_relative_to(site), f"tunnel imported from {where}, not from {site}")
    dist = importlib.metadata.distribution(DISTRIBUTION)
    require(
        tunnel.__version__ == dist.version,
        f"tunnel.__version__ {tunnel.__version__!r} != distribution version {dist.version!r}",
    )
    require(
        dist.metadata["License-Expression"] == "Apache-2.0",
        f"License-Expression is {dist.metadata['License-Expression']!r}",
    )
    require(
        any(Path(str(f)).name == "LICENSE" for f in dist.files or ()),
        "the LICENSE file is not in the installed distribution",
    )
    require(
        importlib.util.find_spec("betterproto") is None,
        "betterproto is installed: this environment is not the run-time dependencies only",
    )
    return dist.version


def check_demo_without_testing_extra() -> None:
    done = subprocess.run(
        [sys.executable, "-I", "-m", "tunnel.demo"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    said = done.stderr.strip()
    require(done.returncode != 0, "python -m tunnel.demo succeeded without the testing extra")
    require(
        "Traceback" not in said and len(said.splitlines()) == 1,
        f"python -m tunnel.demo should say one line, said:\n{said}",
    )
    require(
        "pip install 'grpclib-tunnel[testing]'" in said,
        f"python -m tunnel.demo does not say what to install: {said}",
    )


async def check_calls() -> None:
    from grpclib.client import Channel
    from grpclib.health.service import Health
    from grpclib.health.v1.health_grpc import HealthStub
    from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse
    from grpclib.server import Server

    from tunnel import ReverseTunnelServer, TunnelServiceHandler, open_tunnel

    handler = TunnelServiceHandler([Health()])
    server = Server([handler])
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    await server.start(sock=sock)
    channel = Channel("127.0.0.1", sock.getsockname()[1])
    try:
        async with open_tunnel(channel) as forward:
            reply = await HealthStub(forward).Check(HealthCheckRequest())
        require(reply.status == HealthCheckResponse.SERVING, f"forward call answered {reply}")

        device = ReverseTunnelServer(channel, [Health()])
        serving = asyncio.create_task(device.serve())
        try:
            reverse = handler.as_channel()
            await reverse.wait_ready()
            reply = await HealthStub(reverse).Check(HealthCheckRequest())
            require(reply.status == HealthCheckResponse.SERVING, f"reverse call answered {reply}")
        finally:
            device.close()
            await serving
    finally:
        channel.close()
        server.close()
        await server.wait_closed()


def main() -> None:
    version = check_installation()
    check_demo_without_testing_extra()
    asyncio.run(asyncio.wait_for(check_calls(), TIMEOUT))
    print(f"install check: {DISTRIBUTION} {version} imports and carries forward and reverse calls")


if __name__ == "__main__":
    main()
