"""The safetensors header reader refuses what the safetensors library would refuse, naming the file."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from axlora.core.errors import UserError
from axlora.core.safetensors_header import read_header


@pytest.fixture
def weights(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(3, 2), "b": torch.zeros(4, dtype=torch.bfloat16)}, path)
    return path


def _rewrite_header(path, change) -> None:
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8: 8 + n])
    change(header)
    raw = json.dumps(header).encode().ljust(n)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def test_intact_file_reads(weights):
    infos, _ = read_header(weights)
    assert [(i.name, i.shape, i.nbytes) for i in infos] == [("a", (3, 2), 24), ("b", (4,), 8)]
    assert set(load_file(weights)) == {"a", "b"}


@pytest.mark.parametrize("damage, expected", [
    (lambda d: d[:-1], r"holds \d+ bytes but its header describes \d+: the file is truncated"),
    (lambda d: d + b"x", "holds 1 bytes more than its header describes"),
    (lambda d: d[:20], "the file ends inside its"),
    (lambda d: d[:5], "file shorter than 8 bytes"),
])
def test_truncated_or_padded_file_is_named(weights, damage, expected):
    weights.write_bytes(damage(weights.read_bytes()))
    with pytest.raises(UserError, match=f"{weights}: .*{expected}"):
        read_header(weights)


@pytest.mark.parametrize("change, expected", [
    (lambda h: h["a"].update(shape=[3, 3]), r"'a' has a damaged header entry \(24 bytes for a F32 tensor of shape"),
    (lambda h: h["b"].pop("data_offsets"), r"'b' has a damaged header entry \(data_offsets None\)"),
    (lambda h: h["a"].update(shape=[3, -2]), r"'a' has a damaged header entry \(shape"),
    (lambda h: h.update(c=7), r"'c' has a damaged header entry \(not a JSON object\)"),
])
def test_damaged_entry_is_named(weights, change, expected):
    _rewrite_header(weights, change)
    with pytest.raises(UserError, match=f"{weights}: tensor {expected}"):
        read_header(weights)
