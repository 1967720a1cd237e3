"""Who an ENI belongs to: the rules every multi-ENI cloud shares.

An ENI is this node's only when it is attached to this instance and carries no other node's
tag. adopt pools the addresses of ENIs it finds in the node's subnet, so it asks this first:
pooling another instance's or another node's ENI would hand its addresses to our VMs.
"""

from __future__ import annotations

from ipaddress import IPv4Network

TAG_NODE = "cocoon-net:node"  # the node an ENI (or subnet) was made for


def adopt_refusal(
    eni: str, attached_to: str, owner: str | None, node: str, instance_id: str, subnet: IPv4Network
) -> str | None:
    """Why adopt must not pool the ENI described by `eni` (its id, and its name if any),
    which holds addresses of subnet, or None when it may."""
    where = f"ENI {eni} holds addresses in {subnet} but"
    if attached_to != instance_id:
        attached = f"to {attached_to}" if attached_to else "to no instance"
        return (
            f"{where} is attached {attached}, not to this instance {instance_id}: "
            "it is not this node's to adopt"
        )
    if owner is not None and owner != node:
        return f"{where} is tagged {TAG_NODE}={owner}: it belongs to node {owner!r}, not {node!r}"
    return None
