"""Port a whole catalog of LoRAs across one base-model pair: ``loraport port-many`` and
`port_many`. The work is one shared part, the subspaces of the base weights, and many small
independent ports, so it runs in two phases on a pool of workers (loraport.executors: a process
pool on this machine, or Ray):

  plan     each LoRA is read and mapped onto both bases (a task per batch of LoRAs): the base
           layers it needs, or why it cannot be ported (bad input, reported and left out).
  phase 1  the distinct base layers whose subspaces are not in the subspace cache yet are cut
           into one group per worker (same-shape layers together, equal rSVD cost) and each
           group's subspaces are computed into the cache (`fill_cache`): every base subspace is
           computed once in the whole run.
  phase 2  every LoRA is ported by `loraport.port` as a task of its own, reading the cache; its
           report says how many subspaces it had to compute (0 when phase 1 did its job).

The cache reaches the workers in one of two ways (``transfer``):
  "files"         cache_dir, the LoRAs and outdir are paths every worker can use: this machine
                  (the process pool, Ray "local") or a shared file system (NFS, EFS, Filestore).
  "object-store"  (Ray only) phase 1 writes into a scratch folder on its node and returns the
                  entries through Ray's object store; the driver keeps them in cache_dir and
                  each phase-2 task copies the entries its LoRA needs into its node's scratch
                  folder once. The LoRA files go to the tasks and the outputs come back the same
                  way, so only the base models must be on every node, at the same path and with
                  the same modification times (the cache key holds them: copy with rsync -a).

Outputs are OUTDIR/<input stem>.safetensors, written atomically; a rerun reuses the outputs that
exist (status "ported", reused true) and computes only what they do not cover. A task whose
worker dies is retried; a LoRA that fails never stops the others."""

from __future__ import annotations

import json
import os
import tempfile
import time
import traceback
from dataclasses import dataclass, field

import torch

from . import executors, formats, pipeline
from .basemodel import BaseModel
from .cache import SubspaceCache
from .errors import InputError, NothingToPort
from .options import PortOptions
from .plans import Plan, base_styles, plan_module
from .reports import Action, LayerRow

# options that decide the base subspaces: one value for the whole catalog (phase 1 computes once)
SUBSPACE_OPTIONS = ("device", "subspace_rank", "energy", "method", "power_iters", "block_size", "oversample",
                    "seed", "max_memory")  # fmt: skip
# options a manifest line may set for its own LoRA
PER_LORA_OPTIONS = ("rank", "variant", "min_similarity", "on_dissimilar", "format", "arch", "dora_magnitude")
STATUSES = ("ported", "nothing-to-port", "bad-input", "error")  # exit status 0, 0, 2, 1
TRANSFERS = ("files", "object-store")


@dataclass
class Entry:
    """One input of the catalog."""

    lora: str  # absolute path
    out: str  # absolute output path
    options: dict = field(default_factory=dict)  # per-LoRA options (PER_LORA_OPTIONS)
    error: str | None = None  # why the input line cannot be used at all


@dataclass(frozen=True)
class BaseLayer:
    """One layer's weights in both bases, as the subspace cache knows them: what phase 1
    computes. Module names are in the LoRA's naming (for messages only)."""

    component: str
    module: str
    src_pieces: tuple  # ((tensor name, row slice or None, archs.Piece), ...)
    tgt_pieces: tuple
    src_shape: tuple
    tgt_shape: tuple
    lora_rank: int  # for the memory estimate of a chunk

    def _plan(self) -> Plan:
        row = LayerRow(self.module, self.module, Action.PLANNED, self.lora_rank)
        return Plan(None, row, self.component, list(self.src_pieces), list(self.tgt_pieces),
                              self.src_shape, self.tgt_shape)  # fmt: skip


def base_layers(lora, source, target, *, arch="auto") -> list[BaseLayer]:
    """The base layers whose subspaces porting ``lora`` from ``source`` to ``target`` needs
    (InputError when the LoRA cannot be ported at all). Opens the bases' headers only."""
    return _layers(lora, BaseModel(source), BaseModel(target), arch)


