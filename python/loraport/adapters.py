"""Adapter types besides plain LoRA: LoHa, LoKr, LoCon with a Tucker mid factor, full weight
differences and DoRA magnitudes, in the kohya/LyCORIS, ComfyUI and PEFT/diffusers namings. They
are read into `AdapterModule`s (beside formats.LoraModule in a formats.LoraFile), written back
in their own type, renamed and padded exactly where the type allows, and turned into exact
low-rank factors for `convert` (loraport/convert.py).

ΔW per type (scale = alpha / r, 1 without an alpha; conv weights flattened to [out, in·kernel]):
  * LoCon with Tucker (`lora_mid`; LyCORIS locon, `tucker_weight_from_conv` in
    lycoris/functional/general.py): up [out, r, 1..], mid [r, r, *kernel], down [r, in, 1..]:
    ΔW[o, i, k] = scale · Σ_ab up[o, a] mid[a, b, k] down[b, i]. As factors: up @ D with
    D[a, (i, k)] = Σ_b mid[a, b, k] down[b, i]: exact, rank r.
  * LoHa (lycoris/functional/loha.py; PEFT's LoHa uses the same shapes):
    ΔW = scale · (w1_a @ w1_b) ⊙ (w2_a @ w2_b), w?_a [out, r], w?_b [r, in·kernel], r = w1_b's rows.
    With Tucker (hada_t1/t2 [r, r, *kernel], w?_a [r, out], w?_b [r, in]): each product is
    Σ_ij t[i, j, k] w_b[j, c] w_a[i, o]. A Hadamard product of two rank-r products has rank <=
    r1·r2 with exact factors (face-splitting product): (A1 B1) ⊙ (A2 B2) = (A1 • A2)(B1 ∗ B2),
    A1 • A2 [out, r1·r2] the row-wise and B1 ∗ B2 [r1·r2, n] the column-wise Kronecker product.
  * LoKr (lycoris/functional/lokr.py `diff_weight`/`make_kron`): ΔW = scale · w1 ⊗ w2 with
    w1 = lokr_w1 or lokr_w1_a @ lokr_w1_b [a, b], w2 = lokr_w2 [c, d, *kernel], lokr_w2_a @ lokr_w2_b,
    or with Tucker lokr_t2 [r, r, *kernel]: w2[p, q, k] = Σ_ij t2[i, j, k] w2_a[i, p] w2_b[j, q];
    out = a·c, in = b·d. Flattened, w1 ⊗ w2 = kron(w1, w2 [c, d·kernel]). Scale: alpha / r with r
    the rows of lokr_w2_b (else lokr_w1_b); 1 when both factors are full (LyCORIS, ComfyUI and
    diffusers' `_bake_lokr_alpha_` agree). Its SVD comes from the factors' SVDs (convert.py).
  * Full difference (`diff` [out, in, *kernel], optional bias `diff_b`): ΔW = diff, no scale.
  * DoRA (arXiv 2402.09353; PEFT `lora_magnitude_vector`, LyCORIS/kohya `dora_scale`) on any of the
    above: W' = m ⊙ (W + ΔW) / ‖W + ΔW‖ with the norm per output row (PEFT: norm over dim 1, and
    LyCORIS `wd_on_output`: dora_scale [out, 1..]) or per input channel (LyCORIS without
    wd_on_output: dora_scale [1, in, 1..], norm over the output and kernel dims). The effective
    update W' − W depends on the base weight W, so DoRA is never a plain low-rank ΔW."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from .errors import InputError
from .reports import Action

# key suffix -> role, per naming family; "kohya" also covers ComfyUI and Tencent keys.
_KOHYA = {
    ".lora_up.weight": "up",
    ".lora_down.weight": "down",
    ".lora_mid.weight": "mid",
    ".dora_scale": "magnitude",
    ".diff": "diff",
    ".diff_b": "diff_b",
    ".alpha": "alpha",
}
_PEFT = {
    ".lora_B.weight": "up",
    ".lora_A.weight": "down",
    ".lora_magnitude_vector": "magnitude",
    ".alpha": "alpha",
}
_STRUCTURED = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
               "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")  # fmt: skip
for _role in _STRUCTURED:  # LyCORIS and PEFT name these alike
    _KOHYA["." + _role] = _PEFT["." + _role] = _role
_COMFY = {**_KOHYA, ".lora_B.weight": "up", ".lora_A.weight": "down"}  # ComfyUI keys take both; writes A/B
# a key ending in one of these makes a file an adapter file (the other suffixes are plain LoRA's)
ADAPTER_SUFFIXES = tuple(sorted({k for k, role in {**_KOHYA, **_PEFT}.items() if role not in ("up", "down", "alpha")}))


def is_adapter_file(keys) -> bool:
    """True when some key is of a LoHa, LoKr, Tucker LoCon, DoRA or full-difference module."""
    return any(key.endswith(ADAPTER_SUFFIXES) for key in keys)


def suffixes(fmt: str) -> dict[str, str]:
    """Key suffix -> role in format ``fmt``'s naming."""
    return _PEFT if fmt in ("diffusers", "peft") else _COMFY if fmt == "comfy" else _KOHYA


