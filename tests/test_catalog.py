"""`loraport port-many` / loraport.port_many on the embedded process pool and on real Ray (a local
instance and a two-node cluster on 127.0.0.1): outputs bit-identical to single `loraport port`
runs, every base subspace computed once (phase 1) and none in phase 2, a corrupted LoRA reported
while the others are done, a worker killed by its PID mid-run retried, a rerun reusing what
exists. Ray clusters bind 127.0.0.1, use 1 CPU and a 100 MB object store per node, and are shut
down by their fixture even when a test fails. Every wait is bounded."""

import json
import os
import shutil
import signal
import threading
import time

import pytest
import torch
from safetensors import safe_open

import loraport
from loraport import catalog, cli, executors
from loraport.testing import tiny

ARCH = "hunyuan-video"
OPTIONS = dict(subspace_rank=4, variant="target", power_iters=2)  # the projection: outputs depend on the subspaces
CLI_OPTIONS = ["--subspace-rank", "4", "--variant", "target", "--power-iters", "2"]
GOOD = ("kohya_a", "kohya_b", "comfy_c", "diffusers_d")
TIMEOUT = 240  # seconds any one catalog run may take here (2 shared cores)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Source and target bases, four good LoRAs in three formats, a truncated (corrupted) one,
    and the outputs of single `loraport port` runs as references."""
    d = tmp_path_factory.mktemp("catalog")
    source = tiny.base_model(ARCH, width=16, seed=0)
    paths = {
        "source": tiny.save_base(source, str(d / "source.safetensors")),
        "target": tiny.save_base(tiny.related(source, seed=5), str(d / "target.safetensors")),
        "loras": str(d / "loras"),
    }
    os.makedirs(paths["loras"])
    for i, name in enumerate(GOOD):
        fmt = name.split("_")[0]
        lora = tiny.lora(ARCH, source, fmt=fmt, rank=3 + i, alpha=2.0 if fmt == "kohya" else None, seed=20 + i)
        tiny.save_base(lora, os.path.join(paths["loras"], name + ".safetensors"))
    with open(os.path.join(paths["loras"], "kohya_a.safetensors"), "rb") as f:
        data = f.read()
    with open(os.path.join(paths["loras"], "broken.safetensors"), "wb") as f:
        f.write(data[: len(data) // 2])  # a download cut off halfway
    reference = d / "reference"
    reference.mkdir()
    for name in GOOD:
        status = cli.main(["port", os.path.join(paths["loras"], name + ".safetensors"), "--source", paths["source"],
                           "--target", paths["target"], "-o", str(reference / (name + ".safetensors")), "--quiet",
                           *CLI_OPTIONS])  # fmt: skip
        assert status == 0
    paths["reference"] = str(reference)
    return paths


def same_file_content(a, b) -> bool:
    """Bit-identical tensors and equal header metadata (safetensors writes the metadata map in
    a per-process hash order, so the files' bytes may differ)."""
    with safe_open(a, "pt") as fa, safe_open(b, "pt") as fb:
        if fa.metadata() != fb.metadata() or set(fa.keys()) != set(fb.keys()):
            return False
        return all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys())


def check_catalog(rep, files, outdir, results=None):
    """The four good LoRAs ported, bit-identical to single runs, from the cache only; the broken
    one reported as bad input; exit status 2."""
    rows = {os.path.basename(r["out"]).removesuffix(".safetensors"): r for r in rep.rows}
    assert rows["broken"]["status"] == "bad-input" and "broken.safetensors" in rows["broken"]["message"]
    assert not os.path.exists(os.path.join(outdir, "broken.safetensors"))
    for name in GOOD:
        row = rows[name]
        assert row["status"] == "ported", row
        assert row["out"] == os.path.join(outdir, name + ".safetensors") and row["seconds"] > 0
        assert row["subspaces_computed"] == 0 and row["layers_ported"] > 0
        assert same_file_content(row["out"], os.path.join(files["reference"], name + ".safetensors")), name
    assert rep.exit_status == 2
    assert not [f for f in os.listdir(outdir) if f.endswith(".tmp")]
    if results is not None:
        with open(results) as f:
            assert [json.loads(line) for line in f] == rep.rows


