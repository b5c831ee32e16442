"""SDXL's second text encoder as a single-file (LDM) checkpoint stores it: OpenCLIP ViT-bigG
names under ``conditioner.embedders.1.model.``, with q, k and v fused into one ``in_proj_weight``
[3d, d] per layer and ``text_projection`` stored as [d, proj] (the transpose of a Linear weight).
`OpenClipView` shows those tensors under the Hugging Face CLIP names that SDXL LoRAs use
(``text_model.encoder.layers.N.self_attn.q_proj``, ``mlp.fc1``, ``text_projection``, ...: kohya's
``lora_te2_`` and diffusers' ``text_encoder_2.``): q/k/v as row thirds of in_proj, the
projection transposed, so a LoRA on it ports like one on a diffusers folder's text_encoder_2."""

from __future__ import annotations

import re

import torch

# OpenCLIP name (regex on the name under the prefix) -> HF CLIP name template(s); a list of
# three splits the tensor's rows into equal thirds (q, k, v).
_RENAMES = (
    (r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)",
     [r"text_model.encoder.layers.\1.self_attn.{}_proj.\2".format(x) for x in "qkv"]),
    (r"transformer\.resblocks\.(\d+)\.attn\.out_proj\.(weight|bias)", r"text_model.encoder.layers.\1.self_attn.out_proj.\2"),
    (r"transformer\.resblocks\.(\d+)\.mlp\.c_fc\.(weight|bias)", r"text_model.encoder.layers.\1.mlp.fc1.\2"),
    (r"transformer\.resblocks\.(\d+)\.mlp\.c_proj\.(weight|bias)", r"text_model.encoder.layers.\1.mlp.fc2.\2"),
    (r"transformer\.resblocks\.(\d+)\.ln_([12])\.(weight|bias)", r"text_model.encoder.layers.\1.layer_norm\2.\3"),
    (r"token_embedding\.weight", "text_model.embeddings.token_embedding.weight"),
    (r"positional_embedding", "text_model.embeddings.position_embedding.weight"),
    (r"ln_final\.(weight|bias)", r"text_model.final_layer_norm.\1"),
    (r"text_projection", "text_projection.weight"),  # stored [d, proj]: transposed
)  # fmt: skip
_TRANSPOSED = {"text_projection.weight"}


def is_openclip(names) -> bool:
    return any(n.startswith("transformer.resblocks.") for n in names)


class OpenClipView:
    """A store (basemodel._Store interface) of HF CLIP names over an OpenCLIP ``inner`` store."""

    def __init__(self, inner):
        self.inner = inner
        self.label = inner.label
        self.files = inner.files
        self._names: dict[str, tuple[str, int | None]] = {}  # HF name -> (OpenCLIP name, third or None)
        for name in inner.names():
            for pattern, target in _RENAMES:
                m = re.fullmatch(pattern, name)
                if m is None:
                    continue
                if isinstance(target, list):
                    for third, t in enumerate(target):
                        self._names[m.expand(t)] = (name, third)
                else:
                    self._names[m.expand(target)] = (name, None)
                break

    def names(self) -> list[str]:
        return list(self._names)

    def _rows(self, name: str, rows: slice | None) -> slice | None:
        """Rows of the OpenCLIP tensor holding rows ``rows`` of HF tensor ``name``."""
        inner, third = self._names[name]
        if third is None:
            return rows
        unit = self.inner.shape(inner)[0] // 3
        start, stop, _ = (rows or slice(None)).indices(unit)
        return slice(third * unit + start, third * unit + stop)

    def shape(self, name: str) -> tuple[int, ...]:
        inner, third = self._names[name]
        shape = self.inner.shape(inner)
        if name in _TRANSPOSED:
            return tuple(reversed(shape))
        return shape if third is None else (shape[0] // 3, *shape[1:])

    def dtype(self, name: str) -> torch.dtype:
        return self.inner.dtype(self._names[name][0])

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        inner = self._names[name][0]
        if name in _TRANSPOSED:
            t = self.inner.read(inner).mT.contiguous()  # [proj, d]
            return t[rows] if rows is not None else t
        return self.inner.read(inner, self._rows(name, rows))

    def read_into(self, name: str, rows: slice | None, out: torch.Tensor, direct: bool = False) -> bool:
        if name in _TRANSPOSED:
            return False
        return self.inner.read_into(self._names[name][0], self._rows(name, rows), out, direct)

    def mapped(self, name: str, out: torch.Tensor) -> torch.Tensor | None:
        if name in _TRANSPOSED or self._rows(name, None) is not None:
            return None
        return self.inner.mapped(self._names[name][0], out)

    def file_offset(self, name: str, rows: slice | None, out: torch.Tensor) -> int | None:
        if name in _TRANSPOSED:
            return None
        return self.inner.file_offset(self._names[name][0], self._rows(name, rows), out)