def _layers(lora, src: BaseModel, tgt: BaseModel, arch) -> list[BaseLayer]:
    lf = formats.read_lora(lora, arch=arch, base_names=src.module_names())
    styles = base_styles(lf, src, tgt)
    plans = [plan_module(m, lf, src, tgt, styles) for m in lf.modules]
    return [
        BaseLayer(p.component, p.row.module, tuple(p.src_pieces), tuple(p.tgt_pieces), tuple(p.src_shape),
                  tuple(p.tgt_shape), p.row.rank_in)  # fmt: skip
        for p in plans
        if p.row.action == Action.PLANNED
    ]


def cache_keys(layer: BaseLayer, fingerprints: tuple[str, str], settings: PortOptions) -> tuple[str, str]:
    """(source key, target key) of ``layer`` in the subspace cache; ``settings`` as
    PortOptions.from_args gives them. Two layers with the same keys are one computation."""
    plan = layer._plan()
    return tuple(plan.cache_key(side, fp, settings) for side, fp in zip(("source", "target"), fingerprints))


def fill_cache(layers, source, target, cache_dir, *, quiet: bool = True, **options) -> dict:
    """Compute the subspaces of both bases for ``layers`` (BaseLayers) into the subspace cache
    at ``cache_dir``, as `loraport.port` with the same ``options`` (SUBSPACE_OPTIONS) would:
    same chunks under max_memory, same rsvd, same keys. Entries already there are neither read
    nor recomputed. Returns {"computed": subspaces decomposed, "seconds": time split}."""
    settings = PortOptions.from_args(cache_dir=cache_dir, **options)
    src, tgt = BaseModel(source), BaseModel(target)
    if src.fingerprint() is None or tgt.fingerprint() is None:
        raise ValueError("loraport.fill_cache: the bases must be files (state dicts are not cached)")
    plans = [layer._plan() for layer in layers]
    seconds = dict(read=0.0, svd=0.0, project=0.0, write=0.0, cache=0.0)
    pipeline.run_plans(plans, src, tgt, settings, seconds, quiet, subspaces_only=True)
    return {"computed": sum(2 - p.row.subspaces_from_cache for p in plans), "seconds": seconds}


# ---------------------------------------------------------------- inputs


def read_inputs(inputs, outdir) -> list[Entry]:
    """LORA files, folders (their *.safetensors, sorted) and MANIFEST.jsonl files (one JSON
    object a line: "lora" (relative to the manifest's folder), optional "out" (a file name in
    outdir or a path) and PER_LORA_OPTIONS) as Entries; a manifest line that cannot be used is
    an Entry with an error. Output names taken twice are errors of the later entries."""
    outdir = os.path.abspath(os.fspath(outdir))
    entries = []
    for item in inputs:
        item = os.fspath(item)
        if os.path.isdir(item):
            files = sorted(f for f in os.listdir(item) if f.endswith(".safetensors"))
            entries += [_entry(os.path.join(item, f), None, {}, outdir) for f in files]
        elif item.endswith(".jsonl"):
            entries += _manifest(item, outdir)
        else:
            entries.append(_entry(item, None, {}, outdir))
    taken: dict[str, str] = {}
    for e in entries:
        if e.error is None and e.out in taken:
            e.error = f"{e.lora}: output {e.out} is also the output of {taken[e.out]} (give one an \"out\" in a manifest)"
        taken.setdefault(e.out, e.lora)
    return entries


def _entry(lora, out, options, outdir) -> Entry:
    lora = os.path.abspath(lora)
    stem = os.path.splitext(os.path.basename(lora))[0]
    out = os.path.join(outdir, out or stem + ".safetensors")
    return Entry(lora, os.path.abspath(out), options)


def _manifest(path, outdir) -> list[Entry]:
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise InputError(f"{path}: cannot read the manifest ({e.strerror})") from None
    folder, entries = os.path.dirname(os.path.abspath(path)), []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            doc = json.loads(line)
            if not isinstance(doc, dict) or not isinstance(doc.get("lora"), str):
                raise ValueError('not an object with a "lora" path')
        except ValueError as e:
            entries.append(Entry(where, "", error=f"{where}: {e}"))
            continue
        lora = os.path.join(folder, doc.pop("lora"))
        out = doc.pop("out", None)
        entry = _entry(lora, out, doc, outdir)
        wrong = sorted(set(doc) - set(PER_LORA_OPTIONS))
        if wrong:
            kind = "catalog-wide options" if set(wrong) <= set(SUBSPACE_OPTIONS) else "unknown keys"
            entry.error = f"{where}: {kind} {wrong} (a line may set {', '.join(PER_LORA_OPTIONS)}, out)"
        entries.append(entry)
    return entries


