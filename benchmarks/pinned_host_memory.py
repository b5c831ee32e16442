"""Host memory of the GPU port's reader, worked out from the chunk plan (no GPU needed): the
quarter-size Hunyuan Video pair of benchmarks.port_stream (5 double + 10 single blocks, bf16,
rank-32 LoRA on Musubi's modules, subspace rank 64) under --max-vram 2GB.

    python -m benchmarks.pinned_host_memory [--blocks-double 5] [--blocks-single 10] [--max-vram 2GB]

Before loraport.staging, each chunk's weights went into a fresh `torch.empty(..., pin_memory=True)`.
torch's caching host allocator (ATen/core/CachingHostAllocator.h) rounds every pinned request
up to a power of two and keeps each freed block, per rounded size, for the life of the process;
the reader holds two chunks at a time (the one computed, the one read). Replaying that rule on
the chunks `pipeline.plan_chunks` cut gives the pinned memory the process ends up holding. Now:
two staging slots of the largest chunk, `pipeline.staging_bytes` within the budget."""

from __future__ import annotations

import argparse
import collections
import math

from loraport import pipeline

from .port_stream import lora_modules, model_shapes


def chunk_bytes(shapes, budget: int, *, staging_bound: bool) -> list[int]:
    """Bytes of stacked bf16 weights per chunk, in the order the pipeline reads them, cut as
    `pipeline.plan_chunks` cuts them on a GPU (with or without the staging bound)."""
    groups: dict[tuple, int] = collections.Counter(tuple(shapes[m + ".weight"]) for m in lora_modules(shapes))
    out = []
    for shape, count in groups.items():
        m, n = shape[0], math.prod(shape[1:])
        k = pipeline.default_subspace_rank(m, n)

        def need(layers):
            vram = pipeline.group_bytes(layers, m, n, k=k, oversample=8, power_iters=2, method="power", elem=2,
                                        lora_rank=32, device="cuda")  # fmt: skip
            return max(vram, pipeline.staging_bytes(layers, m, n, elem=2)) if staging_bound else vram

        size = 1
        while size < count and need(size + 1) <= budget:
            size += 1
        out += [min(size, count - i) * 2 * m * n * 2 for i in range(0, count, size)]
    return out


def caching_allocator_bytes(chunks: list[int]) -> int:
    """Pinned bytes torch's caching host allocator holds after serving one request per chunk,
    two chunks alive at a time: a request takes a cached block of its rounded size, else a new one."""
    free, alive, held = collections.Counter(), [], 0
    for nbytes in chunks:
        size = 1 << (nbytes - 1).bit_length()
        if len(alive) > 1:  # the chunk two back was dropped when the previous one arrived
            free[alive.pop(0)] += 1
        if free[size]:
            free[size] -= 1
        else:
            held += size
        alive.append(size)
    return held


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks-double", type=int, default=5)
    p.add_argument("--blocks-single", type=int, default=10)
    p.add_argument("--max-vram", default="2GB")
    args = p.parse_args()
    shapes = model_shapes(args.blocks_double, args.blocks_single)
    budget = pipeline.parse_bytes(args.max_vram)
    before = chunk_bytes(shapes, budget, staging_bound=False)
    now = chunk_bytes(shapes, budget, staging_bound=True)
    print(f"before: {len(before)} chunks of {[round(b / 1e9, 2) for b in before]} GB; pinned blocks held "
          f"by torch's caching host allocator: {caching_allocator_bytes(before) / 1e9:.2f} GB")
    print(f"now: {len(now)} chunks, two staging slots of the largest: {2 * max(now) / 1e9:.2f} GB "
          f"(budget {budget / 1e9:.2f} GB)")


if __name__ == "__main__":
    main()
