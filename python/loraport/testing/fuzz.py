"""A property-based fuzzer over every file reader of loraport (needs hypothesis): ``run`` and
``report``, used by tests/test_fuzz.py (a fast subset) and by the benchmark's command line,
``python -m benchmarks.fuzz --cases N --seed S [--cli-cases M]``.

Hypothesis draws a reader and a mutation of a small valid file of that reader (LoRAs in each
format and a PEFT adapter_config.json; adapter files of every type: LoHa, LoKr, Tucker LoCon, DoRA
and full differences in LyCORIS names, LoHa, LoKr and DoRA in PEFT names; base models as one
safetensors file, a sharded index, a ``.pt`` checkpoint and a diffusers folder; subspace cache
entries), writes the mutated file and runs it in this process through the entry points the CLI
uses (formats.read_lora then write_lora; for adapter files also convert and resize against a base
model; BaseModel then every tensor's shape, dtype and data; SubspaceCache.get). The property:
each case ends in success or in loraport's InputError with a one-line message (the CLI's exit 2)
-- for the cache, in an entry or a miss, never an exception -- with no other exception, no case
over 10 s, no output or temporary file left by a failed write, and no allocation driven by a
forged size (the process's peak RSS may not grow by more than twice the file's size plus 32 MiB
of allocator slack). ``--cli-cases`` of the single-file cases are run again end to end as
``python -m loraport inspect FILE`` subprocesses, adapter files as ``python -m loraport convert``
(exit 0 or 2, at most one stderr line, no traceback, no output after exit 2, under 10 s). ``report`` formats a table of cases and failures per reader and
mutation, the first failures with their tracebacks, and the seconds taken. The adapter files'
seeds and mutations, and the safetensors byte helpers: loraport.testing.fuzz_files."""

from __future__ import annotations

import io
import json
import os
import random
import resource
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter, defaultdict

import torch
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from .. import adapters, convert, formats, resize
from ..basemodel import BaseModel
from ..cache import SubspaceCache
from ..errors import InputError
from . import fuzz_files, tiny
from .fuzz_files import ADAPTER_MUTATIONS, ADAPTER_SEEDS, CASE_SECONDS

RSS_SLACK = 32 << 20
LORA_FORMATS = {"kohya": "flux", "tencent": "hunyuan-video", "diffusers": "flux", "peft": "flux", "comfy": "flux"}
ST_MUTATIONS = (
    "truncate", "header_length", "header_garbage", "header_unicode", "deep_nesting", "duplicate_keys",
    "offsets", "dtype_shape", "unknown_dtype", "huge_shape", "nan_inf", "zero_size", "metadata", "bitflip",
)  # fmt: skip
LORA_MUTATIONS = ("alpha", "rank_mismatch", "zero_rank", "missing_partner", "two_names", "factor_dtype")
JSON_MUTATIONS = ("truncate", "json_garbage", "json_unicode", "deep_nesting", "duplicate_keys", "json_types", "bitflip")
PT_MUTATIONS = ("truncate", "bitflip", "garbage_block")


class CaseTimeout(Exception):
    pass


# ---------------------------------------------------------------- valid seeds