def check_phase1_once(rep, cache_dir):
    """Every base subspace computed once: 2 per distinct layer, one cache file each."""
    assert rep.layers > 0 and rep.subspaces_computed == 2 * rep.layers
    assert len([f for f in os.listdir(cache_dir) if f.endswith(".safetensors")]) == 2 * rep.layers


@pytest.mark.slow
def test_fill_cache_computes_each_layer_once_and_port_reads_it(files, tmp_path):
    lora = os.path.join(files["loras"], "kohya_a.safetensors")
    layers = catalog.base_layers(lora, files["source"], files["target"])
    half, cache = layers[: len(layers) // 2], str(tmp_path / "cache")
    subspace = {k: v for k, v in OPTIONS.items() if k in catalog.SUBSPACE_OPTIONS}
    assert catalog.fill_cache(half, files["source"], files["target"], cache, **subspace)["computed"] == 2 * len(half)
    rest = catalog.fill_cache(layers, files["source"], files["target"], cache, **subspace)["computed"]
    assert rest == 2 * (len(layers) - len(half))
    out = str(tmp_path / "out.safetensors")
    rep = loraport.port(lora, files["source"], files["target"], out, cache_dir=cache, quiet=True, **OPTIONS)
    assert [r.subspaces_from_cache for r in rep.rows if r.similarity is not None] == [2] * len(layers)
    assert same_file_content(out, os.path.join(files["reference"], "kohya_a.safetensors"))


def test_groups_balance_cost_and_keep_shapes_together():
    layers = [catalog.BaseLayer("model", f"m{i}", (), (), (m, 16), (m, 16), 4) for i, m in enumerate([48] * 6 + [16] * 6)]
    groups = catalog.worker_groups(layers, 2)
    assert sorted(len(g) for g in groups) == [4, 8]  # cost 6·48 + 6·16 = 384 -> 192 each: six 16s + two 48s | four 48s
    assert all(len({l.tgt_shape for l in g}) <= 2 for g in groups)
    assert catalog.worker_groups(layers[:1], 4) == [layers[:1]]


def test_manifest_lines_and_output_names(tmp_path):
    manifest = tmp_path / "list.jsonl"
    lines = [{"lora": "a.safetensors", "rank": 2}, {"lora": "sub/a.safetensors"}, {"lora": "b.safetensors", "out": "x.safetensors"},
             {"lora": "c.safetensors", "subspace_rank": 8}, {"lora": "d.safetensors", "colour": 1}]  # fmt: skip
    manifest.write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    entries = catalog.read_inputs([str(manifest)], tmp_path / "out")
    assert entries[0].options == {"rank": 2} and entries[0].out == str(tmp_path / "out" / "a.safetensors")
    assert "also the output of" in entries[1].error
    assert entries[2].out == str(tmp_path / "out" / "x.safetensors") and entries[2].error is None
    assert "catalog-wide options ['subspace_rank']" in entries[3].error
    assert "unknown keys ['colour']" in entries[4].error
    assert entries[5].error.startswith(f"{manifest}:6:")


@pytest.mark.slow
def test_embedded_pool_ports_the_catalog_once_and_resumes(files, tmp_path):
    outdir, cache_dir, results = str(tmp_path / "out"), str(tmp_path / "cache"), str(tmp_path / "results.jsonl")
    manifest = tmp_path / "catalog.jsonl"  # the folder's LoRAs, plus one with nothing to port (no layer is identical in both bases)
    manifest.write_text(json.dumps({"lora": os.path.join(files["loras"], "kohya_b.safetensors"), "out": "strict.safetensors",
                                    "min_similarity": 1.0}) + "\n")  # fmt: skip
    rep = catalog.port_many([files["loras"], str(manifest)], files["source"], files["target"], outdir, workers=2,
                            cache_dir=cache_dir, results=results, quiet=True, **OPTIONS)  # fmt: skip
    check_catalog(rep, files, outdir, results)
    check_phase1_once(rep, cache_dir)
    strict = rep.rows[-1]
    assert strict["status"] == "nothing-to-port" and "no module was ported" in strict["message"]
    assert rep.runner == "process pool" and rep.workers == 2 and rep.phase1_tasks == 2
    assert "port-many summary" in rep.table() and "nothing to port" in rep.table()

    # a rerun reuses every output and computes nothing
    again = catalog.port_many([files["loras"]], files["source"], files["target"], outdir, workers=2, cache_dir=cache_dir,
                              quiet=True, **OPTIONS)  # fmt: skip
    reused = {os.path.basename(r["lora"]) for r in again.rows if r["reused"]}
    assert reused == {n + ".safetensors" for n in GOOD} and again.subspaces_computed == 0 and again.phase1_tasks == 0
    assert again.exit_status == 2  # the broken file is still broken
    good = [os.path.join(files["loras"], n + ".safetensors") for n in GOOD]
    clean = catalog.port_many(good, files["source"], files["target"], outdir, cache_dir=cache_dir, quiet=True, **OPTIONS)
    assert clean.exit_status == 0 and all(r["reused"] for r in clean.rows)


def pool_workers():
    """PIDs of this process's live process-pool workers (spawned children running
    multiprocessing's spawn_main; not its resource tracker), from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmd = f.read().decode(errors="replace")
            except OSError:
                continue
            if int(fields[1]) == os.getpid() and fields[0] not in "ZX" and "spawn_main" in cmd:
                found.append(int(entry))
    return found


def ray_task_processes(names=("_plan_task", "_fill_task", "_port_task")):
    """PIDs of Ray worker processes running one of loraport's catalog tasks now (Ray names the
    process after the task it runs: ray::_port_task)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmd = f.read().decode(errors="replace")
            except OSError:
                continue
            if any(cmd.startswith("ray::" + n) for n in names):
                found.append(int(entry))
    return found


