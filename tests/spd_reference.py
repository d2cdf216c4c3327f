"""Sync-Point Drop written out by hand on one process: the independent oracle for the spd plan."""

import torch
import torch.nn.functional as F


def spd_forward(model, idx, targets, tp, dropped):
    """Logits and loss of `model` with the sync point of blocks `dropped` dropped at degree `tp`."""
    config = model.config
    B, T = idx.shape
    C, H = config.n_embd, config.n_head
    hs, heads, hidden = C // H, H // tp, 4 * C // tp
    tr = model.transformer
    x = tr.wte(idx) + tr.wpe(torch.arange(T))
    for i, block in enumerate(tr.h):
        if i not in dropped:
            x = block(x)
            continue
        attn, mlp = block.attn, block.mlp
        q, k, v = attn.c_attn(block.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, H, hs).transpose(1, 2) for t in (q, k, v))
        b_a = attn.c_proj.bias if attn.c_proj.bias is not None else 0.0
        b_m = mlp.c_proj.bias if mlp.c_proj.bias is not None else 0.0
        total = 0.0
        for r in range(tp):
            own = slice(r * heads, (r + 1) * heads)
            y = F.scaled_dot_product_attention(q[:, own], k[:, own], v[:, own], is_causal=True)
            y = y.transpose(1, 2).reshape(B, T, heads * hs)
            p = y @ attn.c_proj.weight[:, r * heads * hs:(r + 1) * heads * hs].T
            cols = slice(r * hidden, (r + 1) * hidden)
            fc_bias = mlp.c_fc.bias[cols] if mlp.c_fc.bias is not None else None
            u = F.gelu(F.linear(block.ln_2(x + p + b_a), mlp.c_fc.weight[cols], fc_bias))
            total = total + p + u @ mlp.c_proj.weight[:, cols].T
        x = x + b_a + b_m + total
    logits = model.lm_head(tr.ln_f(x))
    loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1)) if targets is not None else None
    return logits, loss
