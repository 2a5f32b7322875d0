"""Test-wide setup: the Hugging Face libraries stay offline, and any network attempt fails the test."""

import os
import socket

import pytest

# Set before any test module imports huggingface_hub / transformers / diffusers, which read these at import.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"


def _network_error(what, target):
    return RuntimeError(f"network access in tests: {what}({target!r})")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Make every network attempt raise RuntimeError; AF_UNIX sockets still work."""
    connect, connect_ex = socket.socket.connect, socket.socket.connect_ex

    def guarded_connect(self, address):
        if self.family == socket.AF_UNIX:
            return connect(self, address)
        raise _network_error("socket.connect", address)

    def guarded_connect_ex(self, address):
        if self.family == socket.AF_UNIX:
            return connect_ex(self, address)
        raise _network_error("socket.connect_ex", address)

    def guarded_create_connection(address, *args, **kwargs):
        raise _network_error("socket.create_connection", address)

    def guarded_getaddrinfo(host, port, *args, **kwargs):
        raise _network_error("socket.getaddrinfo", (host, port))

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", guarded_connect_ex)
    monkeypatch.setattr(socket, "create_connection", guarded_create_connection)
    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)