@dataclass
class AdapterModule:
    """One adapted layer of a type other than plain LoRA (see the module docstring)."""

    component: str
    name: str  # dotted module name in the file's naming style; the raw stem when not `known`
    kind: str  # "locon" (up/down with lora_mid, or with a DoRA magnitude) | "loha" | "lokr" | "full"
    tensors: dict[str, torch.Tensor]  # role -> tensor as stored (roles: see _KOHYA/_PEFT); magnitude flat
    alpha: float | None
    key: str  # key stem in the file
    known: bool = True
    magnitude_axis: str | None = None  # DoRA: "out" (per output row) or "in" (per input channel)
    flat_kernel: bool = False  # LoHa without Tucker: w?_b hold in·kernel columns
    magnitude_ndim: int = 1  # DoRA: dims of the magnitude as stored (LyCORIS: the weight's)

    @property
    def type_name(self) -> str:
        what = {"locon": "LoCon", "loha": "LoHa", "lokr": "LoKr", "full": "full difference"}[self.kind]
        if {"mid", "hada_t1", "lokr_t2"} & self.tensors.keys():
            what += " (Tucker)"
        return ("DoRA " + what) if self.magnitude_axis else what

    @property
    def rank(self) -> int:
        """The rank the file was trained at (LoKr: of its decomposed factor; 0 when none)."""
        t = self.tensors
        if self.kind == "locon":
            return t["down"].shape[0]
        if self.kind == "loha":
            return t["hada_w1_b"].shape[0]
        if self.kind == "lokr":
            for role in ("lokr_w2_b", "lokr_w1_b"):
                if role in t:
                    return t[role].shape[0]
        return 0

    @property
    def scale(self) -> float:
        if self.kind == "full" or self.alpha is None or self.rank == 0:
            return 1.0
        return self.alpha / self.rank

    @property
    def shape(self) -> tuple[int, ...]:
        """(out, in, *kernel) of the adapted weight; LoHa without Tucker knows only (out, in·kernel)."""
        t = self.tensors
        if self.kind == "locon":
            kernel = t["mid"].shape[2:] if "mid" in t else t["down"].shape[2:]
            return (t["up"].shape[0], t["down"].shape[1], *kernel)
        if self.kind == "loha":
            if "hada_t1" in t:
                return (t["hada_w1_a"].shape[1], t["hada_w1_b"].shape[1], *t["hada_t1"].shape[2:])
            return (t["hada_w1_a"].shape[0], t["hada_w1_b"].shape[1])
        if self.kind == "lokr":
            (a, b), w2 = lokr_w1(t).shape, _lokr_w2_shape(t)
            return (a * w2[0], b * w2[1], *w2[2:])
        return tuple(t["diff"].shape)

    def fits(self, weight_shape) -> bool:
        """Whether this module adapts a weight of ``weight_shape`` [out, in, *kernel]."""
        if self.flat_kernel:
            return (weight_shape[0], math.prod(weight_shape[1:])) == self.shape
        return tuple(weight_shape) == self.shape


def lokr_w1(t) -> torch.Tensor:
    return t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]  # [a, b]


def _lokr_w2_shape(t) -> tuple[int, ...]:
    if "lokr_w2" in t:
        return tuple(t["lokr_w2"].shape)
    if "lokr_t2" in t:
        return (t["lokr_w2_a"].shape[1], t["lokr_w2_b"].shape[1], *t["lokr_t2"].shape[2:])
    return (t["lokr_w2_a"].shape[0], *t["lokr_w2_b"].shape[1:])


