"""Stub and service flavours (betterproto, betterproto2, grpclib) over tunnels."""
