"""Hugging Face checkpoint files, one tensor at a time.

Reading: safetensors or PyTorch .bin, single file or sharded with an index. safetensors files
are memory-mapped and reopened for every tensor, so only the tensors being converted are
resident (pages of a mapping stay in the resident set until the tensors using it are freed).
A .bin file is memory-mapped (`torch.load(mmap=True)`) and kept open while it is being read,
so at most one .bin shard is resident.

Writing: sharded safetensors written as the tensors arrive. The safetensors header lists every
tensor's offsets before the data, so the writer takes the full list of (name, shape, dtype) up
front and then streams each tensor's bytes; nothing is held beyond the tensor being written.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
from pathlib import Path

import torch

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
SAFE_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
TORCH_DTYPES = {v: k for k, v in SAFE_DTYPES.items()}
# Files copied as the tokenizer (HF's tokenizer file names, including SentencePiece models).
TOKENIZER_FILES = re.compile(r"^(tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\..*|"
                             r"merges\.txt|.*\.model|chat_template\..*)$")


def read_config(hf_dir: str | Path) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{hf_dir}: no config.json (not a Hugging Face model directory)")
    return json.loads(path.read_text())


def _safetensors_header(path: Path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


class HFReader:
    """Names, shapes and (one at a time) the tensors of a Hugging Face checkpoint directory."""

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        self.files = self._weight_files()  # stored name -> file
        self.format = "safetensors" if all(f.suffix == ".safetensors" for f in self.files.values()) else "bin"
        self._bin_path, self._bin = None, None
        self._stored = self._canonical_names(list(self.files))  # canonical name -> stored name
        self._meta = self._read_meta()  # canonical name -> (shape, dtype)

    @staticmethod
    def _canonical_names(stored: list[str]) -> dict[str, str]:
        """Checkpoints saved from the bare base model (OPTModel, LlamaModel; e.g. the original
        OPT .bin files) lack the `model.` prefix of the *ForCausalLM names: add it."""
        base_roots = ("decoder.", "layers.", "embed_tokens.")  # OPTModel / LlamaModel top level
        if any(n.startswith("model.") for n in stored) or not any(n.startswith(base_roots) for n in stored):
            return {n: n for n in stored}
        return {(n if n.startswith("lm_head.") else "model." + n): n for n in stored}

    def _weight_files(self) -> dict[str, Path]:
        for index in (SAFE_INDEX, BIN_INDEX):
            if (self.dir / index).is_file():
                weight_map = json.loads((self.dir / index).read_text())["weight_map"]
                return {name: self.dir / file for name, file in weight_map.items()}
        for single in ("model.safetensors", "pytorch_model.bin"):
            if (self.dir / single).is_file():
                return {name: self.dir / single for name in self._names_in(self.dir / single)}
        raise FileNotFoundError(f"{self.dir}: no model.safetensors, pytorch_model.bin or index file")

    def _names_in(self, path: Path) -> list[str]:
        if path.suffix == ".safetensors":
            return list(_safetensors_header(path))
        return list(torch.load(path, mmap=True, weights_only=True, map_location="cpu"))

    def _read_meta(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        stored_meta = {}
        for path in sorted(set(self.files.values())):
            if path.suffix == ".safetensors":
                for name, info in _safetensors_header(path).items():
                    stored_meta[name] = (tuple(info["shape"]), TORCH_DTYPES[info["dtype"]])
            else:
                for name, t in self._open_bin(path).items():
                    stored_meta[name] = (tuple(t.shape), t.dtype)
        self._bin_path, self._bin = None, None
        return {name: stored_meta[stored] for name, stored in self._stored.items()}

    def names(self) -> list[str]:
        return list(self._meta)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][0]

    def dtype(self, name: str) -> torch.dtype:
        return self._meta[name][1]

    def _open_bin(self, path: Path) -> dict:
        if self._bin_path != path:  # drop the previous file's mapping first
            self._bin = None
            self._bin = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
            self._bin_path = path
        return self._bin

    def get(self, name: str) -> torch.Tensor:
        """The tensor, still backed by the memory-mapped file (read-only use, no copy): its pages
        become resident as they are read and are released with the tensor."""
        stored = self._stored[name]
        path = self.files[stored]
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                return f.get_tensor(stored)
        return self._open_bin(path)[stored]

    def close(self) -> None:
        self._bin_path, self._bin = None, None


def copy_tokenizer(src: str | Path, dst: str | Path) -> list[str]:
    """Copy tokenizer files found in `src` into `dst` (created only when there are any)."""
    src = Path(src)
    names = sorted(p.name for p in src.iterdir() if p.is_file() and TOKENIZER_FILES.match(p.name))
    if names:
        Path(dst).mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.copy2(src / name, Path(dst) / name)
    return names


def parse_size(text: str | int) -> int:
    """'5GB' / '500MB' / '2GiB' / bytes → bytes (HF's max_shard_size style, decimal units)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot parse size {text!r} (e.g. 5GB, 500MB)")
    unit = m.group(2).upper().rstrip("B")
    base = 1024 if unit.endswith("I") else 1000
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.rstrip("I")]
    return int(float(m.group(1)) * base ** power)


class ShardedSafetensorsWriter:
    """Writes `model-0000k-of-0000n.safetensors` + index (or one `model.safetensors`), streaming.

    entries: every tensor's (name, shape, dtype) in the order `write` will be called.
    """

    def __init__(self, out_dir: str | Path, entries: list[tuple[str, tuple, torch.dtype]],
                 max_shard_bytes: int):
        self.dir = Path(out_dir)
        self.entries = entries
        self.shards = self._plan(entries, max_shard_bytes)
        self._next = 0  # index into entries
        self._file = None
        self._shard = -1

    @staticmethod
    def _nbytes(shape, dtype) -> int:
        n = 1
        for s in shape:
            n *= s
        return n * torch.empty((), dtype=dtype).element_size()

    def _plan(self, entries, max_shard_bytes) -> list[list[int]]:
        shards, size = [[]], 0
        for i, (_, shape, dtype) in enumerate(entries):
            nbytes = self._nbytes(shape, dtype)
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(i)
            size += nbytes
        return shards

    def file_name(self, shard: int) -> str:
        if len(self.shards) == 1:
            return "model.safetensors"
        return f"model-{shard + 1:05d}-of-{len(self.shards):05d}.safetensors"

    def _open_shard(self, shard: int) -> None:
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for i in self.shards[shard]:
            name, shape, dtype = self.entries[i]
            nbytes = self._nbytes(shape, dtype)
            header[name] = {"dtype": SAFE_DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, like the reference writer
        self._file = open(self.dir / self.file_name(shard), "wb")
        self._file.write(struct.pack("<Q", len(blob)) + blob)
        self._shard = shard

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected, shape, dtype = self.entries[self._next]
        if name != expected or tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise RuntimeError(f"writer expected {expected} {tuple(shape)} {dtype}, "
                               f"got {name} {tuple(tensor.shape)} {tensor.dtype}")
        shard = next(s for s, idx in enumerate(self.shards) if self._next in idx)
        if shard != self._shard:
            self._close_file()
            self._open_shard(shard)
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        self._file.write(memoryview(data.numpy()))
        self._next += 1

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def close(self) -> None:
        self._close_file()
        if self._next != len(self.entries):
            raise RuntimeError(f"writer closed after {self._next} of {len(self.entries)} tensors")
        if len(self.shards) > 1:
            weight_map = {self.entries[i][0]: self.file_name(s)
                          for s, idx in enumerate(self.shards) for i in idx}
            total = sum(self._nbytes(shape, dtype) for _, shape, dtype in self.entries)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.dir / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
