"""Positioned reads (loraport.positioned): O_DIRECT through the bounce buffer returns exactly the
file's bytes for any offset and length (unaligned, across several bounce-buffer reads, at the end
of the file), a range past the end comes back short, and LORAPORT_DIRECT_IO=0 or a file system
without O_DIRECT reads through the page cache."""

import os

import pytest
import torch

from loraport import positioned


def _direct_supported(path) -> bool:
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
        return True
    except (OSError, AttributeError):
        return False


@pytest.fixture
def data_file(tmp_path):
    data = torch.randint(0, 256, (5 * 4096 + 1234,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    path = str(tmp_path / "data.bin")
    data.numpy().tofile(path)
    return path, data


@pytest.fixture
def counted(monkeypatch):
    """Every range goes the direct way (DIRECT_MIN 1 byte, none seen as cached), in 2-page
    bounce reads; counts them."""
    monkeypatch.setattr(positioned, "DIRECT_MIN", 1)
    monkeypatch.setattr(positioned, "_cached", lambda *a: False)
    monkeypatch.setattr(positioned, "_BOUNCE", 2 * 4096)
    monkeypatch.setattr(positioned, "_local", positioned.threading.local())  # a bounce buffer of the new size
    calls = []
    real = positioned._read_direct
    monkeypatch.setattr(positioned, "_read_direct", lambda *a: calls.append(a[1]) or real(*a))
    return calls


@pytest.mark.parametrize(
    "offset,length",
    [(0, 4096), (1, 100), (4095, 2), (777, 3 * 4096 + 5), (4096, 2 * 4096), (5 * 4096, 1234), (3, 5 * 4096 + 1231)],
)
def test_direct_reads_return_the_files_bytes_at_any_offset(data_file, counted, offset, length):
    path, data = data_file
    out = torch.full((length,), 7, dtype=torch.uint8)
    assert positioned.read_range(path, offset, out) == length
    assert torch.equal(out, data[offset : offset + length])
    assert counted == ([offset] if _direct_supported(path) else [])


def test_a_range_past_the_end_comes_back_short_both_ways(data_file, counted, monkeypatch):
    path, data = data_file
    size = data.numel()
    for direct in ("1", "0"):
        monkeypatch.setenv("LORAPORT_DIRECT_IO", direct)
        out = torch.zeros(600, dtype=torch.uint8)
        assert positioned.read_range(path, size - 100, out) == 100
        assert torch.equal(out[:100], data[-100:])
        assert positioned.read_range(path, size + 10, out) == 0


def test_direct_io_off_or_refused_reads_through_the_page_cache(data_file, counted, monkeypatch):
    path, data = data_file
    monkeypatch.setenv("LORAPORT_DIRECT_IO", "0")
    out = torch.empty(3000, dtype=torch.uint8)
    assert positioned.read_range(path, 10, out) == 3000 and torch.equal(out, data[10:3010])
    assert counted == []
    monkeypatch.delenv("LORAPORT_DIRECT_IO")
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda p, flags, *a: (_ for _ in ()).throw(OSError(22, "Invalid argument"))
                        if flags & os.O_DIRECT else real_open(p, flags, *a))  # fmt: skip
    assert positioned.read_range(path, 10, out) == 3000 and torch.equal(out, data[10:3010])
    assert counted == []


def test_a_base_weight_read_directly_equals_safetensors_own_read(tmp_path, counted):
    from safetensors.torch import save_file

    from loraport.basemodel import BaseModel

    w = torch.randn(96, 200, generator=torch.Generator().manual_seed(1)).bfloat16()
    path = str(tmp_path / "base.safetensors")
    save_file({"a.weight": torch.randn(3, 5), "b.weight": w}, path)  # b starts at an unaligned offset
    base = BaseModel(path)
    out = torch.empty(40, 200, dtype=torch.bfloat16)
    base.read_into("model", "b.weight", out, slice(50, 90))
    assert torch.equal(out, w[50:90]) and counted == []  # through the page cache unless asked
    base.direct_io = True  # what a CPU port sets
    out.zero_()
    base.read_into("model", "b.weight", out, slice(50, 90))
    assert torch.equal(out, w[50:90])
    assert counted or not _direct_supported(path)


def test_a_cpu_port_asks_for_direct_reads_of_its_bases(tmp_path, monkeypatch):
    from loraport import pipeline
    from loraport.testing import tiny

    seen = []
    real = pipeline.BaseModel
    monkeypatch.setattr(pipeline, "BaseModel", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    source = tiny.base_model("flux", width=16, seed=0)
    files = [tiny.save_base(sd, str(tmp_path / f"{n}.safetensors")) for n, sd in
             (("lora", tiny.lora("flux", source, fmt="peft", rank=2, seed=1)), ("s", source), ("t", tiny.related(source, seed=2)))]  # fmt: skip
    pipeline.port(*files, dry_run=True, quiet=True)
    assert [b.direct_io for b in seen] == [True, True]


def test_a_range_in_the_page_cache_is_seen_as_cached_and_one_on_disk_is_not(data_file):
    path, data = data_file
    if not hasattr(os, "RWF_NOWAIT"):
        pytest.skip("no RWF_NOWAIT on this platform")
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # clean pages can be dropped
        os.read(fd, data.numel())  # now cached
        assert positioned._cached(path, 100, data.numel() - 200)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # dropped
        if positioned._cached(path, 100, data.numel() - 200):
            pytest.skip("this file system keeps the pages (DONTNEED ignored)")
    finally:
        os.close(fd)


def _aligned_like(offset: int, length: int) -> torch.Tensor:
    """A [length] uint8 buffer whose address is congruent to ``offset`` modulo 4096, with 7s."""
    room = torch.full((length + 2 * 4096,), 7, dtype=torch.uint8)
    shift = (offset - room.data_ptr()) % 4096
    return room[shift : shift + length]


@pytest.mark.parametrize(
    "offset,length",
    [(0, 5 * 4096), (777, 3 * 4096 + 5), (4096, 2 * 4096), (3, 5 * 4096 + 1231), (4000, 4096 + 200), (100, 300)],
)
def test_a_destination_aligned_like_the_file_takes_whole_pages_without_the_bounce_buffer(
    data_file, counted, monkeypatch, offset, length
):
    path, data = data_file
    if not _direct_supported(path):
        pytest.skip("the temporary directory's file system refuses O_DIRECT")
    in_place, bounced = [], []
    real_in_place, real_bounced = positioned._in_place, positioned._bounced
    monkeypatch.setattr(positioned, "_in_place", lambda fd, a, b, addr: in_place.append((a, b)) or real_in_place(fd, a, b, addr))
    monkeypatch.setattr(positioned, "_bounced", lambda fd, a, b, addr: bounced.append((a, b)) or real_bounced(fd, a, b, addr))
    out = _aligned_like(offset, length)
    assert positioned.read_range(path, offset, out) == length
    assert torch.equal(out, data[offset : offset + length])
    lo, hi = -(-offset // 4096) * 4096, (offset + length) // 4096 * 4096
    if hi > lo:  # whole pages inside: those in place, only the partial ones bounced
        assert in_place == [(lo, hi)]
        assert bounced == [(a, b) for a, b in ((offset, lo), (hi, offset + length)) if a < b]
    else:
        assert in_place == [] and bounced == [(offset, offset + length)]


def test_an_aligned_destination_past_the_end_comes_back_short(data_file, counted):
    path, data = data_file
    size = data.numel()  # 5 pages + 1234 bytes
    out = _aligned_like(4096 + 10, 6 * 4096)
    assert positioned.read_range(path, 4096 + 10, out) == size - 4096 - 10
    assert torch.equal(out[: size - 4096 - 10], data[4096 + 10 :])


def _mapping_of(address: int) -> str:
    """The /proc/self/maps line of the mapping that holds ``address``."""
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= address < hi:
                return line
    return ""


def _resident_bytes(address: int) -> tuple[int, int]:
    """(size, resident) in bytes of the mapping that holds ``address``, from /proc/self/smaps:
    resident counts the pages its page tables already hold."""
    with open("/proc/self/smaps") as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines):
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            if lo <= address < hi:
                rss = next(ln for ln in lines[i + 1 :] if ln.startswith("Rss:"))
                return hi - lo, int(rss.split()[1]) * 1024
    raise AssertionError(f"no mapping holds {address:#x}")


def test_a_cached_range_is_mapped_from_the_page_cache_not_copied(data_file, monkeypatch):
    path, data = data_file
    monkeypatch.setattr(positioned, "DIRECT_MIN", 1)
    monkeypatch.setattr(positioned, "_cached", lambda *a: True)
    got = positioned.mapped_if_cached(path, 777, 3 * 4096 + 5)
    size, resident = _resident_bytes(got.data_ptr())
    assert resident == size  # filled in by the reading thread, before anything reads it
    assert torch.equal(got, data[777 : 777 + 3 * 4096 + 5])
    assert path in _mapping_of(got.data_ptr())  # a view of the file's pages, not a copy
    monkeypatch.setattr(positioned, "_cached", lambda *a: False)
    assert positioned.mapped_if_cached(path, 777, 100) is None  # not cached: read, not mapped
    monkeypatch.setattr(positioned, "_cached", lambda *a: True)
    monkeypatch.setenv("LORAPORT_DIRECT_IO", "0")
    assert positioned.mapped_if_cached(path, 777, 100) is None  # plain reads asked for
    monkeypatch.delenv("LORAPORT_DIRECT_IO")
    assert positioned.mapped_if_cached(path, data.numel() - 10, 100) is None  # past the end


def test_a_mapped_range_of_many_fault_windows_is_filled_to_its_last_page(tmp_path, monkeypatch):
    """`_populate` reads once per 64 KB (the kernel maps the cached pages around each fault) and
    the last byte: a range that starts and ends off the windows' edges is resident to its end."""
    size = 5 * (64 << 10) + 3 * 4096 + 17
    data = torch.randint(0, 256, (size + (64 << 10),), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    path = str(tmp_path / "windows.bin")
    data.numpy().tofile(path)
    with open(path, "rb") as f:  # cached for certain
        f.read()
    monkeypatch.setattr(positioned, "DIRECT_MIN", 1)
    monkeypatch.setattr(positioned, "_cached", lambda *a: True)
    for offset in (0, 61 << 10, 8191):
        got = positioned.mapped_if_cached(path, offset, size)
        mapping, resident = _resident_bytes(got.data_ptr())
        assert resident == mapping  # every page of the mapping, before anything reads it
        assert torch.equal(got, data[offset : offset + size])
        del got


@pytest.mark.parametrize("cached", [True, False])
def test_a_cpu_port_maps_cached_weights_reads_the_rest_in_place_and_writes_the_same(tmp_path, monkeypatch, cached):
    """Every weight large enough (DIRECT_MIN lowered): mapped where cached, else read with
    O_DIRECT straight into a slot placed for it (only partial pages bounced); the output equals
    a port with plain reads."""
    from safetensors.torch import load_file

    from loraport import basemodel, pipeline
    from loraport.testing import tiny

    source = tiny.base_model("hunyuan-video", width=64, seed=0)
    files = [tiny.save_base(sd, str(tmp_path / f"{n}.safetensors")) for n, sd in
             (("lora", tiny.lora("hunyuan-video", source, fmt="kohya", rank=2, seed=1)), ("s", source),
              ("t", tiny.related(source, seed=2)))]  # fmt: skip
    monkeypatch.setenv("LORAPORT_DIRECT_IO", "0")
    plain = pipeline.port(*files, str(tmp_path / "plain.safetensors"), quiet=True)
    monkeypatch.delenv("LORAPORT_DIRECT_IO")
    monkeypatch.setattr(positioned, "DIRECT_MIN", 1)
    monkeypatch.setattr(positioned, "_cached", lambda *a: cached)
    mapped, moved = [], {"in_place": 0, "bounced": 0}  # bytes each way
    real_mapped = basemodel.mapped_if_cached
    monkeypatch.setattr(basemodel, "mapped_if_cached", lambda *a: mapped.append(a[2]) or real_mapped(*a))
    for name in ("_in_place", "_bounced"):
        real = getattr(positioned, name)
        monkeypatch.setattr(positioned, name, lambda fd, a, b, addr, real=real, key=name.strip("_"):
                            moved.__setitem__(key, moved[key] + b - a) or real(fd, a, b, addr))  # fmt: skip
    fast = pipeline.port(*files, str(tmp_path / "fast.safetensors"), quiet=True)
    assert [r.similarity for r in fast.rows] == [r.similarity for r in plain.rows]
    a, b = load_file(str(tmp_path / "plain.safetensors")), load_file(str(tmp_path / "fast.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if cached:  # every whole weight mapped, nothing read
        assert len(mapped) > 0 and moved == {"in_place": 0, "bounced": 0}
    elif _direct_supported(files[1]):
        assert moved["in_place"] > 4 * moved["bounced"]
