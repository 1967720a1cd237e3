"""nftables from this process: libnftables (the library behind `nft`) for whole tables and
listings, raw nfnetlink for the set elements the guard changes before each ACK.

`nft -f -` costs a process (about 4 ms on a small machine); the library parses the same
command text in-process, about 0.1 ms plus 25 µs per element; an element message built here
costs the kernel's work only. Either way one call is one transaction: all of it is applied,
or none, and its cost does not depend on the size of the set.

A context is not thread-safe: each thread that talks to nftables makes its own.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import socket
import struct
from typing import Any

from cocoon_net.errors import HostSetupError
from cocoon_net.node.rtnl import (
    _ERR,
    _NLMSG,
    _RTA,
    NETLINK_CAP_ACK,
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    SOL_NETLINK,
    _attr,
    _messages,
)

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


# nfnetlink: the messages `nft add element` ends up sending, built here directly. The command
# text costs nft's parser about 25 µs per element on a small machine; these cost the kernel's.
NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NFT_MSG_GETTABLE, NFT_MSG_NEWSETELEM, NFT_MSG_DELSETELEM, NFT_MSG_GETOBJ = 1, 12, 14, 19
NFT_MSG_NEWGEN, NFT_MSG_GETGEN = 15, 16
NFTA_GEN_ID = 1
NFNL_BATCH_GENID = 1
NFTA_TABLE_NAME = 1
NFTA_OBJ_TABLE, NFTA_OBJ_NAME, NFTA_OBJ_TYPE, NFTA_OBJ_DATA = 1, 2, 3, 4
NFT_OBJECT_COUNTER = 1
NFTA_COUNTER_PACKETS = 2
NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_ELEMENTS = 1, 2, 3
NFTA_LIST_ELEM = NFTA_SET_ELEM_KEY = NFTA_DATA_VALUE = 1
NLA_F_NESTED = 0x8000
NFPROTO_INET, NFPROTO_BRIDGE = 1, 7
_NFGEN = struct.Struct("=BBH")  # family, version, res_id (big endian)
# The nfgenmsg of a batch's begin and end messages: they name the subsystem in res_id.
_BATCH = _NFGEN.pack(0, 0, socket.htons(NFNL_SUBSYS_NFTABLES))
# struct timeval: how long a read waits for the kernel's answer before the call fails.
_ACK_TIMEOUT = struct.pack("@ll", 2, 0)
_RESTART = os.strerror(errno.ERESTART)  # a batch refused by its generation check


class StaleGeneration(HostSetupError):
    """The ruleset is no longer at the generation a transaction was sent for: someone else
    committed in between, and the kernel applied nothing."""


def next_generation(generation: int) -> int:
    """The generation a successful commit at `generation` leads to (the kernel skips 0)."""
    return (generation + 1) & 0xFFFFFFFF or 1


class ElementSocket:
    """Adds and deletes elements of one set in one transaction per call, over netlink."""

    def __init__(self, family: int, table: str, set_name: str) -> None:
        # An element message's nfgenmsg and the names of its table and set: the same in each.
        self._head = (
            _NFGEN.pack(family, 0, 0)
            + _attr(NFTA_SET_ELEM_LIST_TABLE, table.encode() + b"\0")
            + _attr(NFTA_SET_ELEM_LIST_SET, set_name.encode() + b"\0")
        )
        self._seq = 0
        self._sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER
        )
        self._sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        # The kernel's own timeout on a blocking socket, not settimeout(): that one makes every
        # send and recv a poll() first, and the answers are queued before sendall() returns.
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _ACK_TIMEOUT)
        self._sock.bind((0, 0))
        self.transactions = 0  # for tests and the bench

    @property
    def portid(self) -> int:
        """This socket's netlink port: the sender of the notifications its changes cause."""
        port: int = self._sock.getsockname()[0]
        return port

    def close(self) -> None:
        self._sock.close()

    def _message(self, kind: int, flags: int, body: bytes, family: int = 0, res: int = 0) -> bytes:
        return self._request(kind, flags, _NFGEN.pack(family, 0, socket.htons(res)) + body)

    def _request(self, kind: int, flags: int, payload: bytes) -> bytes:
        """One message whose payload starts with its nfgenmsg, with the next sequence number."""
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return _NLMSG.pack(_NLMSG.size + len(payload), kind, flags, self._seq, 0) + payload

    def _elements(self, kind: int, keys: list[bytes], flags: int) -> bytes:
        elements = b"".join([_element_head(len(key)) + key + _PAD[-len(key) % 4] for key in keys])
        body = self._head + _attr(NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED, elements)
        return self._request((NFNL_SUBSYS_NFTABLES << 8) | kind, flags | NLM_F_REQUEST, body)

    def apply(self, deletes: list[bytes], adds: list[bytes], generation: int | None = None) -> None:
        """Delete, then add, these keys as one transaction; HostSetupError if refused.

        With `generation`, only if the ruleset is still at that generation: StaleGeneration
        (and nothing applied) when anyone has committed anything since.

        Only the last message asks for an ACK: the kernel answers every message that fails
        whatever its flags, all of them once the batch is over, so the ACK ends the answers.
        """
        if not deletes and not adds:
            return
        check = b""
        if generation is not None:
            check = _attr(NFNL_BATCH_GENID, struct.pack("!I", generation))
        parts = [self._request(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, _BATCH + check)]
        begin = self._seq
        if deletes:
            parts.append(self._elements(NFT_MSG_DELSETELEM, deletes, 0 if adds else NLM_F_ACK))
        if adds:
            parts.append(self._elements(NFT_MSG_NEWSETELEM, adds, NLM_F_CREATE | NLM_F_ACK))
        last = self._seq
        parts.append(self._request(NFNL_MSG_BATCH_END, NLM_F_REQUEST, _BATCH))
        self.transactions += 1
        try:
            self._sock.sendall(b"".join(parts))
            errors = self._acks(last, begin)
        except OSError as exc:
            raise HostSetupError(f"nftables netlink: {exc.strerror or exc}") from None
        if errors == [_RESTART]:
            raise StaleGeneration(f"nftables: the ruleset is past generation {generation}")
        if errors:
            raise HostSetupError(f"nftables: set element update refused: {errors[0]}")

    def generation(self) -> int:
        """The ruleset's generation now: every commit, by anyone, moves it on."""
        kind = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN
        try:
            self._sock.sendall(self._message(kind, NLM_F_REQUEST, b""))
            while True:
                for msg_kind, seq, payload in _messages(self._sock.recv(1 << 16)):
                    if seq != self._seq:
                        continue
                    if msg_kind == NLMSG_ERROR:
                        error = -_ERR.unpack_from(payload)[0]
                        raise HostSetupError(f"nftables generation: {os.strerror(error)}")
                    value = _attrs(payload[_NFGEN.size :]).get(NFTA_GEN_ID)
                    if value is None or len(value) != 4:
                        raise HostSetupError("nftables generation: no generation in the answer")
                    return int.from_bytes(value, "big")
        except OSError as exc:
            raise HostSetupError(f"nftables netlink: {exc.strerror or exc}") from None

    def has_table(self, family: int, name: str) -> bool:
        """Whether the table exists: one netlink round trip, where `nft list tables` reads
        every set element into its cache first (half a second with 60,000 of them)."""
        body = _attr(NFTA_TABLE_NAME, name.encode() + b"\0")
        kind = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETTABLE
        try:
            self._sock.sendall(self._message(kind, NLM_F_REQUEST | NLM_F_ACK, body, family))
            errors = self._acks(self._seq)
        except OSError as exc:
            raise HostSetupError(f"nftables netlink: {exc.strerror or exc}") from None
        if errors and errors[0] != os.strerror(errno.ENOENT):
            raise HostSetupError(f"nftables: table {name}: {errors[0]}")
        return not errors

    def counters(self, family: int, table: str) -> dict[str, int]:
        """Packets counted by each named counter of the table ({} when it does not exist);
        a dump of the counter objects only, no set elements."""
        body = _attr(NFTA_OBJ_TABLE, table.encode() + b"\0")
        body += _attr(NFTA_OBJ_TYPE, struct.pack("!I", NFT_OBJECT_COUNTER))
        kind = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETOBJ
        found: dict[str, int] = {}
        try:
            self._sock.sendall(self._message(kind, NLM_F_REQUEST | NLM_F_DUMP, body, family))
            while True:
                for msg_kind, _seq, payload in _messages(self._sock.recv(1 << 16)):
                    if msg_kind == NLMSG_DONE:
                        return found
                    if msg_kind == NLMSG_ERROR:
                        error = -_ERR.unpack_from(payload)[0]
                        if error in (0, errno.ENOENT):
                            return found
                        raise HostSetupError(f"nftables counters: {os.strerror(error)}")
                    attrs = _attrs(payload[_NFGEN.size :])
                    name = bytes(attrs.get(NFTA_OBJ_NAME, b"")).rstrip(b"\0").decode()
                    data = _attrs(attrs.get(NFTA_OBJ_DATA, memoryview(b"")))
                    packets = data.get(NFTA_COUNTER_PACKETS)
                    if name and packets is not None:
                        found[name] = int.from_bytes(packets, "big")
        except OSError as exc:
            raise HostSetupError(f"nftables netlink: {exc.strerror or exc}") from None

    def _acks(self, last: int, begin: int | None = None) -> list[str]:
        """The errors among the answers up to the one to message `last`. An answer to the
        batch's `begin` message is the kernel refusing the whole batch (a generation check):
        nothing else follows it."""
        errors: list[str] = []
        while True:
            for kind, seq, payload in _messages(self._sock.recv(1 << 16)):
                if kind == NLMSG_ERROR:
                    error = -_ERR.unpack_from(payload)[0]
                    if seq == begin:
                        return [os.strerror(error)]
                    if error:
                        errors.append(os.strerror(error))
                    if seq == last:
                        return errors


def _element_head(size: int) -> bytes:
    """The attribute headers of one set element whose key is `size` octets: the element and
    its key (both nested), then the key's value, which is padded to 4 octets."""
    value = _RTA.size + size
    padded = value + -size % 4
    return (
        _RTA.pack(2 * _RTA.size + padded, NFTA_LIST_ELEM | NLA_F_NESTED)
        + _RTA.pack(_RTA.size + padded, NFTA_SET_ELEM_KEY | NLA_F_NESTED)
        + _RTA.pack(value, NFTA_DATA_VALUE)
    )


_PAD = (b"", b"\0", b"\0\0", b"\0\0\0")


def _attrs(payload: memoryview) -> dict[int, memoryview]:
    """The attributes of one level, by type (the nested flag cleared)."""
    out: dict[int, memoryview] = {}
    pos = 0
    while pos + 4 <= len(payload):
        length, kind = struct.unpack_from("=HH", payload, pos)
        if length < 4:
            break
        out[kind & ~NLA_F_NESTED] = payload[pos + 4 : pos + length]
        pos += (length + 3) & ~3
    return out