def _seeds(folder: str) -> dict:
    """Small valid files of every reader: {reader: how to rebuild a case folder from parts}."""
    flux = tiny.base_model("flux", width=16, blocks=1)
    hun = tiny.base_model("hunyuan-video", width=16, blocks=1)
    seeds = {"base_names": {"flux": tiny.lora_targets("flux", flux), "hunyuan-video": tiny.lora_targets("hunyuan-video", hun)}}
    for fmt, arch in LORA_FORMATS.items():
        base = flux if arch == "flux" else hun
        mods = tiny.lora_targets(arch, base)[:4]
        sd = tiny.lora(arch, base, fmt=fmt, rank=2, alpha=1.0 if fmt in ("kohya", "tencent", "comfy") else None,
                       modules=mods)  # fmt: skip
        seeds[f"lora-{fmt}"] = fuzz_files.parse(fuzz_files.st_bytes(sd, {"ss_network_dim": "2", "modelspec.title": "seed"}))
    peft_sd = tiny.lora("flux", flux, fmt="peft", rank=2, alpha=None, modules=tiny.lora_targets("flux", flux)[:3])
    seeds["adapter_config"] = (fuzz_files.st_bytes(peft_sd, {}), json.dumps({"r": 2, "lora_alpha": 4, "use_rslora": False,
                                                                   "alpha_pattern": {}, "peft_type": "LORA"}).encode())  # fmt: skip
    small = {k: v for k, v in list(flux.items())[:6]}
    seeds["base-single"] = fuzz_files.parse(fuzz_files.st_bytes(small, {"format": "pt"}))
    seeds["base-diffusers"] = seeds["base-single"]
    keys = list(small)
    shards = {"model-00001-of-00002.safetensors": keys[:3], "model-00002-of-00002.safetensors": keys[3:]}
    seeds["base-sharded"] = (
        {f: fuzz_files.st_bytes({k: small[k] for k in ks}, {}) for f, ks in shards.items()},
        json.dumps({"metadata": {"total_size": 1}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}).encode(),
    )
    buf = io.BytesIO()
    torch.save({"module": {k: v.contiguous() for k, v in small.items()}}, buf)
    seeds["base-pt"] = buf.getvalue()
    seeds["adapter_base"] = tiny.save_base(hun, os.path.join(folder, "adapter-base.safetensors"))
    for reader, (fmt, kinds) in ADAPTER_SEEDS.items():
        seeds[reader] = fuzz_files.parse(fuzz_files.st_bytes(fuzz_files.adapter_state_dict(hun, fmt, kinds), {}))
    w = small[keys[0]].float()  # [m, n]
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    cache = SubspaceCache(os.path.join(folder, "cache-seed"))
    key = SubspaceCache.key("fingerprint", "model", [], w.shape[1], 2, dict(method="power", power_iters=2, oversample=8, seed=0))
    cache.put(key, U[:, :2], S[:2], Vh[:2].T, (w.double() ** 2).sum())
    with open(cache.path(key), "rb") as f:
        seeds["cache"] = (fuzz_files.parse(f.read()), key, (w.shape[0], w.shape[1], 2))
    return seeds






def _check_seeds(seeds, folder: str) -> list:
    """Failures of the unmutated adapter seeds, which must go all the way through `exercise`
    (this also loads what the cases use before any case's memory is measured)."""
    failures = []
    for reader in ADAPTER_SEEDS:
        case = os.path.join(folder, "seed-" + reader)
        os.makedirs(os.path.join(case, "out"))
        _write(os.path.join(case, "lora.safetensors"), fuzz_files.build(*seeds[reader]))
        written: list = []
        try:
            exercise(reader, os.path.join(case, "lora.safetensors"), seeds, os.path.join(case, "out", "o.safetensors"),
                     written)  # fmt: skip
            if len(written) != 3:
                failures.append((reader, "valid seed", f"wrote only {written}"))
        except Exception as e:  # noqa: BLE001  (a valid file that fails is the finding)
            failures.append((reader, "valid seed", f"{type(e).__name__}: {e}"[:300] + "\n" + traceback.format_exc(limit=-4)))
        shutil.rmtree(case)
    return failures