def _kind(roles, label: str, stem: str) -> str:
    if any(r.startswith("hada_") for r in roles):
        kind, need = "loha", {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}
        if ("hada_t1" in roles) != ("hada_t2" in roles):
            raise InputError(f"{label}: LoHa module '{stem}' has only one of hada_t1 / hada_t2")
    elif any(r.startswith("lokr_") for r in roles):
        kind, need = "lokr", set()
        if not ({"lokr_w1"} <= roles or {"lokr_w1_a", "lokr_w1_b"} <= roles):
            raise InputError(f"{label}: LoKr module '{stem}' has neither lokr_w1 nor lokr_w1_a and lokr_w1_b")
        if not ({"lokr_w2"} <= roles or {"lokr_w2_a", "lokr_w2_b"} <= roles):
            raise InputError(f"{label}: LoKr module '{stem}' has neither lokr_w2 nor lokr_w2_a and lokr_w2_b")
    elif "diff" in roles:
        kind, need = "full", set()
    elif "up" in roles or "down" in roles:
        kind, need = "locon", {"up", "down"}
    else:
        raise InputError(f"{label}: module '{stem}' has only {sorted(roles)}, no weight update")
    missing = need - roles
    if missing:
        raise InputError(f"{label}: {kind} module '{stem}' has no {', '.join(sorted(missing))}")
    return kind


def make_module(component, name, stem, known, parts: dict[str, tuple[str, torch.Tensor]], alpha, fmt, label):
    """An AdapterModule from one module's tensors (role -> (key, tensor)), shapes checked."""
    roles = set(parts) - {"alpha"}
    kind = _kind(roles, label, stem)
    for role, (key, t) in parts.items():
        least = 0 if role == "alpha" else 1 if role in ("magnitude", "diff_b") else 2  # dims: a vector, a matrix
        if role != "alpha" and not t.is_floating_point():
            raise InputError(f"{label}: tensor '{key}' must be floating point, got {t.dtype}")
        if t.dim() < least or (role != "alpha" and t.numel() == 0):
            raise InputError(f"{label}: tensor '{key}' is {list(t.shape)}: "
                             + ("empty" if t.dim() >= least else f"needs at least {least} dimensions"))  # fmt: skip
    tensors = {role: t for role, (_, t) in parts.items() if role != "alpha"}
    m = AdapterModule(component, name, kind, tensors, alpha, stem, known)
    m.flat_kernel = kind == "loha" and "hada_t1" not in tensors
    try:
        shape = _check_shapes(m)
    except (RuntimeError, IndexError, ValueError) as e:  # a product or shape check of the factors failed
        shown = ", ".join(f"{r} {list(t.shape)}" for r, t in tensors.items())
        raise InputError(
            f"{label}: {m.type_name} module '{stem}': factors do not fit together ({shown}): {e}"
        ) from None
    if "magnitude" in tensors:
        mag = tensors["magnitude"]
        out, channels = shape[0], shape[1]
        if fmt in ("diffusers", "peft") or (mag.shape[0] == out and mag.numel() == out):
            m.magnitude_axis = "out"  # PEFT's magnitude is always per output row
        elif mag.dim() >= 2 and mag.shape[0] == 1 and mag.numel() == channels and not m.flat_kernel:
            m.magnitude_axis = "in"
        if m.magnitude_axis is None or mag.numel() != (out if m.magnitude_axis == "out" else channels):
            raise InputError(
                f"{label}: DoRA magnitude of '{stem}' is {list(mag.shape)}, neither one per output row "
                f"({out}) nor one per input channel of the weight {list(shape)}"
            )
        m.magnitude_ndim = mag.dim()
        tensors["magnitude"] = mag.reshape(-1)  # kept flat; `tensors_for` restores each format's shape
    return m


