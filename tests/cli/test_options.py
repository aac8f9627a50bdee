"""The options and checks the commands share (splitnn.cli.options)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from splitnn.cli.options import (
    add_credential_options,
    add_data_options,
    add_report_options,
    check_out_dir,
    check_positive,
    config_from_args,
)
from splitnn.errors import ConfigurationError


@dataclasses.dataclass(frozen=True)
class _Settings:
    epochs: int = 1
    lr: float = 0.1
    name: str = "run"


def test_config_from_args_takes_the_flags_of_the_same_names_and_the_given_values_win():
    args = argparse.Namespace(epochs=3, lr=0.5, unrelated="x")
    assert config_from_args(_Settings, args, lr=0.25) == _Settings(epochs=3, lr=0.25, name="run")


def test_config_from_args_refuses_a_given_value_that_is_no_field():
    with pytest.raises(TypeError, match=r"_Settings has no field\(s\) \['epoch'\]"):
        config_from_args(_Settings, argparse.Namespace(), epoch=2)


def test_shared_options_parse_as_each_command_declares_them(tmp_path):
    p = argparse.ArgumentParser()
    add_data_options(p, dataset="mnist", dataset_help="d")
    add_report_options(p, out="results", out_help="o")
    add_credential_options(p, token="t", cert="c", key="k", ca="a")
    args = p.parse_args(["--no-download", "--tls-ca", str(tmp_path / "ca.pem")])
    assert (args.dataset, args.data_dir, args.no_download) == ("mnist", None, True)
    assert (args.out, args.no_progress) == (Path("results"), False)
    assert (args.token_file, args.tls_cert, args.tls_key, args.tls_ca) == (None, None, None, tmp_path / "ca.pem")


def test_check_out_dir_refuses_a_file_and_accepts_a_directory_or_nothing(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigurationError, match=r"--out .*file exists and is not a directory"):
        check_out_dir(tmp_path / "file")
    check_out_dir(tmp_path)
    check_out_dir(tmp_path / "new")


@pytest.mark.parametrize("value", [0, -1, True])
def test_check_positive_refuses_counts_below_one(value):
    with pytest.raises(ConfigurationError, match="--limit must be a positive integer"):
        check_positive("--limit", value, optional=True)


def test_check_positive_accepts_none_and_positive_counts():
    assert check_positive("--limit", None, optional=True) is None
    assert check_positive("--limit", 1, optional=True) == 1
    with pytest.raises(ConfigurationError, match=r"n must be a positive integer or None \(one per epoch\), got 0"):
        check_positive("n", 0, none_means="one per epoch")
    with pytest.raises(ConfigurationError, match="n must be a positive integer, got None"):
        check_positive("n", None)
