"""Derived objects persisted in the vendor's state (securemark.vendor.cache): built once,
read back after, rebuilt when damaged, private, and keyed by what they are built from."""

from __future__ import annotations

import stat

import torch

from securemark.vendor.cache import file_digest, folder_digest, persisted


def test_built_once_then_read_back(tmp_path):
    calls = []

    def build():
        calls.append(1)
        return {"x": torch.arange(6.0).reshape(2, 3)}

    first = persisted(tmp_path, "thing", "ab" * 32, build)
    second = persisted(tmp_path, "thing", "ab" * 32, build)
    assert len(calls) == 1 and torch.equal(first["x"], second["x"])
    (path,) = tmp_path.glob("thing-*.safetensors")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # vendor state: owner only
    persisted(tmp_path, "thing", "cd" * 32, build)  # another digest (other inputs): built again, beside the first
    assert len(calls) == 2 and len(list(tmp_path.glob("thing-*.safetensors"))) == 2


def test_a_damaged_or_incomplete_file_is_rebuilt(tmp_path):
    build = lambda: {"x": torch.ones(3)}  # noqa: E731
    persisted(tmp_path, "thing", "ab" * 32, build)
    (path,) = tmp_path.glob("thing-*.safetensors")
    path.write_bytes(b"not a safetensors file")
    assert torch.equal(persisted(tmp_path, "thing", "ab" * 32, build)["x"], torch.ones(3))
    rebuilt = persisted(tmp_path, "thing", "ab" * 32, lambda: {"y": torch.zeros(1)}, check=lambda t: "y" in t)
    assert set(rebuilt) == {"y"}


def test_digests_follow_the_content(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.bin").write_bytes(b"one")
    before, file_before = folder_digest(tmp_path / "d"), file_digest(tmp_path / "d" / "a.bin")
    (tmp_path / "d" / "a.bin").write_bytes(b"two")
    assert folder_digest(tmp_path / "d") != before and file_digest(tmp_path / "d" / "a.bin") != file_before