def mutate_safetensors(draw, parsed, mutation: str, lora: bool) -> bytes:
    header, data = json.loads(json.dumps(parsed[0])), parsed[1]
    keys = fuzz_files.tensor_keys(header)
    key = draw(st.sampled_from(keys))
    info = header[key]
    blob = fuzz_files.build(header, data)
    if mutation == "truncate":
        text_len = struct.unpack("<Q", blob[:8])[0]
        region = draw(st.sampled_from(["length", "header", "data"]))
        lo, hi = {"length": (0, 7), "header": (8, 7 + text_len), "data": (8 + text_len, len(blob) - 1)}[region]
        return blob[: draw(st.integers(lo, max(lo, hi)))]
    if mutation == "header_length":
        n = struct.unpack("<Q", blob[:8])[0]
        length = draw(st.sampled_from([0, 1, n - 1, n + 1, n + 8, len(blob), len(blob) + 1, 2**31, 2**63, 2**64 - 1]))
        return struct.pack("<Q", max(0, length)) + blob[8:]
    if mutation == "header_garbage":
        n = struct.unpack("<Q", blob[:8])[0]
        junk = draw(st.binary(min_size=0, max_size=n + 16))
        return fuzz_files.build(None, data, header_text=junk)
    if mutation == "header_unicode":
        text = json.dumps(header, ensure_ascii=False)
        choice = draw(st.sampled_from(["key", "invalid_utf8", "bom", "surrogate"]))
        if choice == "key":
            header[draw(st.text(min_size=1, max_size=8))] = header.pop(key)
            return fuzz_files.build(header, data)
        if choice == "invalid_utf8":
            raw = text.encode()
            at = draw(st.integers(0, len(raw) - 1))
            return fuzz_files.build(None, data, header_text=raw[:at] + b"\xff\xfe" + raw[at:])
        if choice == "bom":
            return fuzz_files.build(None, data, header_text=b"\xef\xbb\xbf" + text.encode())
        return fuzz_files.build(None, data, header_text=text.replace(key, key + "\\ud800", 1).encode())
    if mutation == "deep_nesting":
        depth = draw(st.sampled_from([64, 200, 1000, 100_000]))
        where = draw(st.sampled_from(["metadata", "shape", "top"]))
        nest = "[" * depth + "]" * depth
        text = json.dumps(header)
        if where == "shape":
            text = text.replace(json.dumps(info["shape"]), nest, 1)
        elif where == "metadata":
            text = text[:-1] + ',"__metadata__":{"x":' + nest + "}}"
        else:
            text = '{"a":' + nest + "," + text[1:]
        return fuzz_files.build(None, data, header_text=text.encode())
    if mutation == "duplicate_keys":
        text = json.dumps(header)
        other = dict(info, data_offsets=[0, info["data_offsets"][1] - info["data_offsets"][0]])
        return fuzz_files.build(None, data, header_text=(text[:-1] + f", {json.dumps(key)}: {json.dumps(other)}}}").encode())
    if mutation == "offsets":
        b, e = info["data_offsets"]
        kind = draw(st.sampled_from(["beyond", "reversed", "overlap", "negative", "huge", "not_int", "missing"]))
        info["data_offsets"] = {
            "beyond": [b, len(data) + draw(st.integers(1, 1 << 20))],
            "reversed": [e, b],
            "overlap": [max(0, b - 4), e - 4] if b >= 4 else [b, e + 4],
            "negative": [-8, e],
            "huge": [b, 2**64 - 1],
            "not_int": [float(b) + 0.5, "x"],
            "missing": [b],
        }[kind]
        return fuzz_files.build(header, data)
    if mutation == "dtype_shape":
        kind = draw(st.sampled_from(["dtype", "shape", "negative_dim", "float_dim", "not_list"]))
        if kind == "dtype":
            info["dtype"] = draw(st.sampled_from(["F64", "F16", "I8", "BOOL", "U8", "F8_E4M3", "I64"]))
        elif kind == "shape":
            info["shape"] = draw(st.lists(st.integers(0, 64), max_size=4))
        elif kind == "negative_dim":
            info["shape"] = [-1, *info["shape"][1:]]
        elif kind == "float_dim":
            info["shape"] = [1.5, *info["shape"][1:]]
        else:
            info["shape"] = "16"
        return fuzz_files.build(header, data)
    if mutation == "unknown_dtype":
        info["dtype"] = draw(st.sampled_from(["F128", "Q4_0", "", "f32", "C64", "U64", "F4", "E8M0"]))
        return fuzz_files.build(header, data)
    if mutation == "huge_shape":
        big = draw(st.sampled_from([2**31, 2**40, 2**62, 2**64 - 1]))
        info["shape"] = draw(st.sampled_from([[big], [big, big], [1, big], [0, big]]))
        return fuzz_files.build(header, data)
    if mutation == "nan_inf":
        raw = bytearray(data)
        b, e = info["data_offsets"]
        size = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}.get(info["dtype"])
        if size and e > b:
            at = b + size * draw(st.integers(0, (e - b) // size - 1))
            value = draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
            packed = torch.tensor([value], dtype={4: torch.float32, 2: torch.float16, 8: torch.float64}[size])
            if info["dtype"] == "BF16":
                packed = torch.tensor([value], dtype=torch.bfloat16)
            raw[at : at + size] = packed.view(torch.uint8).numpy().tobytes()
        return fuzz_files.build(header, bytes(raw))
    if mutation == "zero_size":
        shape = list(info["shape"]) or [1]
        shape[draw(st.integers(0, len(shape) - 1))] = 0
        info["shape"], info["data_offsets"] = shape, [info["data_offsets"][0]] * 2
        return fuzz_files.build(header, data)  # the tensor's old bytes now belong to no tensor
    if mutation == "metadata":
        header["__metadata__"] = draw(st.sampled_from([{"a": 1}, {"a": None}, {"a": ["x"]}, {"a": {"b": "c"}},
                                                      "text", [1, 2], None, {"lora_adapter_metadata": "{not json"},
                                                      {"lora_adapter_metadata": '{"lora_alpha": "x"}'},
                                                      {"lora_adapter_metadata": '{"lora_alpha": 1, "alpha_pattern": 3}'},
                                                      {"lora_adapter_metadata": '[1]'}]))  # fmt: skip
        return fuzz_files.build(header, data)
    if mutation == "bitflip":
        raw = bytearray(blob)
        for _ in range(draw(st.integers(1, 8))):
            at = draw(st.integers(0, len(raw) - 1))
            raw[at] ^= 1 << draw(st.integers(0, 7))
        return bytes(raw)
    assert lora, mutation
    if mutation.startswith("adapter_"):
        return fuzz_files.mutate_adapter(draw, header, data, mutation)
    return _mutate_lora(draw, header, data, mutation)




def _mutate_lora(draw, header, data, mutation):
    tensors = {k: fuzz_files.tensor(header, data, k) for k in fuzz_files.tensor_keys(header)}
    meta = header.get("__metadata__")
    stems = sorted({k.rsplit(".lora_", 1)[0].removesuffix(".alpha") for k in tensors})
    stem = draw(st.sampled_from(stems))
    down = next(k for k in tensors if k.startswith(stem + ".lora_") and k.endswith(("down.weight", "A.weight")))
    up = next(k for k in tensors if k.startswith(stem + ".lora_") and k.endswith(("up.weight", "B.weight")))
    if mutation == "alpha":
        value = draw(st.sampled_from([torch.ones(2), torch.ones(1, 1), torch.tensor(-1.0), torch.tensor(0.0),
                                      torch.tensor(float("nan")), torch.zeros(0), torch.tensor(3, dtype=torch.int64),
                                      torch.tensor(True)]))  # fmt: skip
        tensors[stem + ".alpha"] = value
    elif mutation == "rank_mismatch":
        which = draw(st.sampled_from([up, down]))
        t = tensors[which]
        tensors[which] = t[:, :1] if which == up else t[:1]
    elif mutation == "zero_rank":
        tensors[up], tensors[down] = tensors[up][:, :0], tensors[down][:0]
    elif mutation == "factor_dtype":
        which = draw(st.sampled_from([up, down]))
        tensors[which] = tensors[which].to(draw(st.sampled_from([torch.int8, torch.int64, torch.bool, torch.uint8])))
    elif mutation == "missing_partner":
        del tensors[draw(st.sampled_from([up, down]))]
    else:  # two_names: the same module twice, under another factor suffix or another spelling
        kind = draw(st.sampled_from(["suffix", "spelling"]))
        if kind == "suffix":
            other = {".lora_down.weight": ".lora_A.weight", ".lora_A.weight": ".lora_down.weight"}
            suffix = down[len(stem) :]
            tensors[stem + other[suffix]] = tensors[down].clone()
        else:
            prefix_len = len(stem) - len(stem.split("_", 2)[-1]) if "." not in stem else stem.index(".") + 1
            body = stem[prefix_len:]
            alt = body.replace("_", ".", 1) if "_" in body else body.replace(".", "_", 1)
            for k in [k for k in tensors if k.startswith(stem + ".")]:
                tensors[stem[:prefix_len] + alt + k[len(stem) :]] = tensors[k].clone()
    return fuzz_files.st_bytes(tensors, meta if isinstance(meta, dict) else {})




def mutate_json(draw, text: bytes, mutation: str) -> bytes:
    doc = json.loads(text)
    if mutation == "truncate":
        return text[: draw(st.integers(0, len(text) - 1))]
    if mutation == "json_garbage":
        return draw(st.binary(max_size=64))
    if mutation == "json_unicode":
        return draw(st.sampled_from([b"\xff" + text, text.replace(b'"', b'"\xc3\x28', 1), "{\"\u00e9\u4e2d\": 1}".encode()]))
    if mutation == "deep_nesting":
        depth = draw(st.sampled_from([100, 1000, 100_000]))
        return b'{"x": ' + b"[" * depth + b"]" * depth + b"}"
    if mutation == "duplicate_keys":
        first = next(iter(doc))
        return text[:-1] + b", " + json.dumps(first).encode() + b": " + json.dumps(draw(_json_values)).encode() + b"}"
    if mutation == "json_types":
        field = draw(st.sampled_from(list(doc) + ["weight_map", "alpha_pattern", "lora_alpha", "use_rslora", "use_dora"]))
        doc[field] = draw(_json_values)
        if "weight_map" in doc and isinstance(doc["weight_map"], dict) and draw(st.booleans()):
            k = next(iter(doc["weight_map"]), "x")
            doc["weight_map"][k] = draw(st.sampled_from(["../../etc/passwd", "/etc/hostname", "missing.safetensors",
                                                         "", ".", 3, None, ["a"]]))  # fmt: skip
        return json.dumps(doc).encode()
    raw = bytearray(text)  # bitflip
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(raw) - 1))
        raw[at] ^= 1 << draw(st.integers(0, 7))
    return bytes(raw)


