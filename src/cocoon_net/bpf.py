"""Classic BPF socket filters (Documentation/networking/filter.rst): the kernel runs them on
every packet or message before it is queued, so what they drop never wakes this process.

The DHCP server's packet socket keeps only DHCP to the server (dhcp/frames.py); the daemon's
netlink event sockets drop the notifications of its own changes (node/rtnl.py).
"""

from __future__ import annotations

import ctypes
import socket
import struct

# Opcodes, from linux/bpf_common.h.
LD_W_ABS = 0x20
LD_H_ABS = 0x28
LD_B_ABS = 0x30
LD_H_IND = 0x48
LD_B_IND = 0x50
LDX_B_MSH = 0xB1  # X = 4 * (pkt[k] & 0x0f): the IPv4 header length
JEQ_K = 0x15
JGT_K = 0x25
JSET_K = 0x45
RET_K = 0x06
ACCEPT = 0x40000  # RET_K with this keeps the packet whole; RET_K 0 drops it

# (code, jump if true, jump if false, k); jumps count from the next instruction.
Program = tuple[tuple[int, int, int, int], ...]

_SO_ATTACH_FILTER = 26  # asm-generic/socket.h; the socket module does not export it
_INSN = struct.Struct("=HBBI")  # struct sock_filter


def attach_filter(sock: socket.socket, program: Program) -> None:
    """Attach a classic BPF program to `sock` (SO_ATTACH_FILTER). The kernel copies it."""
    insns = ctypes.create_string_buffer(b"".join(_INSN.pack(*insn) for insn in program))
    # struct sock_fprog { unsigned short len; struct sock_filter *filter; }, native alignment.
    fprog = struct.pack("@HP", len(program), ctypes.addressof(insns))
    sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)
