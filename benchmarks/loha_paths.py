"""Where `convert` should stop taking a LoHa through its exact factors: both of its paths on the
same LoHa layers, timed per layer, at several widths and LoHa ranks r (structured rank p = r²):
  * "factors": the exact rank-p face-splitting factors and the batched product SVD
    (adapters.factors, toolbox.truncate), what convert did for every LoHa;
  * "dense": the dense ΔW = scale · (A1 B1) ⊙ (A2 B2) and the batched rsvd (convert._dense_layers),
    what convert does where `convert.loha_is_dense` says so (p large against the layer and the rsvd's width).
Both run the real code paths in this process on ``--batch`` same-shape layers at once (as a
convert of a model batches them); time per layer is the best of ``--repeats`` rounds (the two
paths interleaved in each) divided by the batch. The error of each, divided by the optimal rank-k error (float64 SVD of the dense ΔW), is
shown for the first layer. The table gives p / min(m, n) and p / the dense path's rsvd width
(convert.dense_width: its Krylov space, 3 (k + 8) columns where that fits) and which path
`convert` takes.

    python -m benchmarks.loha_paths                          # widths 384 to 3072, minutes
    python -m benchmarks.loha_paths --shapes 768x768 2304x768 --r 8 12 16 --rank 32
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import math
import time

import torch

from loraport import adapters, reference, toolbox
from loraport.options import rank_rule
from loraport.reports import Action, ToolRow

from .rsvd import machine_description, markdown_tee

convert = importlib.import_module("loraport.convert")  # the module (the package exports the function)


class _NoBar:
    def update(self, n=1) -> None:
        pass


def loha(m: int, n: int, r: int, g: torch.Generator) -> adapters.AdapterModule:
    """A LoHa module (bf16, alpha r/2) on a [m, n] weight, factors scaled like trained ones."""
    t = {"hada_w1_a": torch.randn(m, r, generator=g), "hada_w1_b": torch.randn(r, n, generator=g) / n**0.5,
         "hada_w2_a": torch.randn(m, r, generator=g), "hada_w2_b": torch.randn(r, n, generator=g) / n**0.5}  # fmt: skip
    return adapters.AdapterModule("model", "layer", "loha", {k: v.bfloat16() for k, v in t.items()}, r / 2, "layer",
                                  flat_kernel=True)  # fmt: skip


def run_factors(mods, select) -> list:
    items = []
    for m in mods:
        up, down = adapters.factors(m)
        items.append(toolbox.Factors(m, up, down, ToolRow(m.name, Action.CONVERTED)))
    toolbox.truncate(items, select, "cpu", 1 << 40, {}, _NoBar())
    return [it.result for it in items]


def run_dense(mods, select, rank: int) -> list:
    results = [None] * len(mods)
    jobs = [convert._Dense(m, m.shape, functools.partial(convert._loha_delta, m), ToolRow(m.name, Action.CONVERTED), i)
            for i, m in enumerate(mods)]  # fmt: skip
    convert._dense_layers(jobs, results, select, rank, None, "cpu", 1 << 40, {}, _NoBar(), "bench")
    return results


def best_of_pair(f, d, repeats: int) -> tuple[float, float, object, object]:
    """Best times of ``f`` and ``d`` over ``repeats`` rounds, the two interleaved in each round
    (so that a burst of load on a shared machine hits both), after one warm-up; and their results."""
    f(), d()
    best_f = best_d = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        out_f = f()
        t1 = time.perf_counter()
        out_d = d()
        t2 = time.perf_counter()
        best_f, best_d = min(best_f, t1 - t0), min(best_d, t2 - t1)
    return best_f, best_d, out_f, out_d


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="*", default=["384x384", "768x768", "1536x1536", "2304x768", "768x3072"])
    p.add_argument("--r", nargs="*", type=int, default=[8, 10, 12, 14, 16, 20, 24], help="LoHa ranks")
    p.add_argument("--rank", type=int, default=32, help="output rank")
    p.add_argument("--batch", type=int, default=4, help="same-shape layers per batched call")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--markdown", help="also append the table to this file")
    args = p.parse_args(argv)
    select = rank_rule(args.rank, None, None)
    with markdown_tee(args.markdown) as writer:
        writer(f"\n## LoHa convert: exact factors vs dense ΔW + rsvd ({machine_description('cpu')})")
        with contextlib.suppress(OSError):
            writer(f"load average at start: {open('/proc/loadavg').read().split()[:3]}")
        writer(f"\noutput rank {args.rank}, {args.batch} layers per batched call, best of {args.repeats}\n")
        writer("| shape | r | p = r² | p / min(m, n) | p / rsvd width | factors s/layer | dense s/layer | "
               "dense / factors | convert takes | error / optimal: factors, dense |")  # fmt: skip
        writer("|---|---:|---:|---:|---:|---:|---:|---:|---|---:|")
        for shape in args.shapes:
            m, n = (int(x) for x in shape.split("x"))
            for r in args.r:
                g = torch.Generator().manual_seed(r)
                mods = [loha(m, n, r, g) for _ in range(args.batch)]
                t_f, t_d, res_f, res_d = best_of_pair(lambda: run_factors(mods, select),  # noqa: B023
                                                      lambda: run_dense(mods, select, args.rank), args.repeats)  # noqa: B023
                truth = reference.adapter_delta(mods[0].tensors, mods[0].scale, mods[0].shape)  # float64
                optimal = float(reference.optimal_error(truth, args.rank))
                errs = [float(torch.linalg.matrix_norm(truth - res[0].factors()[0].double() @ res[0].factors()[1].double()))
                        for res in (res_f, res_d)]  # fmt: skip
                exact = r * r <= args.rank  # the optimal error is 0: show the relative error instead
                norm = float(torch.linalg.matrix_norm(truth))
                ratio = ", ".join(f"{e / norm:.1e} (rel.)" if exact else f"{e / optimal:.4f}" for e in errs)
                width = convert.dense_width(args.rank, m, n)
                path = "dense" if convert.loha_is_dense(mods[0], args.rank) else "factors"
                writer(f"| {m}x{n} | {r} | {r * r} | {r * r / min(m, n):.3f} | {r * r / width:.2f} | "
                       f"{t_f / args.batch:.4f} | {t_d / args.batch:.4f} | {t_d / t_f:.2f} | {path} | {ratio} |")  # fmt: skip


if __name__ == "__main__":
    main()
