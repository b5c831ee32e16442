"""The reader's host staging (loraport.staging): two slots allocated once per run and reused,
whose total stays within max_memory on the CPU and on the GPU path (where they are pinned; the
accounting is checked here without a GPU)."""

import pytest
import torch

from loraport import options, pipeline, streaming
from loraport.errors import InputError
from loraport.staging import StagingBuffers
from loraport.testing import tiny

ARCH = "hunyuan-video"
SVD = dict(subspace_rank=6, power_iters=2, quiet=True)
BUDGET = 160_000  # bytes: one or two tiny layers a chunk


class RecordingStaging(StagingBuffers):
    """StagingBuffers, never pinned (pinning needs CUDA; the accounting does not), remembering
    what was asked of it."""

    made: list = []

    def __init__(self, slot_bytes, *, slots=2, pin=False):
        super().__init__(slot_bytes, slots=slots, pin=False)
        self.pin_asked = pin
        self.taken = []  # (slot, bytes taken, slot bytes, total bytes) per chunk read
        RecordingStaging.made.append(self)

    def take(self, slot, shape, dtype):
        view = super().take(slot, shape, dtype)
        self.taken.append((slot, view.numel() * view.element_size(), self.slot_bytes, self.total_bytes))
        return view


@pytest.fixture
def pair(tmp_path, monkeypatch):
    source = tiny.base_model(ARCH, width=16, seed=0)
    paths = {
        "lora": str(tmp_path / "lora.safetensors"),
        "source": tiny.save_base(source, str(tmp_path / "source.safetensors")),
        "target": tiny.save_base(tiny.related(source), str(tmp_path / "target.safetensors")),
        "out": str(tmp_path / "out.safetensors"),
    }
    tiny.save_base(tiny.lora(ARCH, source, fmt="kohya", rank=4, alpha=3.0), paths["lora"])
    RecordingStaging.made = []
    monkeypatch.setattr(streaming, "StagingBuffers", RecordingStaging)
    return paths


def _check_bounded(staging: RecordingStaging, budget: int):
    """Every chunk went through the same two slots, in turn, each within its slot, and the
    slots' total stayed within the budget."""
    assert len(staging.taken) > 2
    assert [slot for slot, *_ in staging.taken] == [i % 2 for i in range(len(staging.taken))]
    assert all(nbytes <= slot_bytes for _, nbytes, slot_bytes, _ in staging.taken)
    assert 0 < max(total for *_, total in staging.taken) <= budget
    assert staging.total_bytes == 0  # released at the end of the run


def test_the_cpu_port_stages_every_chunk_in_two_slots_within_max_memory(pair):
    p = pair
    pipeline.port(p["lora"], p["source"], p["target"], p["out"], max_memory=BUDGET, **SVD)
    (staging,) = RecordingStaging.made
    assert not staging.pin_asked
    _check_bounded(staging, BUDGET)


def test_the_gpu_path_keeps_its_pinned_staging_within_max_vram(pair, monkeypatch):
    """On a GPU, group_bytes counts one chunk's weights (they are in VRAM); the two staging
    slots in host memory are bounded by the same budget (pipeline.staging_bytes)."""
    p = pair
    monkeypatch.setattr(options, "resolve_device", lambda device: "cuda:0")
    monkeypatch.setattr(pipeline, "port_chunk", lambda *args: None)  # the plan and the reads, no GPU work
    with pytest.raises(InputError, match="no module was ported"):
        pipeline.port(p["lora"], p["source"], p["target"], p["out"], device="cuda", max_memory=BUDGET, **SVD)
    (staging,) = RecordingStaging.made
    assert staging.pin_asked
    _check_bounded(staging, BUDGET)


