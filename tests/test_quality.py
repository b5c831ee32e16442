"""The transfer-quality benchmark in miniature (seconds): tiny Llama-named bases trained here,
a LoRA trained on v1 for a task v1 lacks, written as a kohya file and ported by loraport.port to
a continued-trained v2 (related) and to a v2 from another seed (unrelated). Scores are exact
accuracies on a fixed evaluation set, deterministic for the fixed seeds and one torch thread.
The model and its training are loraport.testing.llama (the benchmark's too); the two upgrades
and the sizes are written here.

What it asserts is what benchmarks/quality measured (benchmarks/quality/README.md): a projected
LoRA keeps a clear part of its effect on the related v2 at full subspace rank, where it IS the
copy on square layers, and less at a quarter of the width; it never beats copying the LoRA
unchanged (a projection can only remove parts of ΔW). So loraport's defaults gate at
k = width/4, where the subspace similarity separates the unrelated pair, and copy the LoRA where
the gate passes: on the related v2 that scores exactly the copy, the unrelated one is skipped."""

import json
import os
import subprocess
import sys

import pytest
import torch

from loraport import formats
from loraport.pipeline import port
from loraport.testing import llama as M
from loraport.testing import tiny

CFG = M.Config(width=32, ffn=64, length=4)  # layers 2, heads 4
WIDTH = CFG.width
BASE_TASKS, LORA_TASK = ("copy", "reverse"), "swap"  # the LoRA learns a skill no base has
PRETRAIN_STEPS, UPGRADE_STEPS, UPGRADE_LR, LORA_STEPS, LORA_RANK, LORA_LR = 120, 40, 1e-3, 60, 4, 1e-2
BATCH, EVAL_SEQUENCES = 32, 256


def recipe(tasks, steps, seed, **kw) -> M.Recipe:
    return M.Recipe(tuple(tasks), steps, batch=BATCH, seed=seed, **kw)


def bases(seed: int) -> dict[str, dict[str, torch.Tensor]]:
    """v1 trained on the base tasks; "a": v1 trained further on shifted data (Zipf-skewed digits)
    plus a third task, at a third of the peak learning rate (a continued-training release);
    "c": the v1 recipe from another seed (unrelated weights)."""
    v1 = M.train(M.init_weights(CFG, seed), CFG, recipe(BASE_TASKS, PRETRAIN_STEPS, seed))
    continued = recipe((*BASE_TASKS, "sort"), UPGRADE_STEPS, seed + 10, skew=1.0, lr=UPGRADE_LR)
    reseeded = M.train(M.init_weights(CFG, seed + 1000), CFG, recipe(BASE_TASKS, PRETRAIN_STEPS, seed + 1000))
    return {"v1": v1, "a": M.train(v1, CFG, continued), "c": reseeded}


