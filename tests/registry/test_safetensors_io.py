"""The safetensors reader: malformed files are refused, NaN/Inf found in every float width."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from registry.safetensors_io import SafetensorsError, has_nonfinite, read_header, write_canonical


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_found_in_every_float_dtype(
    dtype: torch.dtype, bad: float, tmp_path: Path
) -> None:
    clean = torch.randn(300, 7).to(dtype)
    dirty = clean.clone()
    dirty[299, 6] = bad
    save_file({"clean": clean, "dirty": dirty}, tmp_path / "t.safetensors")
    header = read_header(tmp_path / "t.safetensors")
    with (tmp_path / "t.safetensors").open("rb") as f:
        assert not has_nonfinite(f, header["clean"])
        assert has_nonfinite(f, header["dirty"])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x01", "shorter than the 8-byte header length"),
        (struct.pack("<Q", 999) + b"{}", "header length 999 exceeds the file"),
        (struct.pack("<Q", 2) + b"[]", "header is not a JSON object"),
        (struct.pack("<Q", 5) + b"{nope", "header is not JSON"),
    ],
)
def test_malformed_files_are_refused(content: bytes, message: str, tmp_path: Path) -> None:
    (tmp_path / "bad.safetensors").write_bytes(content)
    with pytest.raises(SafetensorsError, match=message):
        read_header(tmp_path / "bad.safetensors")


def test_offsets_must_match_shape_and_file(tmp_path: Path) -> None:
    header = b'{"x":{"dtype":"F32","shape":[4],"data_offsets":[0,8]}}'
    (tmp_path / "bad.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(SafetensorsError, match="offsets do not match shape"):
        read_header(tmp_path / "bad.safetensors")


def test_canonical_rewrite_keeps_tensors_and_drops_metadata(tmp_path: Path) -> None:
    tensors = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(4, dtype=torch.float16)}
    save_file(tensors, tmp_path / "in.safetensors", metadata={"secret": "x"})
    with (tmp_path / "out.safetensors").open("wb") as f:
        write_canonical(tmp_path / "in.safetensors", read_header(tmp_path / "in.safetensors"), f)
    out = load_file(tmp_path / "out.safetensors")
    assert out.keys() == tensors.keys() and all(out[k].equal(tensors[k]) for k in tensors)
    assert b"secret" not in (tmp_path / "out.safetensors").read_bytes()