# ---------------------------------------------------------------- tasks (run on the workers)


def _threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def node_scratch(node_id: str | None = None) -> str:
    """A Ray node's scratch folder for cache entries and shipped files (transfer="object-store"),
    $TMPDIR/loraport-node/<node id>; default: the node this runs on."""
    if node_id is None:
        import ray

        node_id = ray.get_runtime_context().get_node_id()
    folder = os.path.join(tempfile.gettempdir(), "loraport-node", node_id[:16])
    os.makedirs(folder, exist_ok=True)
    return folder


def _pack(paths) -> dict[str, bytes]:
    out = {}
    for p in paths:
        with open(p, "rb") as f:
            out[os.path.basename(p)] = f.read()
    return out


def _unpack(files: dict[str, bytes], folder: str) -> None:
    for name, data in files.items():
        path = os.path.join(folder, name)
        if not os.path.exists(path):

            def dump(tmp, data=data):
                with open(tmp, "wb") as f:
                    f.write(data)

            formats.atomic_write(path, dump)


def _plan_task(batch, source, target, settings, arch, threads, shipped=None):
    """[(entry index, [(cache keys, BaseLayer)] or None, error or None, seconds)] for a batch
    [(index, Entry)]; ``shipped``: {index: ref of the LoRA's files} (object-store)."""
    _threads(threads)
    src, tgt = BaseModel(source), BaseModel(target)
    fingerprints = (src.fingerprint(), tgt.fingerprint())
    results = []
    for index, entry in batch:
        t0 = time.perf_counter()
        try:
            with tempfile.TemporaryDirectory() as tmp:
                lora = _local_lora(entry, shipped and shipped.get(index), tmp)
                layers = _layers(lora, src, tgt, entry.options.get("arch", arch))
            found = [(cache_keys(layer, fingerprints, settings), layer) for layer in layers]
            results.append((index, found, None, time.perf_counter() - t0))
        except (InputError, ValueError, OSError) as e:
            results.append((index, None, ("bad-input", str(e)), time.perf_counter() - t0))
    return results


def _local_lora(entry: Entry, ref, tmp: str) -> str:
    """The LoRA's path on this worker: the entry's own, or its shipped files put in ``tmp``."""
    if ref is None:
        return entry.lora
    import ray

    _unpack(ray.get(ref), tmp)
    return os.path.join(tmp, os.path.basename(entry.lora))


def _fill_task(layers, source, target, options, threads, cache_dir, names=None):
    """Phase 1 for one group of layers. ``cache_dir`` None: this Ray node's scratch folder, and
    the entries ``names`` (file names) come back as bytes."""
    _threads(threads)
    t0 = time.perf_counter()
    folder = cache_dir or node_scratch()
    done = fill_cache(layers, source, target, folder, **options)
    done["files"] = _pack(os.path.join(folder, n) for n in names) if names is not None else None
    done["wall"] = time.perf_counter() - t0
    return done


def _port_task(entry: Entry, source, target, options, threads, cache_dir, shipped=None):
    """Phase 2 for one LoRA: its results row. ``shipped`` (object-store): {"lora": ref of its
    files, "entries": [(file name, ref)] of the cache entries it needs}; the output then comes
    back as bytes in row["files"] instead of being written to entry.out."""
    _threads(threads)
    t0 = time.perf_counter()
    row = {"lora": entry.lora, "out": entry.out, "status": "ported", "reused": False, "message": ""}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = entry.out
            if shipped is not None:
                import ray

                cache_dir = node_scratch()
                missing = [(n, r) for n, r in shipped["entries"] if not os.path.exists(os.path.join(cache_dir, n))]
                if missing:
                    _unpack(dict(zip([n for n, _ in missing], ray.get([r for _, r in missing]))), cache_dir)
                out = os.path.join(tmp, "out", os.path.basename(entry.out))
                os.makedirs(os.path.dirname(out))
            lora = _local_lora(entry, shipped and shipped["lora"], tmp)
            opts = {**options, **entry.options}
            rep = pipeline.port(lora, source, target, out, cache_dir=cache_dir, quiet=True, **opts)
            s = rep.summary()
            row["layers_ported"] = s["actions"].get("ported", 0) + s["actions"].get("padded", 0)
            # layers that reached the subspace step have a similarity; 0 here when phase 1 covered them
            row["subspaces_computed"] = sum(2 - r.subspaces_from_cache for r in rep.rows if r.similarity is not None)
            if shipped is not None:
                row["files"] = _pack(os.path.join(os.path.dirname(out), f) for f in os.listdir(os.path.dirname(out)))
    except NothingToPort as e:
        row.update(status="nothing-to-port", message=str(e))
    except (InputError, ValueError, OSError) as e:
        row.update(status="bad-input", message=str(e))
    except Exception:  # noqa: BLE001  (an internal bug: its traceback goes in the results, the catalog goes on)
        row.update(status="error", message=traceback.format_exc())
    row["seconds"] = time.perf_counter() - t0
    return row


