from __future__ import annotations

import stat
from pathlib import Path

from cocoon_net.node import cni

# the Go tool's conflist, byte for byte
SPEC_TEXT = """\
{
  "cniVersion": "1.0.0",
  "name": "cocoon-dhcp",
  "plugins": [
    {
      "bridge": "cni0",
      "ipMasq": false,
      "ipam": {},
      "isGateway": false,
      "macspoofchk": true,
      "portIsolation": true,
      "type": "bridge"
    }
  ]
}
"""


def test_conflist_bytes_equal_the_go_tool_output() -> None:
    assert cni.render_conflist() == SPEC_TEXT.encode()
    assert cni.render_conflist("vmbr0") == SPEC_TEXT.replace('"cni0"', '"vmbr0"').encode()


def test_ensure_writes_once_with_modes_then_skips(tmp_path: Path) -> None:
    path = tmp_path / "net.d" / "30-cocoon-dhcp.conflist"
    assert cni.ensure_conflist(path, "cni0") == [f"write {path}"]
    assert path.read_bytes() == SPEC_TEXT.encode()
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o750
    before = path.stat().st_mtime_ns, path.stat().st_ino
    assert cni.ensure_conflist(path, "cni0") == []
    assert (path.stat().st_mtime_ns, path.stat().st_ino) == before


def test_ensure_replaces_other_content(tmp_path: Path) -> None:
    path = tmp_path / "30-cocoon-dhcp.conflist"
    path.write_text("{}")
    assert cni.plan_conflist(path, "cni0") == [f"write {path}"]
    assert path.read_text() == "{}"  # planning changes nothing
    cni.ensure_conflist(path, "cni0")
    assert path.read_bytes() == SPEC_TEXT.encode()


def test_remove_is_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "30-cocoon-dhcp.conflist"
    cni.ensure_conflist(path, "cni0")
    assert cni.plan_remove_conflist(path) == [f"remove {path}"]
    assert cni.remove_conflist(path) == [f"remove {path}"]
    assert not path.exists()
    assert cni.remove_conflist(path) == []
    assert cni.plan_remove_conflist(path) == []
