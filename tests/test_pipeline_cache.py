"""The pipeline's subspace cache (a second port of the same model pair decomposes and reads
nothing and gives identical output; the key follows the base files and the rsvd settings; a
corrupt entry is recomputed) and its memory budget (chunk sizes from pipeline.group_bytes, and
the same result under a small budget as under a large one)."""

import os

import pytest
import torch

from loraport import formats, pipeline
from loraport.basemodel import BaseModel
from loraport.errors import InputError
from loraport.options import PortOptions
from loraport.plans import Plan
from loraport.reports import LayerRow
from loraport.testing import tiny

ARCH = "hunyuan-video"
SVD = dict(subspace_rank=6, power_iters=3, quiet=True, variant="target")  # the projection (the default variant copies)
# a few modules of four shapes keep the many ports of these tests fast
MODULES = ["double_blocks.0.img_attn_qkv", "double_blocks.1.txt_attn_qkv", "double_blocks.0.img_mlp.fc1",
           "double_blocks.1.txt_mlp.fc2", "single_blocks.0.linear1", "single_blocks.1.linear1"]  # fmt: skip
N = len(MODULES)


@pytest.fixture(scope="module")
def models():
    source = tiny.base_model(ARCH, width=16, seed=0)
    return {"source": source, "target": tiny.related(source, seed=5)}


@pytest.fixture
def paths(tmp_path, models):
    lora = tiny.lora(ARCH, models["source"], fmt="kohya", rank=4, alpha=3.0, seed=11, modules=MODULES)
    return {
        "lora": tiny.save_base(lora, str(tmp_path / "lora.safetensors")),
        "source": tiny.save_base(models["source"], str(tmp_path / "source.safetensors")),
        "target": tiny.save_base(models["target"], str(tmp_path / "target.safetensors")),
        "cache": str(tmp_path / "cache"),
    }


@pytest.fixture
def decomposed(monkeypatch):
    """Counts the matrices that pipeline.rsvd decomposes."""
    count = [0]
    real = pipeline.rsvd

    def counting(A, *args, **kw):
        count[0] += A.shape[0]
        return real(A, *args, **kw)

    monkeypatch.setattr(pipeline, "rsvd", counting)
    return count


def tensors(path):
    return formats.state_dict(formats.read_lora(path, arch=ARCH))


def test_second_port_comes_from_the_cache_and_is_identical(paths, tmp_path, decomposed):
    for name, opts in (("rank", SVD), ("energy", dict(energy=0.9, **SVD))):  # energy needs ‖W‖_F² too
        outs = [str(tmp_path / f"{name}{i}.safetensors") for i in range(2)]
        cache = os.path.join(paths["cache"], name)
        reps = [pipeline.port(paths["lora"], paths["source"], paths["target"], o, cache_dir=cache, **opts) for o in outs]  # fmt: skip
        first, second = reps
        assert decomposed[0] == 2 * N and first.bytes_read > 0
        assert {r.subspaces_from_cache for r in first.rows} == {0}
        assert {r.subspaces_from_cache for r in second.rows} == {2} and second.bytes_read == 0
        assert second.summary()["layers_from_cache"] == N and second.seconds["cache"] > 0
        a, b = tensors(outs[0]), tensors(outs[1])
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert [r.similarity for r in first.rows] == [r.similarity for r in second.rows]
        assert [r.subspace_rank for r in first.rows] == [r.subspace_rank for r in second.rows]
        decomposed[0] = 0
    a = tensors(outs[0].replace("energy", "rank"))
    assert len(os.listdir(os.path.join(paths["cache"], "rank"))) == 2 * N
    # the same port without cache gives the same output
    plain = str(tmp_path / "plain.safetensors")
    pipeline.port(paths["lora"], paths["source"], paths["target"], plain, **SVD)
    c = tensors(plain)
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_cache_key_follows_base_files_and_settings(paths, models, tmp_path, decomposed):
    out = str(tmp_path / "out.safetensors")
    pipeline.port(paths["lora"], paths["source"], paths["target"], out, cache_dir=paths["cache"], **SVD)
    decomposed[0] = 0
    # a new target file (different weights): its subspaces are recomputed, the source's are not
    tiny.save_base(tiny.related(models["source"], seed=6), paths["target"])
    rep = pipeline.port(paths["lora"], paths["source"], paths["target"], out, cache_dir=paths["cache"], **SVD)
    assert decomposed[0] == N and {r.subspaces_from_cache for r in rep.rows} == {1}
    changes = (dict(power_iters=4), dict(seed=1), dict(method="krylov"), dict(method="krylov", block_size=4),
               dict(subspace_rank=5), dict(oversample=4))  # fmt: skip
    for change in changes:
        decomposed[0] = 0
        opts = {**SVD, **change}
        pipeline.port(paths["lora"], paths["source"], paths["target"], out, cache_dir=paths["cache"], **opts)
        assert decomposed[0] == 2 * N, change
    # in-memory bases have no fingerprint: never cached
    decomposed[0] = 0
    empty = str(tmp_path / "empty")
    pipeline.port(paths["lora"], models["source"], models["target"], out, cache_dir=empty, **SVD)
    assert decomposed[0] == 2 * N and os.listdir(empty) == []