# ---------------------------------------------------------------- the driver


@dataclass
class CatalogReport:
    """What `port_many` did: one results row per input (input order) and the run's facts."""

    rows: list[dict]  # lora, out, status (STATUSES), reused, seconds, message, ...
    runner: str  # "process pool" or "Ray"
    workers: int
    transfer: str
    seconds: dict = field(default_factory=dict)  # start (Ray), plan, phase1, phase2, total
    layers: int = 0  # distinct base layers the catalog needs
    subspaces_computed: int = 0  # in phase 1
    phase1_tasks: int = 0

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(STATUSES, 0)
        for r in self.rows:
            counts[r["status"]] += 1
        return counts

    @property
    def exit_status(self) -> int:
        """0 when every input was ported or had nothing to port, 1 when a task hit an internal
        error, else 2 (bad input)."""
        c = self.counts()
        return 1 if c["error"] else 2 if c["bad-input"] else 0

    def write_results(self, path) -> None:
        """The rows as JSONL, written atomically."""
        text = "".join(json.dumps(r) + "\n" for r in self.rows)

        def dump(tmp):
            with open(tmp, "w") as f:
                f.write(text)

        formats.atomic_write(path, dump, protect=[r["lora"] for r in self.rows])

    def table(self) -> str:
        c, sec = self.counts(), self.seconds
        reused = sum(1 for r in self.rows if r.get("reused"))
        fresh = [r for r in self.rows if r["status"] == "ported" and not r.get("reused")]
        again = sum(r.get("subspaces_computed", 0) for r in self.rows)
        rate = 60 * len(fresh) / sec["total"] if sec.get("total") else 0.0
        rows = [
            ("LoRAs", f"{len(self.rows)}: {c['ported']} ported ({reused} reused from an earlier run), "
             f"{c['nothing-to-port']} nothing to port, {c['bad-input']} bad input, {c['error']} failed"),
            ("ran on", f"{self.runner}, {self.workers} workers, cache by {self.transfer}"),
            ("start", f"{sec.get('start', 0):.1f} s (connecting to or starting Ray)"),
            ("plan", f"{sec.get('plan', 0):.1f} s (LoRAs read and mapped onto both bases; pool workers start here)"),
            ("phase 1", f"{sec.get('phase1', 0):.1f} s: {self.subspaces_computed} subspaces of the "
             f"{self.layers} distinct base layers, {self.phase1_tasks} tasks"),
            ("phase 2", f"{sec.get('phase2', 0):.1f} s: {len(fresh)} LoRAs ported, {again} subspaces recomputed"),
            ("total", f"{sec.get('total', 0):.1f} s, {rate:.1f} LoRAs/minute"),
        ]  # fmt: skip
        width = max(len(n) for n, _ in rows)
        lines = ["port-many summary"] + [f"  {n:<{width}}  {v}" for n, v in rows]
        if again:
            lines.append("  (phase 2 recomputed subspaces: do the workers see other base files? copy with rsync -a)")
        bad = [r for r in self.rows if r["status"] not in ("ported",)]
        if bad:
            lines.append(f"not ported ({len(bad)}):")
        for r in bad:
            lines.append(f"  {r['status']:<15} {r['message'].strip().splitlines()[-1] if r['message'] else r['lora']}")
        return "\n".join(lines)


