"""``splitnn train --topology ...``: the same report as plain training, bytes per party included."""

from __future__ import annotations

import json

import pytest

from splitnn.accounting.ledger import KINDS
from splitnn.cli.main import main

LIMIT = 1500


def _train(shared_data, tmp_path, *flags):
    hist = tmp_path / "history.json"
    code = main(
        [
            "train",
            "--dataset",
            "fashion-mnist",
            "--data-dir",
            str(shared_data / "fashion-mnist"),
            "--no-download",
            "--epochs",
            "1",
            "--limit",
            str(LIMIT),
            "--no-progress",
            "--json",
            str(hist),
            *flags,
        ]
    )
    return code, (json.loads(hist.read_text()) if hist.exists() else None)


def ledger_rows(out: str) -> dict[tuple[str, str, str], int]:
    """The ledger table at the end of the report: (from, to, kind) -> bytes."""
    rows = {}
    for line in out.splitlines():
        cells = line.split()
        if len(cells) == 5 and cells[2] in KINDS and cells[4].isdigit():
            rows[(cells[0], cells[1], cells[2])] = int(cells[4])
    return rows


def test_multi_central_dirichlet(shared_data, tmp_path, capsys):
    code, history = _train(
        shared_data,
        tmp_path,
        "--topology",
        "multi",
        "--clients",
        "3",
        "--handoff",
        "central",
        "--partition",
        "dirichlet:0.5",
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "multi: 3 data holders alice1..alice3 (dirichlet:0.5 shards, central hand-offs" in out
    assert "test acc" in out
    bottom = (784 * 128 + 128) * 4
    rows = ledger_rows(out)
    # alice1 uploads the bottom to bob's store once (end of its turn); holders never send weights to each other
    assert rows[("alice1", "bob", "weights")] == bottom
    assert rows[("bob", "alice3", "weights")] == bottom
    assert not any(k == "weights" and dst.startswith("alice") and src.startswith("alice") for src, dst, k in rows)
    assert set(history[0]["bytes_sent"]) == {"alice1", "alice2", "alice3", "bob"}


def test_multi_peer_iid_turns(shared_data, tmp_path, capsys):
    code, history = _train(shared_data, tmp_path, "--topology", "multi", "--clients", "2", "--turn-batches", "4")
    out = capsys.readouterr().out
    assert code == 0
    rows = ledger_rows(out)
    assert rows[("alice1", "alice2", "weights")] % ((784 * 128 + 128) * 4) == 0
    assert not any(k == "weights" and "bob" in (src, dst) for src, dst, k in rows)


def test_splitfed_holders_send_their_bottom_to_the_aggregator_once_per_round(shared_data, tmp_path, capsys):
    code, history = _train(
        shared_data, tmp_path, "--topology", "splitfed", "--clients", "3", "--variant", "v2", "--round-batches", "3"
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "splitfed v2: 3 data holders alice1..alice3 in parallel (iid shards, rounds of 3 batches" in out
    bottom = (784 * 128 + 128) * 4
    rows = ledger_rows(out)
    # 500 samples per holder in batches of 64: 8 batches, rounds of 3: 3 rounds, each holder trains in all
    for h in (1, 2, 3):
        assert rows[(f"alice{h}", "bob", "weights")] == rows[("bob", f"alice{h}", "weights")] == 3 * bottom
    assert not any(src.startswith("alice") and dst.startswith("alice") for src, dst, _ in rows)
    assert set(history[0]["bytes_sent"]) == {"alice1", "alice2", "alice3", "bob"}


def test_splitfed_with_a_third_party_aggregator(shared_data, tmp_path, capsys):
    code, history = _train(shared_data, tmp_path, "--topology", "splitfed", "--clients", "2", "--aggregator", "fed")
    out = capsys.readouterr().out
    assert code == 0
    assert "averaged by fed (third party)" in out
    rows = ledger_rows(out)
    bottom = (784 * 128 + 128) * 4
    assert rows[("alice1", "fed", "weights")] == rows[("fed", "alice2", "weights")] == bottom
    assert not any(k == "weights" and "bob" in (src, dst) for src, dst, k in rows)
    assert history[0]["bytes_sent"]["fed"] == 2 * bottom


def test_u_shape_alice_sends_only_cut_tensors(shared_data, tmp_path, capsys):
    code, history = _train(shared_data, tmp_path, "--topology", "u-shape")
    out = capsys.readouterr().out
    assert code == 0
    assert "u-shape: alice (first and last segments, labels) <-> bob (middle)" in out
    # per epoch alice sends the 128-wide head activation and the 640-wide gradient of the middle's output
    assert history[0]["bytes_sent"]["alice"] == LIMIT * (128 + 640) * 4
    assert {k for _, _, k in ledger_rows(out)} == {"activation", "gradient"}


def test_vertical_holders_send_their_activations_only(shared_data, tmp_path, capsys):
    code, history = _train(shared_data, tmp_path, "--topology", "vertical", "--merge", "mean")
    out = capsys.readouterr().out
    assert code == 0
    assert "vertical: 2 data holders alice1..alice2 (image strips) -mean-> bob" in out
    assert history[0]["bytes_sent"]["alice1"] == history[0]["bytes_sent"]["alice2"] == LIMIT * 128 * 4


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--handoff", "central"], "--handoff do(es) not apply to --topology chain"),
        (["--topology", "multi", "--merge", "sum"], "--merge do(es) not apply to --topology multi"),
        (["--topology", "u-shape", "--clients", "2"], "--clients do(es) not apply"),
        (["--topology", "vertical", "--clients", "1"], "at least 2 clients"),
        (["--topology", "multi", "--clients", "0"], "positive integer"),
        (["--topology", "multi", "--turn-batches", "0"], "turn_batches"),
        (["--topology", "multi", "--partition", "zipf"], "unknown partition"),
        (["--topology", "u-shape", "--workers", "alice,bob,alice"], "--workers applies to --topology chain"),
        (["--topology", "u-shape", "--hidden", "128"], "at least 3 segments"),
        (["--topology", "vertical", "--save", "m.safetensors"], "--save does not support --topology vertical"),
        (["--topology", "multi", "--variant", "v2"], "--variant do(es) not apply to --topology multi"),
        (["--topology", "splitfed", "--turn-batches", "2"], "--turn-batches do(es) not apply to --topology splitfed"),
        (["--topology", "splitfed", "--round-batches", "0"], "round_batches must be a positive integer"),
        (["--topology", "splitfed", "--clients", "2", "--aggregator", "alice2"], "is a data holder"),
        (["--topology", "vertical", "--aggregator", "fed"], "--aggregator do(es) not apply"),
    ],
)
def test_bad_topology_flags_are_refused_before_loading_data(argv, match, capsys, tmp_path):
    code = main(["train", "--data-dir", str(tmp_path), "--no-download", *argv])
    assert code == 2
    assert match in capsys.readouterr().err


def test_an_unknown_splitfed_variant_is_an_argument_error(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--data-dir", str(tmp_path), "--no-download", "--topology", "splitfed", "--variant", "v3"])
    assert exit_.value.code == 2
    assert "invalid choice: 'v3'" in capsys.readouterr().err
