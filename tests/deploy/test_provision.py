"""``splitnn provision``: kits, certificates, --add, and bad input refused before anything is written."""

from __future__ import annotations

import stat
import subprocess
import sys

import pytest
from cryptography import x509

from splitnn.cli.main import main
from splitnn.deploy.federation import (
    parse_federation,
    read_researcher_file,
    tomllib,  # tomllib, or tomli before Python 3.11
)
from splitnn.deploy.kits import provision
from splitnn.errors import ConfigurationError
from splitnn.transport.certificates import certificate_info
from tests.deploy.kits import federation_text, start_kit

PARTIES = {"alice": "data", "bob": "compute", "claire": "labels"}


def _tree(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) if root.exists() else []


def _verify(cert_path, ca_path) -> None:
    """The certificate was signed by the CA (an independent check: cryptography's verifier)."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
    cert.verify_directly_issued_by(ca)  # raises if not


def test_provision_writes_a_kit_per_party_and_researcher(tmp_path, capsys):
    fed = tmp_path / "federation.toml"
    fed.write_text(federation_text(PARTIES, metrics=True, policy='peers = ["bob"]'))
    assert main(["provision", str(fed), "--out", str(tmp_path / "kits")]) == 0
    kits = tmp_path / "kits"
    assert sorted(p.name for p in kits.iterdir()) == ["_provisioner", "alice", "bob", "claire", "dr-lee"]
    for name in [*PARTIES, "dr-lee"]:
        kit = kits / name
        for secret in (f"{name}.key", "token"):
            assert stat.S_IMODE((kit / secret).stat().st_mode) == 0o600, (name, secret)
        assert "PRIVATE KEY" in (kit / f"{name}.key").read_text()
        assert not (kit / "ca.key").exists()  # the CA key stays with the organiser
        _verify(kit / f"{name}.pem", kits / "_provisioner" / "ca.pem")
        assert (kit / "token").read_text() == (kits / "_provisioner" / "token").read_text()
        assert (kit / "README.md").is_file()
    assert stat.S_IMODE((kits / "_provisioner" / "ca.key").stat().st_mode) == 0o600
    # a party's certificate names it; a researcher's names it and the role its calls claim
    assert certificate_info(kits / "bob" / "bob.pem").names == {"bob"}
    assert certificate_info(kits / "dr-lee" / "dr-lee.pem").names == {"dr-lee", "researcher"}
    # worker.toml: what `splitnn worker` needs; the start script and systemd unit run it
    conf = tomllib.loads((kits / "alice" / "worker.toml").read_text())
    text = fed.read_text()
    port = parse_federation(text).parties[0].port
    assert conf["name"] == "alice" and conf["listen"] == f"127.0.0.1:{port}"
    assert conf["tls_cert"] == "alice.pem" and conf["tls_ca"] == "ca.pem" and conf["policy"] == "policy.toml"
    assert conf["metrics_listen"].startswith("127.0.0.1:")
    assert "worker --config worker.toml" in (kits / "alice" / "start.sh").read_text()
    assert (kits / "alice" / "start.sh").stat().st_mode & stat.S_IXUSR
    assert "ExecStart=/opt/splitnn/alice/start.sh" in (kits / "alice" / "splitnn-alice.service").read_text()
    # data holders get a policy template, holding the rules the federation file gave them
    assert tomllib.loads((kits / "alice" / "policy.toml").read_text()) == {"peers": ["bob"]}
    assert not (kits / "bob" / "policy.toml").exists()
    # the researcher's kit: the parties' addresses and its own certificate
    rf = read_researcher_file(kits / "dr-lee" / "federation.toml")
    assert [(p.name, p.address) for p in rf.parties] == [(p.name, p.address) for p in parse_federation(text).parties]
    assert rf.cert == kits / "dr-lee" / "dr-lee.pem" and rf.token() == (kits / "dr-lee" / "token").read_text().strip()


def test_add_keeps_the_ca_and_every_existing_kit(tmp_path):
    fed = tmp_path / "federation.toml"
    text = federation_text({"alice": "data", "bob": "labels"})
    fed.write_text(text)
    kits = tmp_path / "kits"
    provision(fed, kits)
    before = {p: p.read_bytes() for p in kits.rglob("*") if p.is_file() and p.name != "federation.toml"}
    # a new party and a new researcher
    fed.write_text(
        text.replace("[[researcher]]", '[[party]]\nname = "dave"\nhost = "127.0.0.1"\nport = 1\n\n[[researcher]]')
        + '\n[[researcher]]\nname = "dr-kim"\n'
    )
    assert main(["provision", str(fed), "--out", str(kits), "--add"]) == 0
    after = {p: p.read_bytes() for p in before}
    assert after == before  # no key, certificate, token or script of an existing kit changed
    ca = kits / "_provisioner" / "ca.pem"
    _verify(kits / "dave" / "dave.pem", ca)
    _verify(kits / "dr-kim" / "dr-kim.pem", ca)
    assert (kits / "dave" / "token").read_text() == (kits / "alice" / "token").read_text()
    # the existing researcher now knows the new party too; its key is untouched (checked above)
    assert [p.name for p in read_researcher_file(kits / "dr-lee" / "federation.toml").parties] == [
        "alice",
        "bob",
        "dave",
    ]
    # again: nothing new to write, nothing overwritten
    assert provision(fed, kits, add=True) == []
    assert {p: p.read_bytes() for p in before} == before


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.replace('name = "bob"', 'name = "alice"'), r"line \d+: duplicate party 'alice'"),
        (lambda t: t.replace('host = "127.0.0.1"\nlisten = "127.0.0.1"\nport', 'listen = "127.0.0.1"\nport', 1),
         r"line \d+: party 'alice' has no host"),
        (lambda t: t.replace('role = "labels"', 'role = "labels"\ncolour = "red"'), r"line \d+: unknown key 'colour'"),
        (lambda t: t.replace('[[researcher]]', '[party.policy]\nmax_param = 3\n\n[[researcher]]'),
         r"line \d+: .*unknown rule\(s\) \['max_param'\]"),
        (lambda t: t.replace('name = "test-federation"', 'name = "x"\nowner = "me"'), r"line 3: unknown key 'owner'"),
    ],
    ids=["duplicate-party", "missing-host", "unknown-key", "unknown-policy-rule", "unknown-federation-key"],
)  # fmt: skip
def test_bad_federation_files_are_refused_naming_the_line(tmp_path, capsys, edit, message):
    fed = tmp_path / "federation.toml"
    fed.write_text(edit(federation_text({"alice": "data", "bob": "labels"})))
    with pytest.raises(ConfigurationError, match=message):
        provision(fed, tmp_path / "kits")
    assert not (tmp_path / "kits").exists()  # nothing half-written
    assert main(["provision", str(fed), "--out", str(tmp_path / "kits")]) == 2
    assert "line" in capsys.readouterr().err


def test_the_line_named_is_the_offending_one(tmp_path):
    text = federation_text({"alice": "data", "bob": "labels"}).replace('role = "labels"', 'role = "labels"\ncolour = 1')
    with pytest.raises(ConfigurationError) as err:
        parse_federation(text)
    line = int(str(err.value).split("line ")[1].split(":")[0])
    assert text.splitlines()[line - 1] == "colour = 1"


def test_an_existing_kit_directory_is_never_overwritten(tmp_path):
    fed = tmp_path / "federation.toml"
    fed.write_text(federation_text({"alice": "data", "bob": "labels"}))
    kits = tmp_path / "kits"
    (kits / "bob").mkdir(parents=True)
    (kits / "bob" / "bob.key").write_text("the operator's own key")
    with pytest.raises(ConfigurationError, match=r"bob exist.*never overwrites a kit"):
        provision(fed, kits)
    assert _tree(kits) == ["bob", "bob/bob.key"]  # nothing else written, the key untouched
    assert (kits / "bob" / "bob.key").read_text() == "the operator's own key"
    with pytest.raises(ConfigurationError, match="holds no provisioned federation"):
        provision(fed, kits, add=True)
    assert _tree(kits) == ["bob", "bob/bob.key"]
    with pytest.raises(ConfigurationError, match="is a file; give a directory"):
        provision(fed, kits / "bob" / "bob.key")


def test_worker_config_unknown_key_and_flag_override(tmp_path, capsys):
    fed = tmp_path / "federation.toml"
    fed.write_text(federation_text({"alice": "data"}))
    kits = tmp_path / "kits"
    provision(fed, kits)
    conf = kits / "alice" / "worker.toml"
    conf.write_text(conf.read_text() + "colour = 'red'\n")
    line = len(conf.read_text().splitlines())
    assert main(["worker", "--config", str(conf)]) == 2
    assert f"line {line}: unknown key 'colour'" in capsys.readouterr().err
    conf.write_text(conf.read_text().replace("colour = 'red'\n", ""))
    # a flag on the command line wins over the file: a wrong --name meets the certificate check
    assert main(["worker", "--config", str(conf), "--name", "bob"]) == 2
    err = capsys.readouterr().err
    assert "certificate" in err and "is for ['alice'], not for this worker 'bob'" in err


def test_a_worker_whose_certificate_names_another_party_refuses_to_start(tmp_path):
    fed = tmp_path / "federation.toml"
    fed.write_text(federation_text({"alice": "data", "bob": "labels"}))
    kits = tmp_path / "kits"
    provision(fed, kits)
    bob = kits / "bob"
    # alice's kit, started with bob's certificate and key: a real process, refused before it listens
    w = start_kit(kits / "alice", "--tls-cert", str(bob / "bob.pem"), "--tls-key", str(bob / "bob.key"), wait=False)
    assert w.proc.wait(60) == 2
    log = w.log.read_text()
    assert "is for ['bob'], not for this worker 'alice'" in log
    assert "listening" not in log and not (kits / "alice" / "address").exists()


def test_provision_is_a_command(tmp_path):
    fed = tmp_path / "federation.toml"
    fed.write_text(federation_text({"alice": "data"}))
    out = subprocess.run(
        [sys.executable, "-m", "splitnn", "provision", str(fed), "--out", str(tmp_path / "k")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert "wrote 2 kit(s)" in out.stdout