def _row(entry: Entry, status: str, message: str = "", reused: bool = False, seconds: float = 0.0) -> dict:
    return {"lora": entry.lora, "out": entry.out, "status": status, "reused": reused, "message": message,
            "seconds": seconds}  # fmt: skip


def worker_groups(layers: list[BaseLayer], parts: int) -> list[list[BaseLayer]]:
    """``layers`` cut into at most ``parts`` groups of about equal rSVD cost (m·n per layer),
    same-shape layers next to each other so that each group batches them."""
    layers = sorted(layers, key=lambda l: (l.tgt_shape, l.src_shape, l.component, l.module))
    cost = [l.tgt_shape[0] * int(torch.tensor(l.tgt_shape[1:]).prod()) for l in layers]
    total, groups, current, acc = sum(cost), [], [], 0.0
    for layer, c in zip(layers, cost):
        current.append(layer)
        acc += c
        if acc >= total * (len(groups) + 1) / parts and len(groups) < parts - 1:
            groups.append(current)
            current = []
    return [g for g in groups + [current] if g]


def port_many(
    inputs, source, target, outdir, *, results=None, ray=None, workers=None, cache_dir=None, transfer=None,
    quiet=False, max_retries=executors.DEFAULT_RETRIES, **options,
) -> CatalogReport:  # fmt: skip
    """Port every LoRA of ``inputs`` (paths of LoRA files, folders, MANIFEST.jsonl files) from
    ``source`` to ``target`` into ``outdir``/<stem>.safetensors; see the module docstring.
    ``ray``: None (a process pool on this machine), "local" (a private Ray instance here) or a
    Ray cluster address; ``workers``: tasks at once (default: the CPUs); ``cache_dir``: the
    subspace cache (default ``outdir``/.subspace-cache); ``transfer``: "files" or
    "object-store" (default: object-store when joining a cluster by address); ``results``:
    write the rows as JSONL there; ``options``: those of `loraport.port`. Returns the
    CatalogReport (its exit_status is the command's)."""
    t_start = time.perf_counter()
    unknown = sorted(set(options) - set(SUBSPACE_OPTIONS) - set(PER_LORA_OPTIONS) - {"max_vram"})
    if unknown:
        raise TypeError(f"loraport.port_many: unknown options {unknown}")
    if "max_vram" in options:
        options["max_memory"] = options.pop("max_vram")
    transfer = transfer or ("object-store" if ray not in (None, "local") else "files")
    if transfer not in TRANSFERS or (transfer == "object-store" and ray is None):
        raise ValueError(f"loraport.port_many: transfer must be one of {TRANSFERS} (object-store with Ray only)")
    outdir = os.path.abspath(os.fspath(outdir))
    os.makedirs(outdir, exist_ok=True)
    cache_dir = os.path.abspath(os.fspath(cache_dir or os.path.join(outdir, ".subspace-cache")))
    subspace_options = {k: v for k, v in options.items() if k in SUBSPACE_OPTIONS}
    settings = PortOptions.from_args(cache_dir=cache_dir, **{k: v for k, v in options.items() if k not in ("format", "arch")})
    entries = read_inputs(inputs, outdir)
    rows: list[dict | None] = [None] * len(entries)
    for i, e in enumerate(entries):
        if e.error is not None:
            rows[i] = _row(e, "bad-input", e.error)
        elif os.path.exists(e.out):
            rows[i] = _row(e, "ported", reused=True)
    todo = [i for i, r in enumerate(rows) if r is None]

    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    runner = executors.ProcessPool(workers, max_retries) if ray is None else executors.RayCluster(ray, workers, max_retries)
    start_seconds = time.perf_counter() - t0
    shipping = transfer == "object-store"
    threads = max(1, executors.cpu_count() // runner.slots()) if ray in (None, "local") else None
    report = CatalogReport([], runner.name, runner.slots(), transfer, {"start": start_seconds})
    bar = tqdm(total=len(entries), unit="LoRA", desc="port-many", disable=quiet)
    bar.update(len(entries) - len(todo))
    try:
        # plan: which base layers each LoRA needs (read on the workers: a catalog can be large)
        t0 = time.perf_counter()
        lora_refs = {}
        if shipping:
            for i in todo:
                sidecar = os.path.join(os.path.dirname(entries[i].lora), "adapter_config.json")
                files = [entries[i].lora] + ([sidecar] if os.path.exists(sidecar) else [])
                try:
                    lora_refs[i] = runner.put(_pack(files))
                except OSError as e:
                    rows[i] = _row(entries[i], "bad-input", f"{entries[i].lora}: cannot read ({e.strerror})")
            todo = [i for i in todo if rows[i] is None]
        batches = [todo[j :: runner.slots()] for j in range(min(len(todo), runner.slots()))]
        plan_tasks = [([(i, entries[i]) for i in b], source, target, settings, options.get("arch", "auto"), threads,
                       {i: lora_refs[i] for i in b} if shipping else None) for b in batches]  # fmt: skip
        needs: dict[int, list[tuple]] = {}  # entry -> cache keys of its layers
        distinct: dict[tuple, BaseLayer] = {}
        for b, result in runner.run(_plan_task, plan_tasks):
            if isinstance(result, Exception):
                for i in batches[b]:
                    rows[i] = _row(entries[i], "error", f"planning failed: {result!r}")
                continue
            for i, found, error, seconds in result:
                if error is not None:
                    rows[i] = _row(entries[i], *error, seconds=seconds)
                    continue
                needs[i] = [keys for keys, _ in found]
                for keys, layer in found:
                    distinct.setdefault(keys, layer)
        bar.update(sum(1 for i in todo if rows[i] is not None))
        todo = [i for i in todo if rows[i] is None]
        report.seconds["plan"] = time.perf_counter() - t0

        # phase 1: every distinct layer missing from the cache, once, in groups over the workers
        t0 = time.perf_counter()
        cache = SubspaceCache(cache_dir)
        keys_of = {id(layer): keys for keys, layer in distinct.items()}
        missing = [l for keys, l in distinct.items() if not all(os.path.exists(cache.path(k)) for k in keys)]
        groups = worker_groups(missing, runner.slots()) if missing else []
        fill_tasks = [
            (g, source, target, subspace_options, threads, None if shipping else cache_dir,
             [os.path.basename(cache.path(k)) for l in g for k in keys_of[id(l)]] if shipping else None)
            for g in groups
        ]  # fmt: skip
        if not quiet and groups:
            bar.write(f"phase 1: subspaces of {len(missing)} base layers ({len(distinct)} distinct in the catalog) "
                      f"in {len(groups)} tasks")  # fmt: skip
        for _, done in runner.run(_fill_task, fill_tasks):
            if isinstance(done, InputError):  # a broken base weight: no LoRA can be ported
                raise done
            if isinstance(done, Exception):
                raise RuntimeError(f"loraport.port_many: phase 1 failed: {done!r}") from done
            report.subspaces_computed += done["computed"]
            if done["files"]:
                _unpack(done["files"], cache_dir)
        report.layers, report.phase1_tasks = len(distinct), len(groups)
        report.seconds["phase1"] = time.perf_counter() - t0

        # phase 2: every LoRA on its own, from the cache
        t0 = time.perf_counter()
        entry_refs = {}
        if shipping:
            for keys in {k for i in todo for pair in needs[i] for k in pair}:
                with open(cache.path(keys), "rb") as f:
                    entry_refs[os.path.basename(cache.path(keys))] = runner.put(f.read())
        port_options = {k: v for k, v in options.items()}
        port_tasks = []
        for i in todo:
            shipped = None
            if shipping:
                names = {os.path.basename(cache.path(k)) for pair in needs[i] for k in pair}
                shipped = {"lora": lora_refs[i], "entries": [(n, entry_refs[n]) for n in sorted(names)]}
            port_tasks.append((entries[i], source, target, port_options, threads, cache_dir, shipped))
        for j, row in runner.run(_port_task, port_tasks):
            i = todo[j]
            if isinstance(row, Exception):
                row = _row(entries[i], "error", f"{entries[i].lora}: {row}")
            if row.get("files"):
                _unpack(row.pop("files"), os.path.dirname(entries[i].out))
            row.pop("files", None)
            rows[i] = row
            bar.update(1)
        report.seconds["phase2"] = time.perf_counter() - t0
    finally:
        bar.close()
        runner.close()
    report.rows = rows
    report.seconds["total"] = time.perf_counter() - t_start
    if results is not None:
        report.write_results(results)
    return report