def run_and_kill(find_victims, run):
    """Run ``run()`` in a thread for at most TIMEOUT seconds; kill the first process
    ``find_victims()`` names (SIGKILL, by its PID) while it runs, if any; returns (the run's
    result, the PIDs killed)."""
    result, killed = {}, []
    thread = threading.Thread(target=lambda: result.setdefault("rep", run()), daemon=True)
    thread.start()
    deadline = time.monotonic() + TIMEOUT
    while thread.is_alive() and not killed and time.monotonic() < deadline:
        for pid in find_victims():
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                break
            except ProcessLookupError:
                continue
        time.sleep(0.01)
    thread.join(TIMEOUT)
    assert not thread.is_alive(), "the catalog did not finish in time"
    assert "rep" in result, "the catalog raised (see the thread's traceback above)"
    return result["rep"], killed


def bounded(run):
    """``run()``, failing the test after TIMEOUT seconds instead of hanging it."""
    return run_and_kill(list, run)[0]


@pytest.mark.slow
def test_embedded_pool_survives_a_killed_worker(files, tmp_path):
    outdir = str(tmp_path / "out")
    rep, killed = run_and_kill(
        pool_workers,
        lambda: catalog.port_many([files["loras"]], files["source"], files["target"], outdir, workers=2,
                                  cache_dir=str(tmp_path / "cache"), quiet=True, **OPTIONS),  # fmt: skip
    )
    assert killed, "no pool worker was seen to kill"
    check_catalog(rep, files, outdir)