def _check_shapes(m: AdapterModule) -> tuple[int, ...]:
    """The module's weight shape after checking that its factors multiply (raises otherwise)."""
    t = m.tensors
    if m.kind == "locon":
        up, down = t["up"], t["down"]
        if up.shape[1] != down.shape[0] or any(d != 1 for d in up.shape[2:]):
            raise ValueError("up [out, r, 1..] and down [r, in, ..] do not match")
        if "mid" in t and (t["mid"].shape[:2] != (up.shape[1], down.shape[0]) or any(d != 1 for d in down.shape[2:])):
            raise ValueError("mid must be [r, r, *kernel] with down [r, in, 1..]")
    elif m.kind == "loha":
        for i in (1, 2):
            a, b = t[f"hada_w{i}_a"], t[f"hada_w{i}_b"]
            if f"hada_t{i}" in t:
                if t[f"hada_t{i}"].shape[:2] != (a.shape[0], b.shape[0]):
                    raise ValueError(f"hada_t{i} must be [r, r, *kernel]")
            elif a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
                raise ValueError(f"hada_w{i}_a [out, r] and hada_w{i}_b [r, in·kernel] do not match")
        if _loha_shape(t, 1) != _loha_shape(t, 2):
            raise ValueError("the two Hadamard factors differ in shape")
    elif m.kind == "lokr":
        if lokr_w1(t).dim() != 2:
            raise ValueError("lokr_w1 must be 2-d")
        if lokr_w2_flat(t).dim() != 2:  # a factor with an extra dim broadcasts in the products
            raise ValueError("lokr_w2 must be [c, d, *kernel]")
    elif "diff_b" in t and tuple(t["diff_b"].shape) != tuple(t["diff"].shape[:1]):
        raise ValueError("diff_b must hold one bias per output row of diff")
    return m.shape


def _loha_shape(t, i: int) -> tuple[int, int]:
    """(out, in·kernel) of the i-th Hadamard factor, from its factors (never the dense product)."""
    a, b = low_rank_pair(t, i)
    if a.dim() != 2 or b.dim() != 2:  # a factor with an extra dim broadcasts in the products
        raise ValueError(f"hada_w{i}_a and hada_w{i}_b must be 2-d")
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"hada_w{i}_a and hada_t{i} disagree on the rank")
    return a.shape[0], b.shape[1]


