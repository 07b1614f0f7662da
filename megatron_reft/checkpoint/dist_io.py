"""megatron `dist_checkpointing` (torch_dist) weights written and read one part at a time.

`dist_checkpointing.save` wants the whole sharded state dict in memory. A converter does not
need a model for that: the torch_dist format is PyTorch Distributed Checkpoint (DCP) — one
`.metadata` listing each tensor's global shape and stored chunks, `.distcp` files holding the
chunks — plus megatron's `metadata.json` and `common.pt`. Written the way megatron writes it
(layer tensors stacked on a leading layer axis under one key, TE-spec names, `_extra_state`
objects), it loads with `dist_checkpointing.load` into a model at any TP × PP: the loader reads
each rank's slice out of the stored chunks.

`DistCheckpointWriter` takes one part (e.g. one transformer layer) at a time and writes it to its
own `.distcp` file, so only that part is in memory. `DistCheckpointReader` reads one key, or one
layer of a stacked key, by assembling the stored chunks that overlap it.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import torch

from megatron_reft.checkpoint.mapping import checkpoint_key

MEGATRON_FORMAT = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                   "common_backend": "torch", "common_backend_version": 1}
# Linear layers whose (empty) `_extra_state` the local spec checkpoints as ShardedObjects;
# megatron's loader expects them to be present.
EXTRA_STATE_MODULES = ("self_attention.linear_proj", "self_attention.linear_qkv",
                       "mlp.linear_fc1", "mlp.linear_fc2")


class _Resolver:
    """The one SavePlanner method FileSystemWriter.write_data calls."""

    def __init__(self, data: dict):
        self.data = data

    def resolve_data(self, item):
        return self.data[(item.index.fqn, item.index.offset)]


class DistCheckpointWriter:
    """Writes a torch_dist checkpoint directory part by part (one process, no model)."""

    def __init__(self, weights_dir: str | Path, num_layers: int):
        from torch.distributed.checkpoint import FileSystemWriter

        self.dir = Path(weights_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.num_layers = num_layers
        self.writer = FileSystemWriter(str(self.dir), single_file_per_rank=True, thread_count=1)
        self.writer.set_up_storage_writer(True)
        self.state_dict_metadata = {}
        self.results = []
        self.parts = 0

    def write_part(self, tensors: dict[str, torch.Tensor], layer: int | None = None) -> None:
        """Write megatron tensors given by global (local- or TE-spec) names: all non-layer
        tensors, or all tensors of transformer layer `layer` (names `decoder.layers.<layer>.…`)."""
        from torch.distributed.checkpoint.filesystem import _StoragePrefix
        from torch.distributed.checkpoint.planner import SavePlan

        items, data = [], {}
        for name, tensor in tensors.items():
            key, tensor_layer = checkpoint_key(name)
            if tensor_layer != layer:
                raise ValueError(f"{name} does not belong to part layer={layer}")
            item, chunk = self._tensor_item(key, tensor.contiguous(), layer)
            items.append(item)
            data[(item.index.fqn, item.index.offset)] = chunk
        if layer is not None:
            for module in EXTRA_STATE_MODULES:
                item, blob = self._extra_state_item(module, layer)
                items.append(item)
                data[(item.index.fqn, item.index.offset)] = blob
        plan = SavePlan(items=items, storage_data=_StoragePrefix(f"__{self.parts}_"))
        self.parts += 1
        self.writer.prepare_local_plan(plan)
        self.results.append(self.writer.write_data(plan, _Resolver(data)).wait())

    def _tensor_item(self, key: str, tensor: torch.Tensor, layer: int | None):
        from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, MetadataIndex,
                                                           TensorProperties, TensorStorageMetadata)
        from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

        if layer is None:
            global_shape, offsets, chunk = tensor.shape, (0,) * tensor.dim(), tensor
        else:  # one slab of the [num_layers, ...] stacked tensor
            global_shape = torch.Size((self.num_layers,) + tuple(tensor.shape))
            offsets, chunk = (layer,) + (0,) * tensor.dim(), tensor.unsqueeze(0)
        properties = TensorProperties(dtype=tensor.dtype)
        storage = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=chunk.shape)
        meta = self.state_dict_metadata.setdefault(
            key, TensorStorageMetadata(properties=properties, size=torch.Size(global_shape), chunks=[]))
        if meta.size != global_shape or meta.properties.dtype != tensor.dtype:
            raise ValueError(f"{key}: shape/dtype {tuple(global_shape)} {tensor.dtype} differs from "
                             f"earlier layers' {tuple(meta.size)} {meta.properties.dtype}")
        meta.chunks.append(storage)
        item = WriteItem(index=MetadataIndex(key, torch.Size(offsets)), type=WriteItemType.SHARD,
                         tensor_data=TensorWriteData(chunk=storage, properties=properties,
                                                     size=torch.Size(global_shape)))
        return item, chunk

    def _extra_state_item(self, module: str, layer: int):
        from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex
        from torch.distributed.checkpoint.planner import WriteItem, WriteItemType

        # megatron's ShardedObject unique key: <key>/shard_<layer>_<num_layers>; the payload is
        # the list of objects with that key (one None per local-spec linear layer).
        fqn = f"model.decoder.layers.{module}._extra_state/shard_{layer}_{self.num_layers}"
        self.state_dict_metadata[fqn] = BytesStorageMetadata()
        blob = io.BytesIO()
        torch.save([None], blob)
        return WriteItem(index=MetadataIndex(fqn), type=WriteItemType.BYTE_IO), blob

    def finish(self) -> None:
        """Write DCP's `.metadata` and megatron's `metadata.json` / `common.pt`."""
        from torch.distributed.checkpoint.metadata import Metadata

        missing = [k for k, m in self.state_dict_metadata.items()
                   if hasattr(m, "chunks") and len(m.chunks) == 0]
        if missing:
            raise RuntimeError(f"no data written for {missing}")
        self.writer.finish(Metadata(state_dict_metadata=self.state_dict_metadata), self.results)
        torch.save({}, self.dir / "common.pt")  # no non-sharded model state
        # What megatron's dist_checkpointing.core.save_config writes; written here so the
        # converter does not import megatron.core (slow: it compiles fused kernels on import).
        (self.dir / "metadata.json").write_text(json.dumps(MEGATRON_FORMAT))


def _overlap(chunk_offsets, chunk_sizes, want_offsets, want_sizes):
    """Per-dimension slices (in chunk coordinates, in wanted coordinates) of the overlap, or None."""
    src, dst = [], []
    for co, cs, wo, ws in zip(chunk_offsets, chunk_sizes, want_offsets, want_sizes):
        lo, hi = max(co, wo), min(co + cs, wo + ws)
        if lo >= hi:
            return None
        src.append(slice(lo - co, hi - co))
        dst.append(slice(lo - wo, hi - wo))
    return tuple(src), tuple(dst)


class DistCheckpointReader:
    """Reads tensors of a torch_dist checkpoint without a model or a process group."""

    def __init__(self, weights_dir: str | Path):
        from torch.distributed.checkpoint import FileSystemReader

        self.dir = Path(weights_dir)
        if not (self.dir / ".metadata").is_file():
            raise FileNotFoundError(f"{self.dir}: not a torch_dist checkpoint (no .metadata)")
        self.metadata = FileSystemReader(str(self.dir)).read_metadata()
        self.tensors = {k: m for k, m in self.metadata.state_dict_metadata.items() if hasattr(m, "chunks")}

    def has(self, name: str) -> bool:
        return checkpoint_key(name)[0] in self.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        key, layer = checkpoint_key(name)
        size = tuple(self.tensors[key].size)
        return size if layer is None else size[1:]

    def dtype(self, name: str) -> torch.dtype:
        return self.tensors[checkpoint_key(name)[0]].properties.dtype

    def read(self, name: str) -> torch.Tensor:
        """The full tensor for a megatron name (a layer name reads that layer's slab)."""
        key, layer = checkpoint_key(name)
        meta = self.tensors[key]
        size = tuple(meta.size)
        want_offsets = (0,) * len(size) if layer is None else (layer,) + (0,) * (len(size) - 1)
        want_sizes = size if layer is None else (1,) + size[1:]
        exact = [c for c in meta.chunks if tuple(c.offsets) == want_offsets and tuple(c.sizes) == want_sizes]
        if exact:  # stored as one piece (TP=1 saves, converted checkpoints): no assembly copy
            out = self._read_chunk(key, exact[0])
            return out if layer is None else out[0]
        out = torch.empty(want_sizes, dtype=meta.properties.dtype)
        covered = 0
        for chunk in meta.chunks:
            hit = _overlap(chunk.offsets, chunk.sizes, want_offsets, want_sizes)
            if hit is None:
                continue
            src, dst = hit
            out[dst] = self._read_chunk(key, chunk)[src]
            covered += out[dst].numel()
        if covered != out.numel():
            raise RuntimeError(f"{self.dir}: chunks of {key} do not cover {name}")
        return out if layer is None else out[0]

    def _read_chunk(self, key: str, chunk) -> torch.Tensor:
        from torch.distributed.checkpoint.metadata import MetadataIndex

        info = self.metadata.storage_data[MetadataIndex(key, chunk.offsets)]
        if getattr(info, "transform_descriptors", None):
            raise NotImplementedError(f"{key}: stored with transforms {info.transform_descriptors}")
        with open(self.dir / info.relative_path, "rb") as f:
            f.seek(info.offset)
            blob = f.read(info.length)
        return torch.load(io.BytesIO(blob), weights_only=True, map_location="cpu")
