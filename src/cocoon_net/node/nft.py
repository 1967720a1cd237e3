"""nftables through libnftables, the library behind the `nft` command, in this process.

The guard changes one set element before each ACK. `nft -f -` costs a process (about 4 ms on
a small machine); the library parses the same command text and sends one netlink
transaction in well under 0.1 ms, whatever the size of the set. A command buffer is one
transaction: all of it is applied, or none.

A context is not thread-safe: each thread that talks to nftables makes its own.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
from typing import Any

from cocoon_net.errors import HostSetupError

_NFT_CTX_OUTPUT_JSON = 1 << 4
_LIBRARY = "libnftables.so.1"


def _load() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("nftables") or _LIBRARY)
    except OSError as exc:
        raise HostSetupError(
            f"cannot load {_LIBRARY} ({exc}): install the nftables package"
        ) from None
    lib.nft_ctx_new.restype = ctypes.c_void_p
    lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
    lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
    lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
    lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
    lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
    return lib


class Nft:
    """One libnftables context; `run` sends one transaction, `json` reads the ruleset."""

    _lib: ctypes.CDLL | None = None

    def __init__(self) -> None:
        if Nft._lib is None:
            Nft._lib = _load()
        self._l = Nft._lib
        ctx = self._l.nft_ctx_new(0)
        if not ctx:
            raise HostSetupError("nftables: cannot create a context")
        self._ctx = ctypes.c_void_p(ctx)
        self._l.nft_ctx_buffer_output(self._ctx)
        self._l.nft_ctx_buffer_error(self._ctx)
        self.transactions = 0  # commands sent, for tests and the bench

    def run(self, commands: str) -> str:
        """Apply commands as one transaction; HostSetupError with nft's message on failure."""
        self.transactions += 1
        rc = self._l.nft_run_cmd_from_buffer(self._ctx, commands.encode())
        output = (self._l.nft_ctx_get_output_buffer(self._ctx) or b"").decode()
        if rc != 0:
            error = (self._l.nft_ctx_get_error_buffer(self._ctx) or b"").decode()
            first = next((line for line in error.splitlines() if line.strip()), "failed")
            raise HostSetupError(f"nftables: {first.removeprefix('Error: ')}")
        return output

    def json(self, command: str) -> list[dict[str, Any]]:
        """A `list` command's answer as the JSON objects nft prints with -j."""
        self._l.nft_ctx_output_set_flags(self._ctx, _NFT_CTX_OUTPUT_JSON)
        try:
            text = self.run(command)
        finally:
            self._l.nft_ctx_output_set_flags(self._ctx, 0)
        items: list[dict[str, Any]] = json.loads(text or '{"nftables": []}')["nftables"]
        return items

    def close(self) -> None:
        if self._ctx:
            self._l.nft_ctx_free(self._ctx)
            self._ctx = ctypes.c_void_p(0)
