"""The transfer-quality benchmark in miniature (seconds): tiny Llama-named bases trained here,
a LoRA trained on v1 for a task v1 lacks, written as a kohya file and ported by loraport.port to
a continued-trained v2 (related) and to a v2 from another seed (unrelated). Scores are exact
accuracies on a fixed evaluation set, deterministic for the fixed seeds and one torch thread.

What it asserts is what benchmarks/quality measured (benchmarks/quality/README.md): a projected
LoRA keeps a clear part of its effect on the related v2 at full subspace rank, where it IS the
copy on square layers, and less at a quarter of the width; it never beats copying the LoRA
unchanged (a projection can only remove parts of ΔW). So loraport's defaults gate at
k = width/4, where the subspace similarity separates the unrelated pair, and copy the LoRA where
the gate passes: on the related v2 that scores exactly the copy, the unrelated one is skipped."""

import os

import pytest
import torch

from benchmarks.quality import experiment as E
from benchmarks.quality import model as M
from loraport import formats
from loraport.pipeline import port
from loraport.testing import tiny

SETUP = E.Setup(M.Config(width=32, ffn=64, length=4), pretrain_steps=120, upgrade_steps=40, lora_steps=60,
                lora_rank=4, lora_lr=1e-2, eval_sequences=256)  # fmt: skip
WIDTH = SETUP.cfg.width


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
    models = E.bases(SETUP, 0, ("a", "c"))
    recipe = E._recipe(SETUP, (E.LORA_TASK,), SETUP.lora_steps, 7, lr=SETUP.lora_lr)
    factors = M.train_lora(models["v1"], SETUP.cfg, recipe, SETUP.lora_rank)
    folder = tmp_path_factory.mktemp("quality")
    paths = {k: tiny.save_base(w, str(folder / f"{k}.safetensors")) for k, w in models.items()}
    paths["lora"] = str(folder / "lora.safetensors")
    formats.write_lora(formats.read_lora(E.lora_state_dict(factors, "kohya"), arch="llama"), paths["lora"])
    return models, paths, folder


def score(w, lora=None) -> float:
    return M.accuracy(w, SETUP.cfg, E.LORA_TASK, lora, n=SETUP.eval_sequences)


def test_ported_lora_keeps_its_effect_on_a_related_upgrade(trained):
    models, paths, folder = trained
    v1, v2 = models["v1"], models["a"]
    gain_v1 = score(v1, E.load_lora(paths["lora"], v1)) - score(v1)
    assert gain_v1 > 0.15  # the LoRA learned its task
    alone = score(v2)
    copied = score(v2, E.load_lora(paths["lora"], v2)) - alone
    for variant in ("target", "source-then-target"):
        out = str(folder / f"ported_{variant}.safetensors")
        rep = port(paths["lora"], paths["v1"], paths["a"], out, variant=variant, subspace_rank=WIDTH, quiet=True)
        assert {r.action for r in rep.rows} == {"ported"}
        ported = score(v2, E.load_lora(out, v2)) - alone
        assert ported > 0.4 * gain_v1, (variant, ported, gain_v1)
        assert ported > 0.5 * copied, (variant, ported, copied)
        assert ported < copied + 0.05, (variant, ported, copied)  # a projection cannot add to the effect
    # at a quarter of the width, where the gate works, the projection keeps much less
    out = str(folder / "quarter.safetensors")
    port(paths["lora"], paths["v1"], paths["a"], out, variant="target", subspace_rank=WIDTH // 4, quiet=True)
    quarter = score(v2, E.load_lora(out, v2)) - alone
    assert quarter < 0.6 * copied, (quarter, copied)
    # the defaults (through the real CLI): every layer passes the gate and is carried over
    out = str(folder / "default.safetensors")
    rep = E.cli_port(paths["lora"], paths["v1"], paths["a"], out)
    assert {r["action"] for r in rep["layers"]} == {"ported"} and rep["settings"]["variant"] == "copy"
    assert score(v2, E.load_lora(out, v2)) - alone == copied


def test_port_at_full_subspace_rank_copies_square_layers_only(trained):
    models, paths, folder = trained
    out = str(folder / "full.safetensors")
    port(paths["lora"], paths["v1"], paths["a"], out, variant="target", subspace_rank=2 * WIDTH, min_similarity=0.0,
         quiet=True)  # fmt: skip
    copied, ported = E.load_lora(paths["lora"], models["a"]), E.load_lora(out, models["a"])
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
    rep = E.cli_port(paths["lora"], paths["v1"], paths["c"], out)
    assert all(r["subspace_rank"] == [k, k] for r in rep["layers"])
    assert rep["out"] is None and not os.path.exists(out)
    assert len(rep["layers"]) == 14
    assert all(r["action"] == "skipped" and r["similarity"] < 0.5 for r in rep["layers"])
