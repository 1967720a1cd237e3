"""Throw-away namespaces that look like a node on a cloud VPC, and real DHCP clients for its VMs.

Used by `cocoon-net sandbox` (the demo) and by the netns tests; it never changes the host outside
the namespaces and the temp directory it creates.
"""

from cocoon_net.sandbox.clients import CLIENTS, Dhclient, Dhcpcd, DhcpClient, Udhcpc
from cocoon_net.sandbox.topology import Sandbox, Vm, ipv4_addresses, vm_mac

__all__ = [
    "CLIENTS",
    "Dhclient",
    "DhcpClient",
    "Dhcpcd",
    "Sandbox",
    "Udhcpc",
    "Vm",
    "ipv4_addresses",
    "vm_mac",
]