_json_values = st.sampled_from([None, 0, -1, 1.5, float("inf"), "x", "1e400", [], [1, "a"], {}, {"a": "b"}, {"a": []},
                                True, 10**30])  # fmt: skip


def mutate_pt(draw, blob: bytes, mutation: str) -> bytes:
    raw = bytearray(blob)
    if mutation == "truncate":
        return bytes(raw[: draw(st.integers(0, len(raw) - 1))])
    if mutation == "bitflip":
        for _ in range(draw(st.integers(1, 8))):
            at = draw(st.integers(0, len(raw) - 1))
            raw[at] ^= 1 << draw(st.integers(0, 7))
        return bytes(raw)
    at = draw(st.integers(0, len(raw) - 1))
    junk = draw(st.binary(min_size=1, max_size=64))
    raw[at : at + len(junk)] = junk
    return bytes(raw)


# ---------------------------------------------------------------- running one case


def _write(path, blob):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(blob)


def make_case(draw, seeds, reader: str, mutation: str, folder: str):
    """Write the mutated input of ``reader`` under ``folder``; returns (path to hand to the
    reader, total input bytes)."""
    if reader.startswith(("lora-", "adapter-")):
        path = os.path.join(folder, "lora.safetensors")
        _write(path, mutate_safetensors(draw, seeds[reader], mutation, lora=True))
    elif reader == "adapter_config":
        weights, cfg = seeds[reader]
        path = os.path.join(folder, "adapter_model.safetensors")
        _write(path, weights)
        _write(os.path.join(folder, "adapter_config.json"), mutate_json(draw, cfg, mutation))
    elif reader == "base-single":
        path = os.path.join(folder, "model.safetensors")
        _write(path, mutate_safetensors(draw, seeds[reader], mutation, lora=False))
    elif reader == "base-diffusers":
        path = folder
        _write(os.path.join(folder, "transformer", "diffusion_pytorch_model.safetensors"),
               mutate_safetensors(draw, seeds[reader], mutation, lora=False))  # fmt: skip
    elif reader == "base-sharded":
        shards, index = seeds[reader]
        path = os.path.join(folder, "model.safetensors.index.json")
        target = draw(st.sampled_from(["index", *sorted(shards)]))
        for name, blob in shards.items():
            if name == target:
                blob = mutate_safetensors(draw, fuzz_files.parse(blob), draw(st.sampled_from(ST_MUTATIONS)), lora=False)
            _write(os.path.join(folder, name), blob)
        _write(path, mutate_json(draw, index, mutation) if target == "index" else index)
    elif reader == "base-pt":
        path = os.path.join(folder, "model.pt")
        _write(path, mutate_pt(draw, seeds[reader], mutation))
    else:  # cache
        parsed, key, _ = seeds[reader]
        path = os.path.join(folder, "cache")
        entry = SubspaceCache(path).path(key)
        _write(entry, mutate_safetensors(draw, parsed, mutation, lora=False))
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs)
    return path, size