@pytest.mark.parametrize("device", ["cpu", "cuda:0"])
def test_chunks_fit_both_vram_and_the_staging_bound(device):
    """pipeline.plan_chunks' rule, per device: the chunk's `group_bytes` and its `staging_bytes`
    both within the budget. On the GPU the staging is the tighter one for large weights."""
    m = n = 3072
    budget = 2 << 30
    kwargs = dict(k=64, oversample=8, power_iters=2, method="power", elem=2, lora_rank=32, device=device)
    layers = 1
    def need(layers):
        return max(pipeline.group_bytes(layers, m, n, **kwargs), pipeline.staging_bytes(layers, m, n, elem=2))

    while need(layers + 1) <= budget:
        layers += 1
    assert pipeline.staging_bytes(layers, m, n, elem=2) <= budget
    if device == "cpu":  # the CPU's estimate already holds the next chunk being read
        assert pipeline.group_bytes(layers, m, n, **kwargs) >= pipeline.staging_bytes(layers, m, n, elem=2)
    else:
        assert pipeline.group_bytes(layers, m, n, **kwargs) < pipeline.staging_bytes(layers, m, n, elem=2)


def test_a_slot_is_reused_not_reallocated_and_refuses_more_than_it_holds():
    staging = StagingBuffers(1000)
    assert staging.slot_bytes == 1024 and staging.total_bytes == 2048
    a = staging.take(0, (10, 25), torch.float32)  # [10, 25], 1000 bytes
    b = staging.take(1, (3, 4), torch.bfloat16)
    assert b.data_ptr() == a.data_ptr() + staging.slot_bytes  # the second slot starts past the first
    again = staging.take(0, (5, 5), torch.float64)
    assert again.data_ptr() == a.data_ptr()
    with pytest.raises(AssertionError, match="1032 bytes asked of a 1024-byte slot"):
        staging.take(1, (129,), torch.float64)
    staging.release()
    assert staging.total_bytes == 0


def test_take_aligned_places_each_tensor_at_the_address_its_file_offset_asks_for():
    from loraport.staging import ALIGN, aligned_bytes

    staging = StagingBuffers(aligned_bytes(3, 50 * 100 * 2))
    views = staging.take_aligned(0, (50, 100), torch.bfloat16, [100, None, ALIGN - 2])
    assert views[0].data_ptr() % ALIGN == 100 and views[2].data_ptr() % ALIGN == ALIGN - 2
    spans = sorted((v.data_ptr(), v.data_ptr() + v.numel() * 2) for v in views)
    slot = staging.take(0, (staging.slot_bytes,), torch.uint8).data_ptr()
    assert slot <= spans[0][0] and spans[-1][1] <= slot + staging.slot_bytes  # inside slot 0
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # no two overlap
    odd = staging.take_aligned(1, (10,), torch.bfloat16, [3])[0]  # an odd residue cannot hold bf16
    assert odd.data_ptr() % 2 == 0
    with pytest.raises(AssertionError, match="overflow"):
        staging.take_aligned(1, (50, 100), torch.bfloat16, [1, 2, 3, 4, 5])


def test_stream_loads_one_chunk_ahead_and_releases_each_on_the_reading_thread():
    """Stream.each: chunk i + 1 is loaded while the caller holds chunk i, into the other slot;
    release(loaded) of chunk i runs on the reading thread, only after the caller came back for
    the next chunk, and for every chunk."""
    import threading

    events = []  # (what, chunk, thread) in the order they happened
    lock = threading.Lock()

    def log(what, chunk):
        with lock:
            events.append((what, chunk, threading.get_ident()))

    def load(chunk, slot):
        log("load", chunk)
        return {"chunk": chunk, "slot": slot}

    def release(loaded):
        log("release", loaded["chunk"])

    with streaming.Stream() as stream:
        for chunk, loaded in stream.each(["a", "b", "c"], load, release=release):
            assert loaded == {"chunk": chunk, "slot": "abc".index(chunk) % 2}
            log("compute", chunk)
    main = threading.get_ident()
    order = [(what, chunk) for what, chunk, _ in events]
    for i, chunk in enumerate("abc"):
        assert order.index(("release", chunk)) > order.index(("compute", chunk))
        if i + 1 < 3:  # one thread, in order: the next chunk's load was queued first
            assert order.index(("release", chunk)) > order.index(("load", "abc"[i + 1]))
    assert {t for what, _, t in events if what in ("load", "release")}.isdisjoint({main})
    assert sorted(c for what, c, _ in events if what == "release") == ["a", "b", "c"]
