"""The public API, pinned: tests outside this repository use these names and signatures."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import inspect
from collections.abc import Callable

import grpclib.client
import pytest
from grpclib.const import Status

import tunnel


def parameters(func: Callable[..., object]) -> list[tuple[str, str, object]]:
    sig = inspect.signature(func)
    return [(p.name, p.kind.name, p.default) for p in sig.parameters.values()]


def default(func: Callable[..., object], name: str) -> object:
    """The default value of *func*'s parameter *name*."""
    return inspect.signature(func).parameters[name].default


def test_exports() -> None:
    assert sorted(tunnel.__all__) == [
        "EndReason",
        "Fallback",
        "FrameTooLarge",
        "KeepaliveTimeoutError",
        "LocalProtocolError",
        "MetadataError",
        "NegotiationError",
        "OpenTimeoutError",
        "Proxy",
        "RawMessage",
        "RawStatusDetails",
        "RawStatusDetailsCodec",
        "ReconnectingTunnelChannel",
        "RemoteProtocolError",
        "ReverseChannel",
        "ReverseTunnelServer",
        "TunnelChannel",
        "TunnelClosedError",
        "TunnelError",
        "TunnelInfo",
        "TunnelOptions",
        "TunnelServiceHandler",
        "TunnelStatistics",
        "current_tunnel",
        "install_fallback",
        "open_tunnel",
    ]
    for name in tunnel.__all__:
        assert getattr(tunnel, name).__module__.startswith("tunnel")


def test_every_exception_class_is_a_tunnel_error() -> None:
    import tunnel.errors

    defined = [
        obj
        for module in (tunnel, tunnel.errors)
        for obj in vars(module).values()
        if isinstance(obj, type) and issubclass(obj, BaseException)
    ]
    assert tunnel.MetadataError in defined
    for cls in defined:
        assert issubclass(cls, tunnel.TunnelError), cls
    # grpclib refuses metadata with ValueError; so does the tunnel, more precisely.
    assert issubclass(tunnel.MetadataError, ValueError)


def test_version_is_the_distributions() -> None:
    # Written once, in tunnel/__init__.py; the installed metadata reads it from there.
    assert tunnel.__version__ == importlib.metadata.version("grpclib-tunnel")


def test_testing_exports() -> None:
    import tunnel.testing

    assert sorted(tunnel.testing.__all__) == [
        "Message",
        "TestService",
        "TestServiceBase",
        "TestServiceStub",
    ]


def test_channels_are_grpclib_channels() -> None:
    assert issubclass(tunnel.TunnelChannel, grpclib.client.Channel)
    assert issubclass(tunnel.ReverseChannel, grpclib.client.Channel)
    assert issubclass(tunnel.ReconnectingTunnelChannel, grpclib.client.Channel)
    # request() keeps grpclib's exact signature, so every stub can call it.
    for channel in (tunnel.TunnelChannel, tunnel.ReverseChannel, tunnel.ReconnectingTunnelChannel):
        assert parameters(channel.request) == parameters(grpclib.client.Channel.request)


def test_open_tunnel_signature() -> None:
    assert parameters(tunnel.open_tunnel) == [
        ("channel", "POSITIONAL_OR_KEYWORD", inspect.Parameter.empty),
        ("metadata", "KEYWORD_ONLY", None),
        ("options", "KEYWORD_ONLY", None),
    ]


def test_handler_signature() -> None:
    assert parameters(tunnel.TunnelServiceHandler.__init__) == [
        ("self", "POSITIONAL_OR_KEYWORD", inspect.Parameter.empty),
        ("handlers", "POSITIONAL_OR_KEYWORD", ()),
        ("reverse_tunnels", "KEYWORD_ONLY", True),
        ("affinity_key", "KEYWORD_ONLY", None),
        ("on_reverse_tunnel_open", "KEYWORD_ONLY", None),
        ("on_reverse_tunnel_close", "KEYWORD_ONLY", None),
        ("options", "KEYWORD_ONLY", None),
        ("fallback", "KEYWORD_ONLY", None),
    ]
    for method in ("as_channel", "key_as_channel", "all_reverse_tunnels", "initiate_shutdown"):
        assert callable(getattr(tunnel.TunnelServiceHandler, method))


def test_reverse_tunnel_server_signature() -> None:
    assert parameters(tunnel.ReverseTunnelServer.__init__) == [
        ("self", "POSITIONAL_OR_KEYWORD", inspect.Parameter.empty),
        ("channel", "POSITIONAL_OR_KEYWORD", inspect.Parameter.empty),
        ("handlers", "POSITIONAL_OR_KEYWORD", inspect.Parameter.empty),
        ("options", "KEYWORD_ONLY", None),
        ("fallback", "KEYWORD_ONLY", None),
    ]
    assert parameters(tunnel.ReverseTunnelServer.serve)[1] == (
        "metadata",
        "POSITIONAL_OR_KEYWORD",
        None,
    )
    for method in ("serve_forever", "close", "graceful_stop", "wait_closed"):
        assert callable(getattr(tunnel.ReverseTunnelServer, method))
    assert parameters(tunnel.ReverseTunnelServer.serve_forever) == [
        ("self", "POSITIONAL_OR_KEYWORD", inspect.Parameter.empty),
        ("metadata", "POSITIONAL_OR_KEYWORD", None),
        ("min_backoff", "KEYWORD_ONLY", 0.1),
        ("max_backoff", "KEYWORD_ONLY", 30.0),
        ("jitter", "KEYWORD_ONLY", 0.2),
        ("stable_after", "KEYWORD_ONLY", 5.0),
        (
            "permanent_statuses",
            "KEYWORD_ONLY",
            default(tunnel.ReverseTunnelServer.serve_forever, "permanent_statuses"),
        ),
        ("permanent_attempts", "KEYWORD_ONLY", 3),
        ("on_connected", "KEYWORD_ONLY", None),
        ("on_disconnected", "KEYWORD_ONLY", None),
    ]