@pytest.mark.slow
def test_cli_ray_local(files, tmp_path, capsys):
    pytest.importorskip("ray")
    outdir, results = str(tmp_path / "out"), str(tmp_path / "results.jsonl")
    status = bounded(lambda: cli.main(["port-many", files["loras"], "--source", files["source"], "--target", files["target"],
                                       "-o", outdir, "--ray", "local", "--workers", "2", "--results", results, *CLI_OPTIONS]))
    assert status == 2  # the broken LoRA
    with open(results) as f:
        rows = [json.loads(line) for line in f]
    rep = catalog.CatalogReport(rows, "Ray", 2, "files")
    check_catalog(rep, files, outdir, results)
    out = capsys.readouterr().out
    assert "Ray, 2 workers" in out and "bad-input" in out


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A head and a second node on 127.0.0.1, one CPU and a 100 MB object store each, workers
    able to import loraport; shut down on teardown whatever happened."""
    ray = pytest.importorskip("ray")
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    # Ray turns a 127.0.0.1 address into the machine's own IP before connecting, where nothing
    # listens; with "clusters" off it keeps to the loopback address
    clusters = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False

    package_root = os.path.dirname(os.path.dirname(os.path.abspath(loraport.__file__)))
    old_path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = package_root + (os.pathsep + old_path if old_path else "")
    node = dict(num_cpus=1, object_store_memory=100 << 20, node_ip_address="127.0.0.1")
    cluster = Cluster(initialize_head=False)
    try:
        cluster.add_node(include_dashboard=False, **node)
        cluster.add_node(**node)
        cluster.wait_for_nodes(timeout=120)
        ray.init(address=cluster.address, log_to_driver=False)  # fails here rather than in a test
        ray.get(ray.remote(lambda: 1).remote(), timeout=120)
        ray.shutdown()  # each test's port_many joins the cluster by its address
        yield cluster
    finally:
        if ray.is_initialized():
            ray.shutdown()
        scratch = [catalog.node_scratch(node.node_id) for node in cluster.list_all_nodes()]
        cluster.shutdown()
        for folder in scratch:  # the nodes' copies of cache entries (transfer="object-store")
            shutil.rmtree(folder, ignore_errors=True)
        ray_constants.ENABLE_RAY_CLUSTER = clusters
        if old_path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old_path


@pytest.mark.slow
@pytest.mark.parametrize("transfer", ["files", "object-store"])
def test_two_node_ray_cluster(ray_cluster, files, tmp_path, transfer):
    outdir, cache_dir = str(tmp_path / "out"), str(tmp_path / "cache")
    rep = bounded(lambda: catalog.port_many([files["loras"]], files["source"], files["target"], outdir, ray=ray_cluster.address,
                                            cache_dir=cache_dir, transfer=transfer, quiet=True, **OPTIONS))
    assert rep.runner == "Ray" and rep.workers == 2 and rep.transfer == transfer
    check_catalog(rep, files, outdir)
    check_phase1_once(rep, cache_dir)  # object-store: the driver keeps what the nodes computed


@pytest.mark.slow
def test_ray_local_starts_its_own_instance_beside_a_running_cluster(ray_cluster, files, tmp_path):
    """`--ray local` while another Ray cluster runs on this machine (which ray.init would join on
    its own): a private one-worker instance, not the two-node cluster."""
    outdir = str(tmp_path / "out")
    rep = bounded(lambda: catalog.port_many([files["loras"]], files["source"], files["target"], outdir, ray="local",
                                            workers=1, cache_dir=str(tmp_path / "cache"), quiet=True, **OPTIONS))
    assert rep.runner == "Ray" and rep.workers == 1
    check_catalog(rep, files, outdir)


@pytest.mark.slow
def test_two_node_ray_cluster_survives_a_killed_worker(ray_cluster, files, tmp_path):
    outdir = str(tmp_path / "out")
    rep, killed = run_and_kill(
        ray_task_processes,
        lambda: catalog.port_many([files["loras"]], files["source"], files["target"], outdir, ray=ray_cluster.address,
                                  cache_dir=str(tmp_path / "cache"), transfer="files", quiet=True, **OPTIONS),  # fmt: skip
    )
    assert killed, "no Ray task process was seen to kill"
    check_catalog(rep, files, outdir)


@pytest.mark.slow
def test_pool_gives_up_on_a_task_that_kills_its_worker_every_time():
    pool = executors.ProcessPool(1, max_retries=1)
    try:
        results = dict(pool.run(os._exit, [(1,)]))  # the worker process exits inside the task
    finally:
        pool.close()
    assert isinstance(results[0], executors.WorkerDied) and "died 2 times" in str(results[0])
