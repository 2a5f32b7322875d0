"""Test-wide setup: the Hugging Face libraries stay offline, and any network attempt fails the test."""

import importlib.util
import os
import socket
import sys
from pathlib import Path

import pytest

# Set before any test module imports huggingface_hub / transformers / diffusers, which read these at import.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"


def pytest_configure(config):
    """Under pytest-xdist each worker computes on one thread: the workers share the machine's cores."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


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


@pytest.fixture
def run_script(monkeypatch, capsys):
    """``run(path, *argv) -> (exit code, stdout, stderr)``: a script's ``main()`` run in this process, as
    ``python path argv`` would (a subprocess would pay the 10 s import of torch and diffusers each time).
    An exception's message is added to stderr, with exit code 1, as a traceback's last line would be;
    torch's thread count is restored after the script set its own."""
    import torch

    def run(path, *argv):
        path = Path(path)
        monkeypatch.syspath_prepend(str(path.parent))
        monkeypatch.setattr(sys, "argv", [str(path), *map(str, argv)])
        spec = importlib.util.spec_from_file_location(f"_script_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        threads, code, message = torch.get_num_threads(), 0, ""
        try:
            spec.loader.exec_module(module)
            module.main()
        except SystemExit as exit:
            code, message = (exit.code, "") if isinstance(exit.code, int) or exit.code is None else (1, str(exit.code))
        except Exception as error:
            code, message = 1, f"{type(error).__name__}: {error}"
        finally:
            torch.set_num_threads(threads)
        out, err = capsys.readouterr()
        return code or 0, out, err + message
    return run