def exercise(reader: str, path: str, seeds, out: str, written: list | None = None) -> None:
    """What the CLI and the pipeline do with such a file; raises what they would raise. The names
    of the outputs written in ``out``'s folder are appended to ``written``, each once complete."""
    written = [] if written is None else written
    if reader.startswith("adapter-"):
        lf = formats.read_lora(path, base_names=seeds["base_names"]["hunyuan-video"])
        for m in lf.modules:
            if not adapters.magnitude_axis(m):
                adapters.factors(m)  # the exact factors convert, resize and merge take
        formats.write_lora(lf, out)
        written.append(os.path.basename(out))
        folder = os.path.dirname(out)
        base = seeds["adapter_base"]
        convert(path, os.path.join(folder, "c.safetensors"), rank=2, base=base, quiet=True)
        written.append("c.safetensors")
        resize(path, os.path.join(folder, "r.safetensors"), rank=1, base=base, quiet=True)
        written.append("r.safetensors")
    elif reader.startswith("lora-") or reader == "adapter_config":
        arch = LORA_FORMATS.get(reader.removeprefix("lora-"), "flux")
        lf = formats.read_lora(path, base_names=seeds["base_names"][arch])  # as `port` reads it
        for m in lf.modules:
            m.factors()
        formats.write_lora(lf, out)
        written.append(os.path.basename(out))
    elif reader == "cache":
        _, key, (m, n, k) = seeds["cache"]
        got = SubspaceCache(path).get(key, m, n, k)
        assert got is None or [list(t.shape) for t in got] == [[m, k], [k], [n, k], []]
    else:
        base = BaseModel(path)
        base.fingerprint()
        for comp in base.components():
            for name in base.names(comp):
                shape, dtype = base.shape(comp, name), base.dtype(comp, name)
                t = base.read(comp, name)
                assert tuple(t.shape) == tuple(shape), (name, t.shape, shape)
                if len(shape) >= 1 and shape[0] > 0:
                    into = torch.empty(shape, dtype=dtype)
                    base.read_into(comp, name, into)


