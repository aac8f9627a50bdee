"""docs/deploying.md: its first ``toml`` block is a complete federation.toml that provisions as the page shows."""

from __future__ import annotations

import re
import stat
from pathlib import Path

from splitnn.deploy.federation import read_researcher_file, tomllib
from splitnn.deploy.kits import provision

PAGE = Path(__file__).resolve().parents[2] / "docs" / "deploying.md"


def test_the_pages_federation_file_provisions_as_shown(tmp_path):
    text = PAGE.read_text()
    block = re.search(r"```toml\n(.*?)```", text, re.S).group(1)
    (tmp_path / "federation.toml").write_text(block)
    written = provision(tmp_path / "federation.toml", tmp_path / "kits")
    assert written == ["hospital-a", "hospital-b", "lab", "dr-lee"]
    kits = tmp_path / "kits"
    # the layout the page lists
    listed = re.search(r"```text\n(kits/_provisioner/.*?)```", text, re.S).group(1)
    for name in ("hospital-a", "dr-lee"):
        line = next(l for l in listed.splitlines() if l.startswith(f"kits/{name}/"))
        for f in re.findall(r"[\w.-]+\.(?:pem|key|toml|sh|service|md)|token", line):
            assert (kits / name / f).is_file(), (name, f)
    assert stat.S_IMODE((kits / "hospital-a" / "hospital-a.key").stat().st_mode) == 0o600
    conf = tomllib.loads((kits / "hospital-a" / "worker.toml").read_text())
    assert conf["listen"] == "0.0.0.0:7001" and conf["data_listen"] == "0.0.0.0:7101"
    assert conf["metrics_listen"] == "127.0.0.1:9101"
    assert conf["data"] == ["scans=table:/srv/splitnn/scans.csv,id=patient"]
    assert tomllib.loads((kits / "hospital-a" / "policy.toml").read_text()) == {"peers": ["lab"]}
    rf = read_researcher_file(kits / "dr-lee" / "federation.toml")
    assert [p.address for p in rf.parties] == [
        "grpc://splitnn.hospital-a.example:7001",
        "grpc://10.20.0.7:7001",
        "grpc://splitnn.lab.example:7001",
    ]
    # the ports its README asks the site to open are the ones in the page
    readme = (kits / "hospital-a" / "README.md").read_text()
    assert "7001/tcp" in readme and "7101/tcp" in readme and "9101/tcp" in readme
