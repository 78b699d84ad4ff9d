"""Write a GGUF file with llama.cpp's own HF -> GGUF conversion, using tensors llmslim quantized.

Not imported by llmslim: ``formats/gguf.py`` runs it in a fresh interpreter with a llama.cpp tree
and that tree's ``gguf-py`` first on ``sys.path`` (the conversion code needs its own ``gguf``,
which may be newer than the one installed). It imports nothing from llmslim.

The spec (JSON) names a Hugging Face folder whose safetensors hold every float tensor, and, for
each tensor llmslim quantized, a row-index probe ``[rows, 1]`` under the tensor's name; the raw GGUF
blocks of those tensors sit in a second safetensors file. llama.cpp's model class converts the
folder as usual (names, hyper-parameters, tokenizer, its per-architecture transforms); when it
hands a probe to the writer, the probe's values say where each original row went, and the raw
blocks are written with their rows moved the same way. A transform that is anything but a
row permutation is refused.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def model_class(arch: str):
    try:
        from conversion import get_model_class  # llama.cpp from 2026 on: one module per family
    except ImportError:
        import convert_hf_to_gguf  # older trees: everything in the script

        return convert_hf_to_gguf.ModelBase.from_model_architecture(arch)
    return get_model_class(arch)


def copy_tokenizer(writer, path: str) -> None:
    """Every ``tokenizer.*`` key of a GGUF file, unchanged (for models that were born GGUF)."""
    import gguf

    reader = gguf.GGUFReader(path)
    for field in reader.fields.values():
        if not field.name.startswith("tokenizer."):
            continue
        main = field.types[0]
        sub = field.types[-1] if main == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), main, sub_type=sub)


def main(spec_path: str) -> None:
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    spec = json.loads(Path(spec_path).read_text())
    raw = load_file(spec["quantized"])
    qtypes = {k: gguf.GGMLQuantizationType[v] for k, v in spec["types"].items()}
    float_types = {k: gguf.GGMLQuantizationType[v] for k, v in spec["float_types"].items()}
    file_type = gguf.LlamaFileType[spec["file_type"]]
    hparams = json.loads((Path(spec["model_dir"]) / "config.json").read_text())
    base = model_class(hparams["architectures"][0])
    sources: dict[str, str] = {}  # GGUF name -> HF name, for the probes on their way to the writer

    class Export(base):
        model_arch = base.model_arch

        def modify_tensors(self, data_torch, name, bid):
            for new_name, tensor in super().modify_tensors(data_torch, name, bid):
                if name in raw:
                    sources[new_name] = name
                yield new_name, tensor

        def tensor_force_quant(self, name, new_name, bid, n_dims):
            if name in raw:
                return gguf.GGMLQuantizationType.F32  # the probe travels as exact floats
            return float_types.get(name, float_types["other"]) if n_dims >= 2 else False

        def set_vocab(self):
            if spec["tokenizer_from"]:
                copy_tokenizer(self.gguf_writer, spec["tokenizer_from"])
            else:
                super().set_vocab()

        def write(self):
            self.prepare_tensors()
            self.ftype = file_type  # general.file_type says what the tensors are
            self.prepare_metadata(vocab_only=False)
            for key, value in spec["kv"].items():
                self.gguf_writer.add_string(key, value)
            self.gguf_writer.write_header_to_file(path=self.fname_out)
            self.gguf_writer.write_kv_data_to_file()
            self.gguf_writer.write_tensors_to_file(progress=False)
            self.gguf_writer.close()

    model = Export(Path(spec["model_dir"]), gguf.LlamaFileType.MOSTLY_F16, Path(spec["out"]), eager=True,
                   model_name=spec["model_name"])
    written: list[list] = []
    used: set[str] = set()
    add_tensor = model.gguf_writer.add_tensor

    def add(name, tensor, raw_shape=None, raw_dtype=None, **kwargs):
        src = sources.pop(name, None)
        if src is None:
            dtype = raw_dtype.name if raw_dtype is not None else str(np.asarray(tensor).dtype).upper()
            written.append([name, dtype])
            return add_tensor(name, tensor, raw_shape=raw_shape, raw_dtype=raw_dtype, **kwargs)
        blocks = raw[src]
        probe = np.asarray(tensor, dtype=np.float64)
        rows = blocks.shape[0]
        perm = probe.reshape(-1).astype(np.int64) if probe.shape == (rows, 1) else None
        if perm is None or not np.array_equal(perm, probe.reshape(-1)) or \
                not np.array_equal(np.sort(perm), np.arange(rows)):
            raise SystemExit(f"llama.cpp's conversion changes {src} -> {name} beyond moving its rows "
                             "(shape or values); it cannot carry pre-quantized blocks")
        written.append([name, qtypes[src].name])
        used.add(src)
        return add_tensor(name, np.ascontiguousarray(blocks[perm]), raw_dtype=qtypes[src], **kwargs)

    model.gguf_writer.add_tensor = add
    model.write()
    if sources or set(raw) - used:
        raise SystemExit(f"llama.cpp's conversion dropped quantized tensors: {sorted(set(raw) - used)}")
    Path(spec["result"]).write_text(json.dumps({"tensors": written}))


if __name__ == "__main__":
    main(sys.argv[-1])
