"""The fuzzer's file pieces (loraport.testing.fuzz): safetensors files as bytes (built, parsed,
rebuilt around a header); the CLI subprocess cases; and the adapter files it mutates: one seed per adapter family (LoHa,
LoKr, Tucker LoCon, DoRA, full differences in LyCORIS names; LoHa, LoKr, DoRA in PEFT names) on the
tiny Hunyuan Video base, and the mutations of one adapter tensor."""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
import tempfile
import time

import torch
from hypothesis import strategies as st
from safetensors.torch import save_file

from .. import adapters, archs, formats
from . import tiny

CASE_SECONDS = 10  # a case's time limit, in process and (beyond the interpreter's start) as a CLI run

# mutations of one adapter tensor (hada_*, lokr_*, lora_mid, dora_scale / lora_magnitude_vector, diff, diff_b)
ADAPTER_MUTATIONS = ("adapter_shape", "adapter_rank", "adapter_nan_inf", "adapter_missing", "adapter_dtype",
                     "adapter_0dim", "adapter_empty", "adapter_alpha")  # fmt: skip
ADAPTER_ROLES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "lokr_w1", "lokr_w1_a",
                 "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "lora_mid.weight", "dora_scale",
                 "lora_magnitude_vector", "diff", "diff_b")  # fmt: skip
# adapter seeds: {reader: (format, {module: type})}, on the tiny Hunyuan Video base (its one conv
# layer, img_in.proj, carries the Tucker forms)
ADAPTER_SEEDS = {
    "adapter-loha": ("kohya", {"double_blocks.0.img_attn_qkv": "loha", "img_in.proj": "loha-tucker",
                               "double_blocks.0.img_attn_proj": "dora-loha"}),
    "adapter-lokr": ("kohya", {"double_blocks.0.img_attn_proj": "lokr", "double_blocks.0.img_mlp.fc1": "lokr-full",
                               "img_in.proj": "lokr-tucker"}),
    "adapter-locon": ("kohya", {"img_in.proj": "locon-tucker", "double_blocks.0.img_attn_qkv": "dora",
                                "double_blocks.0.img_attn_proj": "dora-in", "double_blocks.0.img_mlp.fc2": "full"}),
    "adapter-peft": ("peft", {"double_blocks.0.img_attn_proj": "loha", "double_blocks.0.img_mlp.fc1": "lokr",
                              "double_blocks.0.img_mlp.fc2": "dora"}),
}  # fmt: skip


def st_bytes(tensors, metadata) -> bytes:
    with tempfile.NamedTemporaryFile(suffix=".safetensors") as f:
        save_file({k: v.contiguous() for k, v in tensors.items()}, f.name, metadata=metadata or None)
        return open(f.name, "rb").read()


def parse(blob: bytes):
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def build(header, data: bytes, header_text: bytes | None = None, length: int | None = None) -> bytes:
    text = header_text if header_text is not None else json.dumps(header, ensure_ascii=False).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


# ---------------------------------------------------------------- mutations


def tensor_keys(header):
    return sorted(k for k in header if k != "__metadata__")


def tensor(header, data, key):
    info = header[key]
    dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}[info["dtype"]]
    b, e = info["data_offsets"]
    return torch.frombuffer(bytearray(data[b:e]), dtype=dtype).reshape(info["shape"]).clone()