def test_cache_key_without_block_size_is_unchanged():
    """Entries written before the block_size setting existed keep their keys."""
    from loraport.archs import Piece
    from loraport.cache import SubspaceCache

    pieces = [("w.weight", None, Piece("w"))]
    svd = dict(method="krylov", power_iters=3, oversample=8, seed=0)
    plain = SubspaceCache.key("fp", "transformer", pieces, 16, 6, svd)
    assert SubspaceCache.key("fp", "transformer", pieces, 16, 6, {**svd, "block_size": None}) == plain
    assert '"block_size"' not in plain
    assert SubspaceCache.key("fp", "transformer", pieces, 16, 6, {**svd, "block_size": 4}) != plain


def test_cache_key_records_swapped_row_halves():
    """final_layer.adaLN_modulation.1 read for a diffusers-named LoRA has its row halves swapped
    (archs.Piece.swap_halves): other left singular vectors, so another cache entry."""
    from loraport.archs import Piece
    from loraport.cache import SubspaceCache

    svd = dict(method="power", power_iters=2, oversample=8, seed=0)
    name = "final_layer.adaLN_modulation.1.weight"
    keys = {
        swap: SubspaceCache.key("fp", "model", [(name, None, Piece(name[:-7], swap_halves=swap))], 64, 16, svd)
        for swap in (False, True)
    }
    assert keys[False] != keys[True]


def test_corrupt_cache_entry_is_recomputed(paths, tmp_path, decomposed):
    out = str(tmp_path / "out.safetensors")
    pipeline.port(paths["lora"], paths["source"], paths["target"], out, cache_dir=paths["cache"], **SVD)
    files = sorted(os.listdir(paths["cache"]))
    broken = os.path.join(paths["cache"], files[3])
    with open(broken, "r+b") as f:  # truncated
        f.truncate(os.path.getsize(broken) // 2)
    garbled = os.path.join(paths["cache"], files[7])
    with open(garbled, "wb") as f:
        f.write(os.urandom(500))
    decomposed[0] = 0
    again = str(tmp_path / "again.safetensors")
    with pytest.warns(UserWarning, match="ignoring the broken subspace cache entry") as caught:
        rep = pipeline.port(paths["lora"], paths["source"], paths["target"], again, cache_dir=paths["cache"], **SVD)
    assert len(caught) == 2 and decomposed[0] == 2
    assert sum(r.subspaces_from_cache for r in rep.rows) == 2 * N - 2
    a, b = tensors(out), tensors(again)
    assert all(torch.equal(a[k], b[k]) for k in a)
    decomposed[0] = 0  # the entries were rewritten
    pipeline.port(paths["lora"], paths["source"], paths["target"], again, cache_dir=paths["cache"], **SVD)
    assert decomposed[0] == 0


def test_group_bytes_counts_weights_rsvd_and_factors():
    """A chunk's bytes: its stacked weights (on the CPU also the chunk read meanwhile), the rsvd
    op's own bound for one call on them (measured against allocations in
    tests/test_memory_model.py) and one layer's factors."""
    m, n, k, p = 9216, 3072, 64, 8
    common = dict(k=k, oversample=p, power_iters=2, lora_rank=32)
    fp32 = pipeline.group_bytes(4, m, n, method="power", elem=4, device="cuda", **common)
    rsvd = torch.ops.loraport.rsvd_workspace_bytes(8, m, n, torch.float32, k, k + p, 2, "power")
    assert fp32 == 8 * m * n * 4 + rsvd + 8 * (m + n) * 32
    bf16 = pipeline.group_bytes(4, m, n, method="power", elem=2, device="cuda", **common)
    assert bf16 < fp32  # half the weights, upcast 2 of 8 matrices at a time (256 MiB / 113 MB)
    krylov = pipeline.group_bytes(4, m, n, method="krylov", elem=2, device="cuda", **common)
    assert krylov > bf16  # the Krylov basis is (q + 1) l wide
    narrow = pipeline.group_bytes(4, m, n, method="krylov", elem=2, device="cuda", block_size=48, **common)
    assert narrow < krylov  # 3 blocks of 48 instead of 3 of 72
    cpu = pipeline.group_bytes(4, m, n, method="power", elem=2, device="cpu", **common)
    assert cpu - bf16 == 8 * m * n * 2 + m * n * 2  # the prefetched chunk and the tensor being read
    # the default budget holds at least one layer of Hunyuan Video's widest weight on either device
    for device in ("cpu", "cuda"):
        one = pipeline.group_bytes(1, 21504, 3072, method="power", elem=2, device=device, **common)
        assert one < pipeline.DEFAULT_MAX_MEMORY


def test_chunks_follow_the_budget_and_give_the_same_result(paths, tmp_path):
    def need(layers, m, n):
        return pipeline.group_bytes(layers, m, n, k=6, oversample=8, power_iters=3, method="power", elem=4, lora_rank=4)

    qkv = [f"double_blocks.{b}.{side}_attn_qkv" for b in (0, 1) for side in ("img", "txt")]  # [48, 16] each
    plans = []
    for name in qkv:
        module = formats.LoraModule("model", name, torch.randn(48, 4), torch.randn(4, 16), None, name)
        plan = Plan(module, LayerRow(name, name, "planned", 4), src_shape=(48, 16), tgt_shape=(48, 16))
        plan.src_pieces = plan.tgt_pieces = [(name + ".weight", None)]
        plans.append(plan)
    base = BaseModel(paths["source"])
    settings = dict(subspace_rank=6, oversample=8, power_iters=3, method="power", device="cpu")
    for budget, sizes in ((need(2, 48, 16) + 1, [2, 2]), (need(3, 48, 16), [3, 1]), (need(4, 48, 16), [4])):
        chunks = pipeline.plan_chunks(plans, base, base, PortOptions.from_args(**settings, max_memory=budget))
        assert [len(c.plans) for c in chunks] == sizes and {c.rank for c in chunks} == {6}
    with pytest.raises(InputError, match=r"double_blocks\.0\.img_attn_qkv: one layer of shape \[48, 16\] needs about"):
        pipeline.plan_chunks(plans, base, base, PortOptions.from_args(**settings, max_memory=need(1, 48, 16) - 1))

    out_big, out_small = str(tmp_path / "big.safetensors"), str(tmp_path / "small.safetensors")
    pipeline.port(paths["lora"], paths["source"], paths["target"], out_big, **SVD)
    one_layer = need(1, 112, 16)  # the widest module, single_blocks.N.linear1: one layer per chunk
    small = pipeline.port(paths["lora"], paths["source"], paths["target"], out_small, max_vram=one_layer, **SVD)
    assert small.settings["max_memory"] == one_layer
    a, b = tensors(out_big), tensors(out_small)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)


