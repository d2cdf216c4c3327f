"""
Writing a safetensors file one tensor at a time.

`safetensors.torch.save_file` needs every tensor in memory at once; a converter that must
stay within about one tensor of memory writes the header first (all shapes are known from
the index) and then streams each tensor's bytes. The file is the standard format, read
back with `safe_open`.
"""

import json
import os

import torch

DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64", torch.uint8: "U8",
          torch.int8: "I8"}
TORCH_DTYPES = {v: k for k, v in DTYPES.items()}
DTYPE_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # what a user types


class StreamingWriter:
    """`with StreamingWriter(path, [(name, dtype, shape), ...], metadata) as w: w.write(name, t)`"""

    def __init__(self, path, entries, metadata=None):
        self.path, self.expected, offset, header = path, [], 0, {}
        for name, dtype, shape in entries:
            size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            self.expected.append((name, dtype, tuple(shape)))
            offset += size
        if metadata:
            header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self.size = 8 + len(text) + offset
        self.file = open(path, "wb")
        try:
            self.file.write(len(text).to_bytes(8, "little") + text)
        except BaseException:  # `with` calls __exit__ only once __init__ has returned
            self.file.close()
            raise
        self.next = 0

    def write(self, name, tensor):
        want = self.expected[self.next]
        if (name, tensor.dtype, tuple(tensor.shape)) != want:
            raise ValueError(f"{self.path}: expected {want} next, got ({name}, {tensor.dtype}, {tuple(tensor.shape)})")
        self.file.write(tensor.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes())
        self.next += 1

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        try:
            if kind is None:
                if self.next != len(self.expected):
                    raise ValueError(f"{self.path}: {len(self.expected) - self.next} tensors were never written")
                self.file.flush()
                os.fsync(self.file.fileno())
        finally:
            self.file.close()