def low_rank_pair(t, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LoHa's i-th product as factors (A [out, r], B [r, in·kernel]), exact (Tucker folded into B)."""
    a, b = t[f"hada_w{i}_a"], t[f"hada_w{i}_b"]
    if f"hada_t{i}" not in t:
        return a, b.flatten(1)
    core = t[f"hada_t{i}"]  # [r, r, *kernel]
    # Σ_ij t[i, j, k] w_b[j, c] w_a[i, o]: A = w_aᵀ [out, r], B[i, (c, k)] = Σ_j t[i, j, k] w_b[j, c]
    B = torch.einsum("ij...,jc->ic...", core, b).flatten(1)
    return a.mT, B


def lokr_w2_flat(t) -> torch.Tensor:
    """LoKr's w2 as [c, d·kernel]."""
    if "lokr_w2" in t:
        return t["lokr_w2"].flatten(1)
    a, b = t["lokr_w2_a"], t["lokr_w2_b"]
    if "lokr_t2" in t:  # w2[p, q, k] = Σ_ij t2[i, j, k] w2_a[i, p] w2_b[j, q]
        return torch.einsum("ij...,ip,jq->pq...", t["lokr_t2"], a, b).flatten(1)
    return a @ b.flatten(1)


def factors(m) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact low-rank factors (up [out, p], down [p, in·kernel], float32, scale folded into up) of
    ΔW for every type but DoRA: LoCon p = r, LoHa p = r1·r2, LoKr p = rank(w1)·rank(w2) (from the
    factors' SVDs), full difference: its SVD (p = min(out, in·kernel)); a plain
    formats.LoraModule's own factors."""
    if not isinstance(m, AdapterModule):
        return m.factors()
    if m.magnitude_axis:
        raise InputError(f"'{m.key}': DoRA's update depends on the base weight; it has no fixed low-rank factors")
    t = {r: v.double() for r, v in m.tensors.items()}
    if m.kind == "locon":
        up = t["up"].flatten(1)
        down = t["down"] if "mid" not in t else torch.einsum("ab...,bi->ai...", t["mid"], t["down"].flatten(1))
        up, down = up, down.flatten(1)
    elif m.kind == "loha":
        (a1, b1), (a2, b2) = low_rank_pair(t, 1), low_rank_pair(t, 2)
        up = (a1[:, :, None] * a2[:, None, :]).flatten(1)  # [out, r1·r2] row-wise Kronecker
        down = (b1[:, None, :] * b2[None, :, :]).flatten(0, 1)  # [r1·r2, n] column-wise Kronecker
    elif m.kind == "lokr":
        U, S, V = kron_svd(lokr_w1(t), lokr_w2_flat(t))
        keep = S > S[0] * max(U.shape[0], V.shape[0]) * torch.finfo(torch.float64).eps if S.numel() else S > 0
        root = S[keep].sqrt()
        up, down = U[:, keep] * root, root[:, None] * V[:, keep].mT
    else:
        U, S, Vh = torch.linalg.svd(t["diff"].flatten(1), full_matrices=False)
        root = S.sqrt()
        up, down = U * root, root[:, None] * Vh
    return (up * m.scale).float(), down.float()


def kron_svd(w1: torch.Tensor, w2: torch.Tensor, k: int | None = None):
    """Top-k SVD of kron(w1 [a, b], w2 [c, n]) from the factors' SVDs (k None: all of them): the
    singular values of a Kronecker product are the products s1_i·s2_j with singular vectors
    u1_i ⊗ u2_j and v1_i ⊗ v2_j. Returns U [a·c, k], S [k] descending, V [b·n, k], float64."""
    U1, S1, V1h = torch.linalg.svd(w1.double(), full_matrices=False)
    U2, S2, V2h = torch.linalg.svd(w2.double(), full_matrices=False)
    S = torch.outer(S1, S2).flatten()  # index i·len(S2) + j
    k = S.numel() if k is None else min(k, S.numel())
    S, order = torch.sort(S, descending=True)
    S, order = S[:k], order[:k]
    i, j = order // S2.numel(), order % S2.numel()
    U = (U1[:, i][:, None, :] * U2[:, j][None, :, :]).flatten(0, 1)  # [a·c, k]
    V = (V1h[i].mT[:, None, :] * V2h[j].mT[None, :, :]).flatten(0, 1)  # [b·n, k]
    return U, S, V


# --- renaming rows, padding input channels --------------------------------------------------


def select_rows(m: AdapterModule, rows: torch.Tensor, why: str) -> AdapterModule:
    """The module whose ΔW (and DoRA magnitude) is ΔW[rows] (``rows``: indices of output rows), by
    indexing the output-facing factors; InputError where the type cannot express it (``why``:
    what was asked; the caller's message names the file and module)."""
    if rows.numel() == m.shape[0] and bool((rows == torch.arange(m.shape[0])).all()):
        return m
    t = {r: v.clone() for r, v in m.tensors.items()}  # parts must not share memory (safetensors refuses)
    if m.kind == "locon":
        t["up"] = t["up"][rows]
    elif m.kind == "loha":
        for role in ("hada_w1_a", "hada_w2_a"):
            t[role] = t[role][:, rows] if "hada_t1" in t else t[role][rows]
    elif m.kind == "full":
        t["diff"] = t["diff"][rows]
        if "diff_b" in t:
            t["diff_b"] = t["diff_b"][rows]
    else:
        t = _lokr_rows(m, rows, why)
    if m.magnitude_axis == "out":
        t["magnitude"] = t["magnitude"][rows]
    return replace(m, tensors=t)


def _lokr_rows(m: AdapterModule, rows: torch.Tensor, why: str) -> dict:
    """LoKr rows: ΔW row a_i·c + c_i, so a selection is exact when it takes whole blocks of c rows
    (select rows of w1) or when w1 has one row (select rows of w2)."""
    t = {r: v.clone() for r, v in m.tensors.items()}
    a, c = lokr_w1(t).shape[0], _lokr_w2_shape(t)[0]
    blocks = rows.reshape(-1, c) if rows.numel() % c == 0 else None
    whole = blocks is not None and bool((blocks == blocks[:, :1] + torch.arange(c)).all())
    if whole and bool((blocks[:, 0] % c == 0).all()):
        pick = blocks[:, 0] // c
        if "lokr_w1" in t:
            t["lokr_w1"] = t["lokr_w1"][pick]
        else:
            t["lokr_w1_a"] = t["lokr_w1_a"][pick]
        return t
    if a == 1:
        if "lokr_w2" in t:
            t["lokr_w2"] = t["lokr_w2"][rows]
        elif "lokr_t2" in t:
            t["lokr_w2_a"] = t["lokr_w2_a"][:, rows]
        else:
            t["lokr_w2_a"] = t["lokr_w2_a"][rows]
        return t
    raise InputError(
        f"{why} cuts across the Kronecker blocks of this LoKr (w1 {a} rows x w2 {c} rows); "
        "convert it to a plain LoRA first (loraport convert)"
    )


def pad_refusal(m: AdapterModule, source_shape, target_shape) -> str | None:
    """Why the module's input channels cannot be padded exactly from ``source_shape`` to
    ``target_shape`` (dim 1 grows), or None when they can."""
    if m.magnitude_axis == "in":
        return "DoRA magnitude per input channel: the new channels' magnitudes are undefined"
    if m.kind != "lokr":
        return None
    b, d = lokr_w1(m.tensors).shape[1], _lokr_w2_shape(m.tensors)[1]
    if b == 1 or target_shape[1] % d == 0:
        return None
    return (
        f"LoKr input channels are w1's {b} x w2's {d} blocks; {target_shape[1]} channels are neither "
        f"whole blocks of {d} nor one block"
    )


def pad_inputs(m: AdapterModule, source_shape, target_shape) -> AdapterModule:
    """The module with zero input channels appended up to ``target_shape[1]``, so that ΔW's new
    columns are zero: the factor facing the input gets zero columns (LoCon: down; LoHa: both w?_b;
    LoKr: w2's columns when w1 has one column, else whole zero blocks in w1; full: diff)."""
    why = pad_refusal(m, source_shape, target_shape)
    if why is not None:
        raise InputError(f"'{m.key}': cannot pad the input channels exactly: {why}")
    old, new = source_shape[1], target_shape[1]
    kernel = tuple(source_shape[2:])

    def widen(x: torch.Tensor, dim: int, size: int) -> torch.Tensor:
        shape = list(x.shape)
        shape[dim] = size - x.shape[dim]
        return torch.cat([x, x.new_zeros(shape)], dim)

    t = dict(m.tensors)
    if m.kind == "locon":
        t["down"] = widen(t["down"], 1, new)
    elif m.kind == "loha":
        for role in ("hada_w1_b", "hada_w2_b"):
            x = t[role]
            if m.flat_kernel:  # [r, in·kernel]: channels are blocks of prod(kernel) columns
                x = widen(x.reshape(x.shape[0], old, math.prod(kernel)), 1, new).flatten(1)
            else:
                x = widen(x, 1, new)
            t[role] = x
    elif m.kind == "full":
        t["diff"] = widen(t["diff"], 1, new)
    else:
        b, d = lokr_w1(t).shape[1], _lokr_w2_shape(t)[1]
        if b == 1:
            if "lokr_w2" in t:
                t["lokr_w2"] = widen(t["lokr_w2"], 1, new)
            else:
                t["lokr_w2_b"] = widen(t["lokr_w2_b"], 1, new)
        else:
            role = "lokr_w1" if "lokr_w1" in t else "lokr_w1_b"
            t[role] = widen(t[role], 1, new // d)
    return replace(m, tensors=t)


# --- porting (pipeline.port) -------------------------------------------------------------------

# What `port` does with a DoRA magnitude: "keep" it as trained, or "rescale" it by the ratio of the
# target's to the source's weight norms on its axis (a magnitude is trained against ‖W_source‖).
DORA_MAGNITUDE = ("keep", "rescale")


def without_magnitude(m: AdapterModule) -> AdapterModule:
    """A DoRA module's low-rank part alone (its magnitude dropped)."""
    return replace(m, tensors={r: v for r, v in m.tensors.items() if r != "magnitude"}, magnitude_axis=None)


def dtype_of(m) -> torch.dtype:
    """The storage dtype of a module's factors (an AdapterModule's first tensor, a LoRA's up)."""
    return next(iter(m.tensors.values())).dtype if isinstance(m, AdapterModule) else m.up.dtype


def is_adapter(m) -> bool:
    return isinstance(m, AdapterModule)


def magnitude_axis(m) -> str | None:
    """The DoRA magnitude's axis ("out" / "in") of a module, None for everything else."""
    return m.magnitude_axis if isinstance(m, AdapterModule) else None


def axis_norms(weight: torch.Tensor, axis: str) -> torch.Tensor:
    """‖W‖ per output row ("out") or per input channel ("in") of ``weight`` [out, in, *kernel],
    float64 [out] or [in], as DoRA normalizes."""
    W = weight.double()
    if axis == "out":
        return W.flatten(1).norm(dim=1)
    return W.transpose(0, 1).flatten(1).norm(dim=1)


def check_port(lf, modules, fmt: str, variant: str, rank) -> None:
    """InputError before any work when ``modules`` hold adapter types that the port cannot carry:
    a projection variant or an output rank (both make a plain LoRA: convert first), or an output
    format with no form for the type."""
    found = [m for m in modules if is_adapter(m)]
    if not found:
        return
    if variant != "copy" or rank is not None:
        what = f"variant {variant!r}" if variant != "copy" else f"rank {rank}"
        raise InputError(
            f"{lf.label}: {len(found)} modules are LoHa, LoKr, Tucker, DoRA or full differences (e.g. "
            f"'{found[0].key}', {found[0].type_name}); {what} would turn them into a plain LoRA: run "
            "`loraport convert` first, or port with the copy variant"
        )
    for m in found:
        tensors_for(m, m.key, fmt, lf.label)  # raises where fmt has no form for the type


def port_module(plan, norms: dict | None, options) -> AdapterModule:
    """The module carried to the target (plans.Plan ``plan`` already past the gate or copied
    on a dissimilar layer): its factors unchanged, zero input channels where the target's weight
    is wider (`pad_inputs`), and a DoRA magnitude kept or, with options.dora_magnitude ==
    "rescale", multiplied by ‖W_target‖ / ‖W_source‖ on its axis (``norms``: {side: norms})."""
    m, row = plan.module, plan.row
    widened = tuple(plan.tgt_shape) != tuple(plan.src_shape)
    if widened:
        m = pad_inputs(m, plan.src_shape, plan.tgt_shape)
    if m.magnitude_axis and options.dora_magnitude == "rescale":
        src, tgt = norms["source"], norms["target"]
        ratio = torch.where(src > 0, tgt / src.clamp_min(torch.finfo(torch.float64).tiny), torch.ones_like(src))
        mag = m.tensors["magnitude"]
        m = replace(m, tensors={**m.tensors, "magnitude": (mag.double() * ratio).to(mag.dtype)})
    copied = row.similarity < options.min_similarity
    row.action = Action.COPIED if copied else Action.PADDED if widened else Action.PORTED
    row.rank_out, row.rel_change = m.rank, 0.0
    row.note = (row.note + "; " if row.note else "") + m.type_name
    return m


# --- writing -----------------------------------------------------------------------------------


def tensors_for(m: AdapterModule, key: str, fmt: str, label: str) -> dict[str, torch.Tensor]:
    """The module's tensors keyed as format ``fmt`` under the key stem ``key``. kohya, Tencent and
    ComfyUI keep the alpha; PEFT/diffusers have none, so the scale is folded into the first factor
    (LoCon: up; LoHa: hada_w1_a; LoKr: lokr_w1 or lokr_w1_a). PEFT has no Tucker LoCon, full
    difference or per-input-channel DoRA; those are refused there."""
    peft = fmt in ("diffusers", "peft")
    t = dict(m.tensors)
    if peft:
        if "mid" in t or m.kind == "full" or m.magnitude_axis == "in":
            raise InputError(f"{label}: module '{m.key}' ({m.type_name}) has no {fmt} form; write it as kohya or comfy")
        if m.scale != 1.0:
            first = {"locon": "up", "loha": "hada_w1_a", "lokr": "lokr_w1" if "lokr_w1" in t else "lokr_w1_a"}[m.kind]
            t[first] = (t[first].double() * m.scale).to(t[first].dtype)
        if "magnitude" in t and m.magnitude_axis == "out":
            out = t["magnitude"].numel()  # PEFT: [out] (linear), [1, out, 1..] (conv)
            kernel = len(m.shape) - 2
            t["magnitude"] = t["magnitude"].reshape(1, out, *[1] * kernel) if kernel else t["magnitude"].reshape(out)
    elif "magnitude" in t:  # LyCORIS: [out, 1..] or [1, in, 1..]
        mag, dims = t["magnitude"], max(m.magnitude_ndim, len(m.shape), 2)
        if m.magnitude_axis == "out":
            t["magnitude"] = mag.reshape(-1, *[1] * (dims - 1))
        else:
            t["magnitude"] = mag.reshape(1, -1, *[1] * (dims - 2))
    names = {role: suffix for suffix, role in suffixes(fmt).items()}
    out = {key + names[role]: v for role, v in t.items()}
    if not peft and m.alpha is not None and m.kind != "full":
        out[key + ".alpha"] = torch.tensor(m.alpha, dtype=torch.float32)
    return out
