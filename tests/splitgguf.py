"""Split a GGUF into shards as llama.cpp's gguf-split does it, with gguf-py's own splitting writer
(`split_max_tensors`): every key in the first shard, split.no / split.count / split.tensors.count in each,
the tensors in order. For the split-input tests."""

from __future__ import annotations

from pathlib import Path

from gguf import GGUFReader, GGUFValueType, GGUFWriter


def split(src: Path, dst: Path, n_shards: int) -> list[Path]:
    """`src` as `n_shards` files named from `dst` (m.gguf -> m-00001-of-0000N.gguf, ...); their paths."""
    r = GGUFReader(src)
    per = -(-len(r.tensors) // n_shards)
    arch = str(r.get_field("general.architecture").contents())  # type: ignore[union-attr]
    w = GGUFWriter(dst, arch, split_max_tensors=per)
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        sub = f.types[-1] if f.types[0] == GGUFValueType.ARRAY else None
        w.add_key_value(f.name, f.contents(), f.types[0], sub_type=sub)
    for t in r.tensors:
        w.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    paths = [dst.with_name(f"{dst.stem}-{i:05d}-of-{n_shards:05d}.gguf") for i in range(1, n_shards + 1)]
    assert all(p.is_file() for p in paths), sorted(dst.parent.iterdir())
    return paths