def test_reconnecting_channel_signature() -> None:
    assert parameters(tunnel.ReconnectingTunnelChannel.__init__) == [
        ("self", "POSITIONAL_OR_KEYWORD", inspect.Parameter.empty),
        ("channel", "POSITIONAL_OR_KEYWORD", inspect.Parameter.empty),
        ("metadata", "KEYWORD_ONLY", None),
        ("options", "KEYWORD_ONLY", None),
        ("wait_for_ready", "KEYWORD_ONLY", False),
        ("min_backoff", "KEYWORD_ONLY", 0.1),
        ("max_backoff", "KEYWORD_ONLY", 30.0),
        ("jitter", "KEYWORD_ONLY", 0.2),
        ("stable_after", "KEYWORD_ONLY", 5.0),
        (
            "permanent_statuses",
            "KEYWORD_ONLY",
            default(tunnel.ReverseTunnelServer.serve_forever, "permanent_statuses"),
        ),
        ("permanent_attempts", "KEYWORD_ONLY", 3),
        ("on_tunnel_open", "KEYWORD_ONLY", None),
    ]
    permanent = default(tunnel.ReconnectingTunnelChannel.__init__, "permanent_statuses")
    assert permanent == {Status.UNIMPLEMENTED, Status.UNAUTHENTICATED, Status.PERMISSION_DENIED}


def test_options_defaults_and_validation() -> None:
    options = tunnel.TunnelOptions()
    assert options.disable_flow_control is False
    assert options.max_receive_message_length == 4 * 1024 * 1024
    assert options.initial_window_size == 65_536  # what the reference announces
    # A silent peer is noticed within a minute by default.
    assert options.keepalive_interval is not None
    assert options.keepalive_interval + options.keepalive_timeout <= 60
    assert options.max_frame_size == 4 * 1024 * 1024  # gRPC's default receive limit
    assert dataclasses.is_dataclass(options)
    with_defaults = {f.name for f in dataclasses.fields(options)}
    assert {"disable_flow_control", "max_receive_message_length"} <= with_defaults
    for bad in (
        {"max_receive_message_length": 0},
        {"max_metadata_size": -1},
        {"negotiation_timeout": 0},
        {"close_timeout": -1.0},
        {"initial_window_size": 0},
        {"initial_window_size": 2**31},
        {"keepalive_interval": 0},
        {"keepalive_timeout": 0},
        # At least the metadata limit plus a chunk plus the frame's own fields.
        {"max_frame_size": 64 * 1024 + 16_384 + 1023},
        {"max_metadata_size": 8 * 1024 * 1024},
    ):
        with pytest.raises(ValueError):
            tunnel.TunnelOptions(**bad)
    floor = tunnel.TunnelOptions(max_frame_size=64 * 1024 + 16_384 + 1024)
    assert floor.max_frame_size == 82_944
    with pytest.raises(dataclasses.FrozenInstanceError):
        # Frozen: a misuse on purpose.
        options.disable_flow_control = True  # type: ignore[misc]


def test_proxy_and_fallback_signatures() -> None:
    empty = inspect.Parameter.empty
    assert parameters(tunnel.Proxy.__init__) == [
        ("self", "POSITIONAL_OR_KEYWORD", empty),
        ("target", "POSITIONAL_OR_KEYWORD", empty),
        ("drop_metadata", "KEYWORD_ONLY", ()),
    ]
    # A Proxy is itself a fallback: (method_name, stream).
    assert parameters(tunnel.Proxy.__call__)[1:] == [
        ("method_name", "POSITIONAL_OR_KEYWORD", empty),
        ("stream", "POSITIONAL_OR_KEYWORD", empty),
    ]
    assert parameters(tunnel.install_fallback) == [
        ("server", "POSITIONAL_OR_KEYWORD", empty),
        ("fallback", "POSITIONAL_OR_KEYWORD", empty),
    ]
    assert "HOP_BY_HOP" in tunnel.proxy.__all__


def test_raw_message_is_what_protocodec_needs() -> None:
    from grpclib.encoding.proto import ProtoCodec

    codec = ProtoCodec()
    message = codec.decode(b"\x08\x01", tunnel.RawMessage)
    assert message == tunnel.RawMessage(b"\x08\x01")
    assert codec.encode(message, tunnel.RawMessage) == b"\x08\x01"
