"""Tunnels in a trio program: a device serving trio handlers, a caller reaching it.

Three parts, all trio code on ``tunnel.trio``, in one process here (in the
field each is a program of its own):

* the *router* (network server) accepts tunnels: devices register reverse
  tunnels under a device id, and callers open forward tunnels to its
  ``Directory``, whose handler forwards each question to the device named in
  it through ``key_as_channel(id)``;
* the *device* dials out and serves a thermometer whose handler is trio
  code: it reads two sensors at once in a nursery, behind a trio lock, and
  keeps its tunnel up with ``serve_forever`` (reconnecting if it drops);
* the *caller* opens a forward tunnel to the router and asks.  A cancel
  scope around a slow question cancels it on the device too.

Run: ``python examples/trio_device.py`` (exits 0 when all went as expected).
With ``--until-interrupted`` the caller keeps asking until Ctrl-C, which
ends the program cleanly.
"""

from __future__ import annotations

import sys
from collections.abc import Hashable

import trio
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError

import tunnel.trio
from tunnel.testing import Message, TestServiceBase, TestServiceStub


class Thermometer(TestServiceBase):
    """Runs on the device: answers with the mean of two sensors, read at once."""

    def __init__(self, room: str) -> None:
        self.room = room
        self._bus = trio.Lock()  # one reading at a time on the sensor bus
        self.cancelled = trio.Event()

    async def unary(self, message: Message) -> Message:
        readings: list[float] = []

        async def read(sensor: float) -> None:
            await trio.sleep(message.delay_millis / 1000)  # the sensor takes its time
            readings.append(sensor)

        try:
            async with self._bus, trio.open_nursery() as nursery:
                for sensor in (21.0, 22.0):
                    nursery.start_soon(read, sensor)
        except* trio.Cancelled:  # a nursery's children's cancellations come grouped
            print(f"device {self.room}: reading cancelled", flush=True)
            self.cancelled.set()
            raise
        mean = sum(readings) / len(readings)
        return Message(payload=f"{self.room}: {mean:.1f} C".encode())


class Directory(TestServiceBase):
    """Runs on the router: forwards a question to the device it names."""

    def __init__(self, handler: tunnel.trio.TunnelServiceHandler) -> None:
        self.handler = handler

    async def unary(self, message: Message) -> Message:
        room = message.payload.decode()
        device = TestServiceStub(self.handler.key_as_channel(room))
        return await device.unary(Message(delay_millis=message.delay_millis))


def device_id(channel: tunnel.TunnelChannel) -> Hashable:
    return channel.metadata.get("device-id")


def registered(channel: tunnel.TunnelChannel) -> None:
    print(f"router: device {device_id(channel)!r} registered")


async def run_device(port: int, thermometer: Thermometer) -> None:
    channel = Channel("127.0.0.1", port)
    try:
        device = tunnel.trio.ReverseTunnelServer(channel, [thermometer])
        await device.serve_forever(metadata={"device-id": thermometer.room})
    finally:
        channel.close()


async def ask(stub: TestServiceStub, room: str, delay_millis: int = 10) -> str:
    reply = await stub.unary(Message(payload=room.encode(), delay_millis=delay_millis))
    return reply.payload.decode()


async def main(until_interrupted: bool) -> int:
    ok = True
    async with tunnel.trio.open_loop(), trio.open_nursery() as nursery:
        handler = tunnel.trio.TunnelServiceHandler(
            affinity_key=device_id, on_reverse_tunnel_open=registered
        )
        directory = tunnel.trio.TunnelServiceHandler([Directory(handler)])
        # One TunnelServiceHandler for the devices, one for the callers' forward
        # tunnels: each grpclib server serves TunnelService once, so they run
        # on two ports.
        router_port = await nursery.start(tunnel.trio.serve, [handler])
        directory_port = await nursery.start(tunnel.trio.serve, [directory])
        print(f"router listening on 127.0.0.1:{router_port} and :{directory_port}")
        thermometer = Thermometer("kitchen")
        nursery.start_soon(run_device, router_port, thermometer)

        with trio.fail_after(10):
            await handler.key_as_channel("kitchen").wait_ready()
        network = Channel("127.0.0.1", directory_port)
        try:
            async with tunnel.trio.open_tunnel(network) as to_router:
                stub = TestServiceStub(to_router)
                with trio.fail_after(10):
                    print(f"caller asked kitchen: {await ask(stub, 'kitchen')}")
                    with trio.move_on_after(0.2) as patience:
                        await ask(stub, "kitchen", delay_millis=5_000)
                    print(f"caller gave up on a slow reading: {patience.cancelled_caught}")
                    ok = ok and patience.cancelled_caught
                    # The device's reading was cancelled too, in its own time.
                    await thermometer.cancelled.wait()
                    try:
                        await ask(stub, "attic")
                        ok = False
                    except GRPCError as exc:
                        print(f"caller asked attic: {exc.status.name}")
                        ok = ok and exc.status is Status.UNAVAILABLE
                if until_interrupted:
                    print("running; Ctrl-C stops", flush=True)
                    while True:
                        await ask(stub, "kitchen")
                        await trio.sleep(0.05)
        finally:
            network.close()
        nursery.cancel_scope.cancel()
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(trio.run(main, "--until-interrupted" in sys.argv[1:]))
    except* KeyboardInterrupt:  # trio's nurseries deliver it grouped
        print("stopped by Ctrl-C", flush=True)
        sys.exit(130)