def _alarm(signum, frame):
    raise CaseTimeout(f"over {CASE_SECONDS} s")


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def readers() -> dict[str, tuple[str, ...]]:
    out = {f"lora-{f}": ST_MUTATIONS + LORA_MUTATIONS for f in LORA_FORMATS}
    out.update({reader: ST_MUTATIONS + ADAPTER_MUTATIONS for reader in ADAPTER_SEEDS})
    out["adapter_config"] = JSON_MUTATIONS
    out.update({"base-single": ST_MUTATIONS, "base-diffusers": ST_MUTATIONS, "base-sharded": JSON_MUTATIONS,
                "base-pt": PT_MUTATIONS, "cache": ST_MUTATIONS})  # fmt: skip
    return out


def run(cases: int, seed_value: int, cli_cases: int = 0, quiet: bool = False, only=()) -> dict:
    """Run ``cases`` fuzz cases (over the readers whose name starts with one of ``only``, default
    all); returns {"counts", "failures", "seconds", "cli": (...)}."""
    scratch_root = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    root = tempfile.mkdtemp(prefix="loraport-fuzz-", dir=scratch_root)
    counts: Counter = Counter()
    outcomes: Counter = Counter()
    failures: list = []
    cli_inputs: list = []
    table = {r: m for r, m in readers().items() if not only or r.startswith(tuple(only))}
    pick = random.Random(seed_value)
    t0 = time.perf_counter()
    warnings.simplefilter("ignore")
    old_handler = signal.signal(signal.SIGALRM, _alarm)
    try:
        seeds = _seeds(root)
        failures += _check_seeds(seeds, root)
        outcomes["failure"] += len(failures)
        number = [0]

        @settings(max_examples=cases, database=None, deadline=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        @seed(seed_value)
        @given(st.data())
        def one(data):
            reader = data.draw(st.sampled_from(sorted(table)))
            mutation = data.draw(st.sampled_from(table[reader]))
            number[0] += 1
            folder = os.path.join(root, f"case{number[0]}")
            os.makedirs(folder)
            try:
                # hypothesis may abandon a case inside a draw (BaseException); it is not counted
                path, size = make_case(data.draw, seeds, reader, mutation, folder)
            except BaseException:
                shutil.rmtree(folder, ignore_errors=True)
                raise
            counts[(reader, mutation)] += 1
            if not quiet and sum(counts.values()) % 1000 == 0:
                print(f"  {sum(counts.values())} cases, {len(failures)} failures, "
                      f"{time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)  # fmt: skip
            problem = None
            try:
                out = os.path.join(folder, "out", "o.safetensors")
                os.makedirs(os.path.dirname(out))
                rss = _peak_rss()
                written: list = []
                signal.alarm(CASE_SECONDS)
                try:
                    exercise(reader, path, seeds, out, written)
                    outcomes["ok"] += 1
                except InputError as e:
                    outcomes["input error"] += 1
                    if "\n" in str(e) or not str(e).strip():
                        problem = f"InputError message is not one line: {str(e)!r}"
                finally:
                    signal.alarm(0)
                grew = _peak_rss() - rss
                if problem is None and grew > 2 * size + RSS_SLACK:
                    problem = f"peak RSS grew by {grew >> 20} MiB for a {size} B input"
                left = sorted(os.listdir(os.path.dirname(out)))
                if problem is None and left != sorted(written):  # a failed write leaves nothing
                    problem = f"left in the output folder: {left}, written {written}"
                cli_readers = ("base-single", "lora-kohya", "cache", "base-pt", *ADAPTER_SEEDS)
                if problem is None and reader in cli_readers and len(cli_inputs) < cli_cases and pick.random() < 0.05:
                    keep = os.path.join(root, f"cli{len(cli_inputs)}")
                    src = path if reader != "cache" else SubspaceCache(path).path(seeds["cache"][1])
                    shutil.copy(src, keep + os.path.splitext(src)[1])
                    cli_inputs.append((reader, mutation, keep + os.path.splitext(src)[1]))
            except CaseTimeout as e:
                problem = f"hang: {e}"
            except Exception as e:  # noqa: BLE001  (any other exception is the finding)
                problem = f"{type(e).__name__}: {e}"[:300] + "\n" + traceback.format_exc(limit=-4)
            if problem is not None:
                outcomes["failure"] += 1
                failures.append((reader, mutation, problem))
            shutil.rmtree(folder, ignore_errors=True)

        one()
        in_process = time.perf_counter() - t0
        cli = fuzz_files.run_cli(cli_inputs, seeds["adapter_base"])
    finally:
        signal.signal(signal.SIGALRM, old_handler)
        shutil.rmtree(root, ignore_errors=True)
    return dict(counts=counts, outcomes=outcomes, failures=failures, seconds=in_process, cli=cli,
                total=time.perf_counter() - t0)  # fmt: skip




def report(result: dict) -> str:
    per_reader: dict = defaultdict(Counter)
    fails = Counter((r, m) for r, m, _ in result["failures"])
    lines = [f"{'reader':<16} {'mutation':<16} {'cases':>6} {'failures':>8}"]
    for (reader, mutation), n in sorted(result["counts"].items()):
        lines.append(f"{reader:<16} {mutation:<16} {n:>6} {fails[(reader, mutation)]:>8}")
        per_reader[reader]["cases"] += n
        per_reader[reader]["failures"] += fails[(reader, mutation)]
    lines.append("")
    for reader, c in sorted(per_reader.items()):
        lines.append(f"{reader:<16} {'(all)':<16} {c['cases']:>6} {c['failures']:>8}")
    total = sum(result["counts"].values())
    o = result["outcomes"]
    lines.append(f"in process: {total} cases ({o['ok']} read fine, {o['input error']} one-line input errors), "
                 f"{len(result['failures'])} failures, {result['seconds']:.1f} s ({total / max(result['seconds'], 1e-9):.0f} cases/s)")  # fmt: skip
    cli = result["cli"]
    lines.append(f"CLI subprocesses (python -m loraport inspect / convert): {cli['cases']} cases, {len(cli['failures'])} failures, "
                 f"{cli['seconds']:.1f} s (limit per case {cli.get('limit', 0):.0f} s)")  # fmt: skip
    for reader, mutation, problem in (result["failures"] + cli["failures"])[:10]:
        lines.append(f"FAIL {reader} / {mutation}: {problem}")
    return "\n".join(lines)