def test_cache_writes_behind_a_port_and_every_entry_is_stored_when_the_block_ends(tmp_path, monkeypatch):
    """Inside `writing_behind` a put writes its entry under a temporary name and returns; the
    writer thread syncs and renames (a port's gate never waits for a sync); at most WRITE_BEHIND
    wait; all are in place, in order, when the block ends; an internal error of the writer is
    raised there. Left by Ctrl-C the block does not wait, and no temporary file stays."""
    import threading

    from loraport import cache as cache_module

    cache = cache_module.SubspaceCache(tmp_path / "c")
    real, hold, committed = cache_module.commit_temp, threading.Event(), []

    def held(tmp, path):
        hold.wait(30)
        real(tmp, path)
        committed.append(path)

    monkeypatch.setattr(cache_module, "commit_temp", held)
    monkeypatch.setattr(cache_module, "WRITE_BEHIND", 2)
    entries = {f"key{i}": {"U": torch.full((3, 2), float(i))} for i in range(3)}
    temps = lambda: [n for n in os.listdir(cache.folder) if n.endswith(".tmp")]  # noqa: E731
    third = threading.Thread(target=lambda: cache.put_tensors("key2", entries["key2"]))
    with cache.writing_behind():
        cache.put_tensors("key0", entries["key0"])
        cache.put_tensors("key1", entries["key1"])
        assert committed == [] and len(temps()) == 2  # both returned, written, neither renamed yet
        third.start()
        third.join(0.5)
        assert third.is_alive()  # a third waits for room
        hold.set()
        third.join(30)
    assert committed == [cache.path(k) for k in entries] and temps() == []
    for key, tensors in entries.items():
        torch.testing.assert_close(cache.get_tensors(key, {"U": [3, 2]})["U"], tensors["U"])

    hold.clear()  # Ctrl-C with entries written and not renamed: out at once, their files removed
    with pytest.raises(KeyboardInterrupt):
        with cache.writing_behind():
            cache.put_tensors("key3", entries["key0"])
            cache.put_tensors("key4", entries["key0"])
            raise KeyboardInterrupt
    assert temps() == [] and not os.path.exists(cache.path("key4"))
    hold.set()

    monkeypatch.setattr(cache_module, "commit_temp", lambda tmp, path: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        with cache.writing_behind():
            cache.put_tensors("key5", entries["key0"])


def test_cache_puts_do_not_list_the_folder_again(tmp_path, monkeypatch):
    """The cache sweeps dead processes' temporary files once, when it opens its folder; a put does
    not list the folder again (a listing per entry, in a folder of thousands of entries)."""
    from loraport import cache as cache_module
    from loraport import outfiles

    swept = []
    monkeypatch.setattr(outfiles, "remove_stale_temps", lambda *a, **k: swept.append(a) or [])
    monkeypatch.setattr(cache_module, "remove_stale_temps", outfiles.remove_stale_temps)
    cache = cache_module.SubspaceCache(tmp_path / "c")
    assert len(swept) == 1
    cache.put_tensors("a", {"U": torch.ones(2, 2)})
    with cache.writing_behind():
        cache.put_tensors("b", {"U": torch.ones(2, 2)})
    assert len(swept) == 1 and cache.get_tensors("b", {"U": [2, 2]}) is not None
