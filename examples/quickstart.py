"""The bundled example: port a LoRA on three layers of a small Hunyuan-Video-shaped model from
a base release to an "upgraded" one, with the engine-core ops, in a second on a CPU.

Source base W_s, target base W_t = W_s + a low-rank-ish drift (a continued-training pattern);
LoRA dW = up @ down. Per layer: subspaces of W_s and W_t by batched rsvd, their similarity,
and dW projected onto the target's subspaces (LoRA-X: U_t U_t^T dW V_t V_t^T) as a LoRA of
the same rank."""

import torch

import loraport

torch.manual_seed(0)
width, rank, subspace_rank = 256, 8, 64
layers = {  # name: [out, in] at width 256 (full size: hidden 3072)
    "double_blocks.0.img_attn_qkv": (3 * width, width),
    "double_blocks.0.img_attn_proj": (width, width),
    "double_blocks.0.img_mlp.fc1": (4 * width, width),
}


def base_weight(out_features, in_features):
    """A weight with a decaying spectrum, like trained layers have."""
    U = torch.linalg.qr(torch.randn(out_features, in_features)).Q
    V = torch.linalg.qr(torch.randn(in_features, in_features)).Q
    spectrum = torch.arange(1, in_features + 1, dtype=torch.float32) ** -0.7
    return (U * spectrum) @ V.mT


print(f"{'layer':32s} {'shape':>10s} {'sim(U)':>7s} {'sim(V)':>7s} {'kept':>6s}")
for name, (m, n) in layers.items():
    W_source = base_weight(m, n).bfloat16()
    W_target = (W_source.float() + 0.02 * torch.randn(m, 16) @ torch.randn(16, n) / 16).bfloat16()
    # One batched rsvd call for both releases (bf16 in, fp32 math): [2, m, n].
    U, S, V = loraport.rsvd(torch.stack([W_source, W_target]), subspace_rank, method="krylov", seed=0)
    # A LoRA that lives mostly in the source's dominant subspace (as trained adapters do).
    up = U[0, :, :rank] @ torch.randn(rank, rank) * 0.1 + 0.002 * torch.randn(m, rank)
    down = torch.randn(rank, rank) @ V[0, :, :rank].mT
    up2, down2 = loraport.project_lora(up, down, U[1], V[1])  # onto the target's subspaces
    sim_u = loraport.subspace_similarity(U[0], U[1]).item()
    sim_v = loraport.subspace_similarity(V[0], V[1]).item()
    kept = torch.linalg.matrix_norm(up2 @ down2) / torch.linalg.matrix_norm(up @ down)
    print(f"{name:32s} {f'{m}x{n}':>10s} {sim_u:7.3f} {sim_v:7.3f} {kept.item():6.1%}")
print(f"loraport {loraport.__version__}: ported {len(layers)} layers (rank {rank} -> {up2.shape[-1]})")
