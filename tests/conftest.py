"""Test-wide settings: strict JAX numerics and no network.

* Implicit rank promotion raises (as in neural-tangents and equinox), so a
  silent (N,) + (N, 1) broadcast is caught.
* Any socket connection to a non-local address raises: offline, `tfds.load`
  would otherwise retry for minutes.
"""

import socket

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")

_real_connect = socket.socket.connect


def _guarded_connect(self, address):
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and host not in ("localhost", "127.0.0.1", "::1") \
            and not host.startswith("/"):
        raise OSError(f"tests must not reach the network (tried {address!r})")
    return _real_connect(self, address)


@pytest.fixture(autouse=True, scope="session")
def _no_network():
    socket.socket.connect = _guarded_connect
    yield
    socket.socket.connect = _real_connect


@pytest.fixture
def x64():
    """Run a test with 64-bit JAX types (theory tests)."""
    with jax.enable_x64(True):
        yield


@pytest.fixture(scope="module")
def tr():
    """tests/_torch_resnet.py: torchvision's ResNets in plain torch (skips without torch)."""
    torch = pytest.importorskip("torch")
    import _torch_resnet  # noqa: PLC0415 (imports torch; only the torch-reference tests need it)

    torch.set_num_threads(2)
    return _torch_resnet