def cli_port(lora: str, source: str, target: str, out: str) -> dict:
    """``python -m loraport port`` (the real CLI, its defaults) in a subprocess on the loraport
    under test; its JSON report, with "out" None when the gate skipped every layer (exit 3)."""
    report = out + ".json"
    env = {**tiny.subprocess_env(), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    cmd = [sys.executable, "-m", "loraport", "port", lora, "--source", source, "--target", target,
           "-o", out, "--report", report, "--quiet"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    skipped_all = proc.returncode == 3 and "no module was ported" in proc.stderr
    assert proc.returncode == 0 or skipped_all, (proc.returncode, proc.stderr)
    with open(report) as f:
        doc = json.load(f)
    if skipped_all:
        doc["out"] = None
    return doc


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The same training bit for bit on any machine with this torch; also much faster for these
    tiny ops on a loaded 2-core machine than two threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    torch.manual_seed(0)
    models = bases(0)
    factors = M.train_lora(models["v1"], CFG, recipe((LORA_TASK,), LORA_STEPS, 7, lr=LORA_LR), LORA_RANK)
    folder = tmp_path_factory.mktemp("quality")
    paths = {k: tiny.save_base(w, str(folder / f"{k}.safetensors")) for k, w in models.items()}
    paths["lora"] = str(folder / "lora.safetensors")
    formats.write_lora(formats.read_lora(M.lora_state_dict(factors, "kohya"), arch="llama"), paths["lora"])
    return models, paths, folder


def score(w, lora=None) -> float:
    return M.accuracy(w, CFG, LORA_TASK, lora, n=EVAL_SEQUENCES)


def test_ported_lora_keeps_its_effect_on_a_related_upgrade(trained):
    models, paths, folder = trained
    v1, v2 = models["v1"], models["a"]
    gain_v1 = score(v1, M.load_lora(paths["lora"], v1)) - score(v1)
    assert gain_v1 > 0.15  # the LoRA learned its task
    alone = score(v2)
    copied = score(v2, M.load_lora(paths["lora"], v2)) - alone
    for variant in ("target", "source-then-target"):
        out = str(folder / f"ported_{variant}.safetensors")
        rep = port(paths["lora"], paths["v1"], paths["a"], out, variant=variant, subspace_rank=WIDTH, quiet=True)
        assert {r.action for r in rep.rows} == {"ported"}
        ported = score(v2, M.load_lora(out, v2)) - alone
        assert ported > 0.4 * gain_v1, (variant, ported, gain_v1)
        assert ported > 0.5 * copied, (variant, ported, copied)
        assert ported < copied + 0.05, (variant, ported, copied)  # a projection cannot add to the effect
    # at a quarter of the width, where the gate works, the projection keeps much less
    out = str(folder / "quarter.safetensors")
    port(paths["lora"], paths["v1"], paths["a"], out, variant="target", subspace_rank=WIDTH // 4, quiet=True)
    quarter = score(v2, M.load_lora(out, v2)) - alone
    assert quarter < 0.6 * copied, (quarter, copied)
    # the defaults (through the real CLI): every layer passes the gate and is carried over
    out = str(folder / "default.safetensors")
    rep = cli_port(paths["lora"], paths["v1"], paths["a"], out)
    assert {r["action"] for r in rep["layers"]} == {"ported"} and rep["settings"]["variant"] == "copy"
    assert score(v2, M.load_lora(out, v2)) - alone == copied


def test_port_at_full_subspace_rank_copies_square_layers_only(trained):
    models, paths, folder = trained
    out = str(folder / "full.safetensors")
    port(paths["lora"], paths["v1"], paths["a"], out, variant="target", subspace_rank=2 * WIDTH, min_similarity=0.0,
         quiet=True)  # fmt: skip
    copied, ported = M.load_lora(paths["lora"], models["a"]), M.load_lora(out, models["a"])
    for name, (up, down) in copied.items():
        dw, dw_ported = up.double() @ down.double(), ported[name][0].double() @ ported[name][1].double()
        err = torch.linalg.matrix_norm(dw_ported - dw) / torch.linalg.matrix_norm(dw)
        if dw.shape[0] == dw.shape[1]:  # U, V span all of R^n: U U^T ΔW V V^T = ΔW (rsvd round-off)
            assert err <= 1e-4, name
        else:  # k <= min(m, n): the part of ΔW in the null space of W_t (MLP layers) is cut off
            assert err > 0.1, name


def test_similarity_gate_tells_related_from_unrelated(trained):
    _, paths, folder = trained
    k = WIDTH // 4  # similarity of random k-dim subspaces of R^n is about k/n: 0.25 here
    related = port(paths["lora"], paths["v1"], paths["a"], str(folder / "rel.safetensors"), subspace_rank=k, quiet=True)
    assert all(r.similarity > 0.9 and r.action == "ported" for r in related.rows)
    # The unrelated pair through the real CLI with its defaults (k = min(64, width / 4) = k here,
    # min similarity 0.5): every layer under the gate, exit status 3, no file.
    out = str(folder / "unrelated.safetensors")
    rep = cli_port(paths["lora"], paths["v1"], paths["c"], out)
    assert all(r["subspace_rank"] == [k, k] for r in rep["layers"])
    assert rep["out"] is None and not os.path.exists(out)
    assert len(rep["layers"]) == 14
    assert all(r["action"] == "skipped" and r["similarity"] < 0.5 for r in rep["layers"])