def adapter_tensors(kind: str, shape, g) -> dict[str, torch.Tensor]:
    """One module's tensors (roles as in loraport.adapters) of ``kind`` for a weight of ``shape``,
    shaped as LyCORIS stores them; rank 2, Kronecker factor 4."""
    out, channels, *kernel = shape
    ones = [1] * len(kernel)

    def rnd(*s):
        return torch.randn(*s, generator=g) / 4

    if kind == "loha":  # rank 4: r² = 16 takes convert's dense path at these sizes, rank 2 its factors
        return {f"hada_w{i}_{ab}": rnd(out, 4) if ab == "a" else rnd(4, channels * math.prod(kernel))
                for i in (1, 2) for ab in "ab"}  # fmt: skip
    if kind == "loha-tucker":
        return {f"hada_{w}": t for i in (1, 2)
                for w, t in ((f"w{i}_a", rnd(2, out)), (f"w{i}_b", rnd(2, channels)), (f"t{i}", rnd(2, 2, *kernel)))}  # fmt: skip
    if kind == "lokr":
        return {"lokr_w1": rnd(4, 4), "lokr_w2_a": rnd(out // 4, 2), "lokr_w2_b": rnd(2, channels // 4)}
    if kind == "lokr-full":
        return {"lokr_w1_a": rnd(4, 1), "lokr_w1_b": rnd(1, 4), "lokr_w2": rnd(out // 4, channels // 4)}
    if kind == "lokr-tucker":
        return {"lokr_w1": rnd(4, 1), "lokr_w2_a": rnd(2, out // 4), "lokr_w2_b": rnd(2, channels),
                "lokr_t2": rnd(2, 2, *kernel)}  # fmt: skip
    if kind == "locon-tucker":
        return {"up": rnd(out, 2, *ones), "mid": rnd(2, 2, *kernel), "down": rnd(2, channels, *ones)}
    if kind == "full":
        return {"diff": rnd(*shape), "diff_b": rnd(out)}
    if kind == "dora-loha":
        return {**adapter_tensors("loha", shape, g), "magnitude": rnd(out, 1).abs() + 1}
    t = {"up": rnd(out, 2, *ones), "down": rnd(2, channels, *kernel)}
    t["magnitude"] = rnd(out, 1, *ones).abs() + 1 if kind == "dora" else rnd(1, channels, *ones).abs() + 1
    return t


def adapter_state_dict(base, fmt: str, kinds: dict[str, str]) -> dict[str, torch.Tensor]:
    """An adapter file of module -> type ``kinds`` on the tiny Hunyuan Video ``base``, in ``fmt``."""
    g = torch.Generator().manual_seed(27)
    arch = archs.get("hunyuan-video")
    mods = []
    for name, kind in kinds.items():
        t = adapter_tensors(kind, tuple(base[name + ".weight"].shape), g)
        if fmt == "peft" and "magnitude" in t:
            t["magnitude"] = t["magnitude"].flatten()
        alpha = None if kind == "full" else 1.0
        m = adapters.AdapterModule("model", name, kind.split("-")[0] if kind != "dora-loha" else "loha", t, alpha, name,
                                   flat_kernel=kind in ("loha", "dora-loha"))  # fmt: skip
        if kind in ("dora", "dora-in"):
            m.kind = "locon"
        if "magnitude" in t:
            m.magnitude_axis, m.magnitude_ndim = ("in" if kind == "dora-in" else "out"), t["magnitude"].dim()
        mods.append(m)
    style = formats.format_style(fmt, arch)
    lf = formats.LoraFile(mods, fmt, arch, "original")
    return formats.state_dict(formats.LoraFile(formats.convert_style(lf, style), fmt, arch, style), fmt)


def mutate_adapter(draw, header, data, mutation):
    """One adapter tensor (or, for "adapter_alpha", a module's alpha) made wrong: another shape,
    another size along one dim (so that paired factors disagree on their rank), NaN/Inf, gone
    (its partner left alone), an integer or bool dtype, 0-dim, empty."""
    tensors = {k: tensor(header, data, k) for k in tensor_keys(header)}
    meta = header.get("__metadata__")
    keys = [k for k in tensors if k.endswith(tuple("." + r for r in ADAPTER_ROLES))]
    key = draw(st.sampled_from(sorted(keys)))
    t = tensors[key]
    if mutation == "adapter_shape":
        kind = draw(st.sampled_from(["transpose", "extra_dim", "flatten", "random"]))
        if kind == "transpose" and t.dim() >= 2:
            t = t.transpose(0, 1)
        elif kind == "extra_dim":
            t = t.unsqueeze(draw(st.integers(0, t.dim())))
        elif kind == "flatten":
            t = t.reshape(-1)
        else:
            t = torch.randn(draw(st.lists(st.integers(1, 9), min_size=1, max_size=5)))
    elif mutation == "adapter_rank" and t.dim() >= 1:
        dim = draw(st.integers(0, t.dim() - 1))
        size = draw(st.sampled_from([t.shape[dim] - 1, t.shape[dim] + 1, t.shape[dim] * 2]))
        t = t.narrow(dim, 0, size) if size <= t.shape[dim] else torch.cat(
            [t, torch.randn(*t.shape[:dim], size - t.shape[dim], *t.shape[dim + 1 :])], dim)  # fmt: skip
    elif mutation == "adapter_nan_inf" and t.numel():
        t = t.clone()
        t.view(-1)[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from([float("nan"), float("inf"), -float("inf")]))
    elif mutation == "adapter_missing":
        del tensors[key]
        t = None
    elif mutation == "adapter_dtype":
        t = t.to(draw(st.sampled_from([torch.int8, torch.int32, torch.int64, torch.bool, torch.uint8])))
    elif mutation == "adapter_0dim":
        t = t.reshape(-1)[0].clone() if t.numel() else torch.tensor(1.0)
    elif mutation == "adapter_empty" and t.dim() >= 1:
        t = t.narrow(draw(st.integers(0, t.dim() - 1)), 0, 0)
    elif mutation == "adapter_alpha":
        stem = key.rsplit(".", 2 if key.endswith(".weight") else 1)[0]
        t, key = draw(st.sampled_from([torch.tensor(0.0), torch.tensor(-2.0), torch.tensor(1e30), torch.tensor(3e38), torch.ones(2),
                                       torch.tensor(7, dtype=torch.int64), torch.tensor(float("inf"))])), stem + ".alpha"  # fmt: skip
    if t is not None:
        tensors[key] = t.contiguous()
    return st_bytes(tensors, meta if isinstance(meta, dict) else {})


def run_cli(inputs, adapter_base: str) -> dict:
    """``python -m loraport inspect FILE`` on each kept input (``convert FILE --base`` on adapter
    files): exit 0 or 2, <= 1 stderr line, no traceback, no output after exit 2, under
    CASE_SECONDS."""
    env = tiny.subprocess_env()  # the loraport this run imported, installed or from the source tree
    result = {"cases": 0, "failures": [], "seconds": 0.0}
    t0 = time.perf_counter()
    # a case may take CASE_SECONDS beyond what starting the interpreter and torch takes now (on
    # a loaded machine, many seconds): twice a `--version` run's time, measured here
    subprocess.run([sys.executable, "-m", "loraport", "--version"], capture_output=True, env=env, check=True)
    limit = CASE_SECONDS + 2 * (time.perf_counter() - t0)
    result["limit"] = limit
    for reader, mutation, path in inputs:
        result["cases"] += 1
        out = path + ".out.safetensors"
        cmd = ["inspect", path]
        if reader.startswith("adapter-"):
            cmd = ["convert", path, "-o", out, "--rank", "2", "--base", adapter_base, "--quiet"]
        try:
            res = subprocess.run([sys.executable, "-m", "loraport", *cmd], capture_output=True, text=True, env=env,
                                 timeout=limit)  # fmt: skip
        except subprocess.TimeoutExpired:
            result["failures"].append((reader, mutation, f"hang: over {limit:.0f} s"))
            continue
        lines = res.stderr.strip().splitlines()
        if res.returncode not in (0, 2) or len(lines) > 1 or "Traceback" in res.stderr:
            result["failures"].append((reader, mutation, f"exit {res.returncode}: {res.stderr[-500:]}"))
        elif res.returncode == 2 and os.path.exists(out):
            result["failures"].append((reader, mutation, f"exit 2 but {out} was written"))
    result["seconds"] = time.perf_counter() - t0
    return result
