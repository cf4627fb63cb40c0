"""Reading a safetensors checkpoint's config and tensor shapes without loading weights (index and shard headers)."""

from __future__ import annotations

import glob
import json
import math
import os
import struct

from mha2mla.errors import Mha2mlaError

__all__ = ["read_checkpoint_tensors", "read_checkpoint_meta"]

_MAX_HEADER = 100 * 2**20  # the safetensors format's own limit on the JSON header


_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
                "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}


def _safetensors_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape from one shard's header, after checking that every tensor's bytes are in the file."""
    def bad(why: str) -> Mha2mlaError:
        return Mha2mlaError(f"cannot read {path}: {why}")

    try:
        file_size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise bad("the file is shorter than its 8-byte header length; the shard is truncated or corrupt")
            (size,) = struct.unpack("<Q", raw)
            if size > _MAX_HEADER or 8 + size > file_size:
                raise bad(f"the header length {size} does not fit the {file_size}-byte file; truncated or corrupt")
            header = json.loads(f.read(size))
    except OSError as e:
        raise bad(e.strerror or str(e)) from None
    except ValueError as e:  # JSON or UTF-8
        raise bad(f"the safetensors header is not JSON ({e}); the shard is corrupt") from None
    if not isinstance(header, dict):
        raise bad("the safetensors header is not a JSON object")
    data_size = file_size - 8 - size
    shapes = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            shape = tuple(int(d) for d in info["shape"])
            start, end = (int(x) for x in info["data_offsets"])
            width = _DTYPE_BYTES.get(info["dtype"])
        except (KeyError, TypeError, ValueError):
            raise bad(f"tensor {name!r} has a malformed header entry") from None
        if end > data_size:
            raise bad(f"tensor {name!r} ends at byte {end} of the data but the file holds {data_size}; "
                      f"the shard is truncated")
        if width is not None and end - start != width * math.prod(shape):
            raise bad(f"tensor {name!r} holds {end - start} bytes, not the {width * math.prod(shape)} its "
                      f"{info['dtype']} shape {list(shape)} needs")
        shapes[name] = shape
    return shapes


def read_checkpoint_tensors(directory: str) -> tuple[dict, dict[str, tuple[int, ...]]]:
    """``config.json`` as a dict and every tensor's shape, read from the index and every shard's header (no weights).

    Raises:
        Mha2mlaError: the directory, its config, its index or a shard is missing, unreadable or truncated.
    """
    if not os.path.isdir(directory):
        raise Mha2mlaError(f"{directory} is not a directory")
    config_path = os.path.join(directory, "config.json")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise Mha2mlaError(f"{directory} has no config.json; point to a checkpoint directory") from None
    except (OSError, ValueError) as e:
        raise Mha2mlaError(f"cannot read {config_path}: {e}") from None
    if not isinstance(config, dict):
        raise Mha2mlaError(f"{config_path} is not a JSON object")

    index_path = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index_path):
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise Mha2mlaError(f"cannot read the weight map of {index_path}: {e!r}") from None
        shards = sorted(set(map(str, weight_map.values())))
        for shard in shards:
            if os.path.basename(shard) != shard or not os.path.isfile(os.path.join(directory, shard)):
                raise Mha2mlaError(f"the index names shard {shard!r}, which is missing from {directory}")
    else:
        weight_map = None
        shards = sorted(os.path.basename(p) for p in glob.glob(os.path.join(directory, "*.safetensors")))
        if not shards:
            raise Mha2mlaError(f"{directory} has no *.safetensors weights (check reads tensors from safetensors only)")
    shapes: dict[str, tuple[int, ...]] = {}
    where: dict[str, str] = {}
    for shard in shards:
        for name, shape in _safetensors_shapes(os.path.join(directory, shard)).items():
            if name in where:
                raise Mha2mlaError(f"tensor {name!r} is in both {where[name]} and {shard}")
            shapes[name], where[name] = shape, shard
    if weight_map is not None:
        for name, shard in weight_map.items():
            if where.get(name) != shard:
                raise Mha2mlaError(f"the index puts tensor {name!r} in {shard}, but that shard's header lacks it")
    return config, shapes


def read_checkpoint_meta(directory: str) -> tuple[dict, list[str]]:
    """``config.json`` as a dict and the checkpoint's tensor names (see :func:`read_checkpoint_tensors`)."""
    config, shapes = read_checkpoint_tensors(directory)
    return config, list(shapes)
