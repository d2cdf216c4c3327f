"""
A plain GPT in the style of nanoGPT: one file, GPT-2 checkpoint key names, no parallelism.

Tensor parallelism is applied from outside by `dtensor_gpt.parallelize`, which leaves this
code untouched; anything written here must therefore make sense on a single device.
"""

import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's cannot drop only the bias)."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, input):
        return F.layer_norm(input, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        # key, query, value projections for all heads, in one batch
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        # output projection
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout

    def forward(self, x, cache=None):
        B, T, C = x.size()  # batch size, sequence length, embedding dimensionality (n_embd)

        # calculate query, key, values for all heads in batch and move head forward to be the batch dim
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:
            # attend over the cache's fixed length; the mask hides the positions not written yet
            k, v, mask = cache.update(k, v)  # (B, nh, L, hs), (B, nh, L, hs), (T, L)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0)
        else:
            # causal self-attention; Self-attend: (B, nh, T, hs) x (B, nh, hs, T) -> (B, nh, T, T)
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=None, dropout_p=self.dropout if self.training else 0, is_causal=True
            )
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all head outputs side by side

        # output projection
        y = self.resid_dropout(self.c_proj(y))
        return y


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        x = self.c_fc(x)
        x = self.gelu(x)
        x = self.c_proj(x)
        x = self.dropout(x)
        return x


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache=None):
        x = x + self.attn(self.ln_1(x), cache=cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class LayerCache:
    """
    One block's keys and values (B, nh, L, hs) for a cache of L positions, allocated by the first
    call (the prompt) and then written in place: every decoding step sees tensors of the same
    shapes, so torch.compile compiles the step once.
    """

    def __init__(self, length):
        self.length = length
        self.k = self.v = None
        self.pos = self.mask = None  # this forward's positions (T,) and visible keys (T, L): KVCache.advance

    def update(self, k, v):
        """Write k, v (B, nh, T, hs) at self.pos; return the whole cache and the keys each query sees."""
        if self.k is None:
            # the prompt, zero-padded to the cache's length: made from k, it has k's device, dtype and layout
            pad = (0, 0, 0, self.length - k.size(2))
            self.k, self.v = F.pad(k, pad), F.pad(v, pad)
        else:
            self.k.index_copy_(2, self.pos, k)
            self.v.index_copy_(2, self.pos, v)
        return self.k, self.v, self.mask


class KVCache:
    """Keys and values of every block for up to `length` positions, so decoding does not recompute the prefix."""

    def __init__(self, n_layer, length):
        self.length = length
        self.layers = [LayerCache(length) for _ in range(n_layer)]
        self.filled = 0

    def __len__(self):
        return self.filled

    def advance(self, t, device):
        """The positions (t,) of the next t tokens, which every layer writes in this forward."""
        assert self.filled + t <= self.length, f"a cache of {self.length} positions cannot take {self.filled + t}"
        pos = torch.arange(self.filled, self.filled + t, dtype=torch.long, device=device)
        mask = torch.arange(self.length, device=device) <= pos[:, None]  # (t, L): causal, and only what is written
        for layer in self.layers:
            layer.pos, layer.mask = pos, mask
        self.filled += t
        return pos


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2 vocab_size of 50257, padded up to nearest multiple of 64 for efficiency
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # True: bias in Linears and LayerNorms, like GPT-2. False: a bit better and faster


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.vocab_size is not None
        assert config.block_size is not None
        self.config = config

        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying: the token embedding and the output projection are one parameter
        self.transformer.wte.weight = self.lm_head.weight

        # init all weights
        self.apply(self._init_weights)
        # apply special scaled init to the residual projections, per GPT-2 paper
        for pn, p in self.named_parameters():
            if pn.endswith('c_proj.weight'):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

        print("number of parameters: %.2fM" % (self.get_num_params() / 1e6,))

    def get_num_params(self, non_embedding=True):
        """
        Return the number of parameters in the model.
        For non-embedding count (default), the position embeddings get subtracted.
        The token embeddings would too, except due to the parameter sharing these
        params are actually used as weights in the final layer, so we include them.
        """
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None, cache=None):
        device = idx.device
        b, t = idx.size()
        start = len(cache) if cache is not None else 0
        assert start + t <= self.config.block_size, f"Cannot forward sequence of length {start + t}, block size is only {self.config.block_size}"
        if cache is not None:
            pos = cache.advance(t, device)  # shape (t), from the cached length on
        else:
            pos = torch.arange(0, t, dtype=torch.long, device=device)  # shape (t)

        # forward the GPT model itself
        tok_emb = self.transformer.wte(idx)  # token embeddings of shape (b, t, n_embd)
        pos_emb = self.transformer.wpe(pos)  # position embeddings of shape (t, n_embd)
        x = self.transformer.drop(tok_emb + pos_emb)
        layers = cache.layers if cache is not None else [None] * len(self.transformer.h)
        for block, layer in zip(self.transformer.h, layers):
            x = block(x, cache=layer)
        x = self.transformer.ln_f(x)

        if targets is not None:
            # if we are given some desired targets also calculate the loss
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        else:
            # inference-time mini-optimization: only forward the lm_head on the very last position
            logits = self.lm_head(x[:, [-1], :])  # note: using list [-1] to preserve the time dim
            loss = None

        return logits, loss

    def crop_block_size(self, block_size):
        """
        Shrink the context to block_size positions (e.g. GPT-2's 1024 for a small dataset's
        shorter sequences): the position embeddings keep their first block_size rows.
        """
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    @classmethod
    def from_pretrained(cls, model_type, override_args=None):
        """
        A GPT with GPT-2's weights, read by Hugging Face transformers. model_type is a GPT-2
        directory (config.json and model.safetensors or pytorch_model.bin; one named 'gpt2'
        in the working directory is found by the name 'gpt2'), or a name ('gpt2',
        'gpt2-medium', 'gpt2-large', 'gpt2-xl') that transformers finds in its cache or
        downloads. The sizes come from config.json; only dropout can be overridden.
        """
        override_args = override_args or {}
        # only dropout can be overridden: every size is the weights' own
        assert all(k == 'dropout' for k in override_args), \
            f"only dropout can be overridden, not {sorted(override_args)}"
        try:
            from transformers import GPT2LMHeadModel
        except ImportError as e:
            raise ImportError("GPT.from_pretrained reads GPT-2 weights with Hugging Face transformers, "
                              "which is not installed: pip install transformers") from e
        print("loading weights from pretrained gpt: %s" % model_type)
        try:
            model_hf = GPT2LMHeadModel.from_pretrained(model_type)
        except OSError as e:
            name = model_type if model_type in {'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl'} else 'gpt2'
            raise OSError(
                f"cannot load GPT-2 weights from {model_type!r}: it is not a GPT-2 directory (config.json and "
                f"model.safetensors or pytorch_model.bin) and transformers could not find or download it "
                f"({str(e).splitlines()[0]}); on a machine with internet run `hf download {name} --local-dir {name}` "
                f"(`huggingface-cli download ...` with older huggingface_hub) or, in Python, "
                f"`GPT2LMHeadModel.from_pretrained('{name}').save_pretrained('{name}')`, copy that directory here "
                f"and pass its path (a directory named {name!r} in the working directory is found by that name)"
            ) from e
        hf = model_hf.config
        config_args = dict(n_layer=hf.n_layer, n_head=hf.n_head, n_embd=hf.n_embd, block_size=hf.n_positions,
                           vocab_size=hf.vocab_size, bias=True)  # GPT-2 always has biases
        print("from its config.json: " + ", ".join(f"{k}={v}" for k, v in config_args.items()))
        if hf.activation_function != 'gelu':
            print(f"note: these weights were trained with activation_function={hf.activation_function!r}; "
                  "this model uses the exact GELU, so its logits differ slightly from transformers'")
        if 'dropout' in override_args:
            print(f"overriding dropout rate to {override_args['dropout']}")
            config_args['dropout'] = override_args['dropout']
        model = cls(GPTConfig(**config_args))

        sd, sd_hf = model.state_dict(), model_hf.state_dict()
        missing = [k for k in sd if k not in sd_hf]
        assert not missing, f"the GPT-2 weights lack {missing}"
        # GPT-2 stores these as Conv1D weights, (in, out): a Linear holds their transpose
        transposed = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')
        with torch.no_grad():
            for k, p in sd.items():
                w = sd_hf[k].t() if k.endswith(transposed) else sd_hf[k]
                assert w.shape == p.shape, f"{k}: GPT-2 has shape {tuple(w.shape)}, this model {tuple(p.shape)}"
                p.copy_(w)
        return model

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """
        AdamW with weight decay on every parameter of two or more dimensions (matmul weights
        and embeddings) and none on biases and LayerNorm weights; fused where torch has it
        and device_type is 'cuda'.
        """
        params = [p for p in self.parameters() if p.requires_grad]
        decay_params = [p for p in params if p.dim() >= 2]
        nodecay_params = [p for p in params if p.dim() < 2]
        optim_groups = [
            {'params': decay_params, 'weight_decay': weight_decay},
            {'params': nodecay_params, 'weight_decay': 0.0},
        ]
        num_decay_params = sum(p.numel() for p in decay_params)
        num_nodecay_params = sum(p.numel() for p in nodecay_params)
        print(f"num decayed parameter tensors: {len(decay_params)}, with {num_decay_params:,} parameters")
        print(f"num non-decayed parameter tensors: {len(nodecay_params)}, with {num_nodecay_params:,} parameters")
        use_fused = 'fused' in inspect.signature(torch.optim.AdamW).parameters and device_type == 'cuda'
        extra_args = dict(fused=True) if use_fused else dict()
        optimizer = torch.optim.AdamW(optim_groups, lr=learning_rate, betas=betas, **extra_args)
        print(f"using fused AdamW: {use_fused}")
        return optimizer

    def estimate_mfu(self, fwdbwd_per_iter, dt):
        """
        Model FLOPs utilization: the FLOPs of fwdbwd_per_iter forward-backward passes of
        block_size tokens in dt seconds, as a fraction of an A100's bfloat16 peak (312 TFLOPS).
        Per token: 6 per parameter plus 12 per layer, head, head dimension and position
        (PaLM, Chowdhery et al. 2022, appendix B).
        """
        N = self.get_num_params()
        cfg = self.config
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.block_size
        flops_per_token = 6 * N + 12 * L * H * Q * T
        flops_per_iter = flops_per_token * T * fwdbwd_per_iter
        flops_achieved = flops_per_iter * (1.0 / dt)  # per second
        return flops_achieved / 312e12

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True, generator=None, on_token=None,
                 sample=None):
        """
        Take a conditioning sequence of indices idx (LongTensor of shape (b,t)) and complete
        the sequence max_new_tokens times, feeding the predictions back into the model each time.
        With use_cache, each step runs only the newest token through the model; once the
        context fills block_size, each step recomputes the cropped window, exactly as without it.
        generator makes the sampling reproducible (every TP rank samples the same token from
        the same logits); on_token is called with each new (b, 1) index tensor as it is produced;
        sample(logits, top_k), if given, picks the next indices (b, 1) from the scaled logits
        in place of the top-k softmax draw below.
        """
        # the cache holds the next power of two positions (at least 16, at most block_size), its
        # unwritten positions masked: generations of any length share a few cache shapes, so a
        # compiled decoding step compiles a few times (7 for GPT-2's 1024) and never per length
        length = min(max(16, 1 << (idx.size(1) + max_new_tokens - 1).bit_length()), self.config.block_size)
        cache = KVCache(len(self.transformer.h), length) if use_cache else None
        for _ in range(max_new_tokens):
            if cache is not None and len(cache) == cache.length:
                cache = None  # a full window slides: positions shift, nothing cached still fits
            if cache is not None and len(cache) > 0:
                idx_cond = idx[:, -1:]
            else:
                # if the sequence context is growing too long we must crop it at block_size
                idx_cond = idx if idx.size(1) <= self.config.block_size else idx[:, -self.config.block_size:]
            logits, _ = self(idx_cond, cache=cache)
            # pluck the logits at the final step and scale by desired temperature
            logits = logits[:, -1, :] / temperature
            if sample is not None:
                idx_next = sample(logits, top_k)
            else:
                # optionally crop the logits to only the top k options
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float('Inf')
                # apply softmax to convert logits to (normalized) probabilities
                probs = F.softmax(logits, dim=-1)
                # sample from the distribution
                idx_next = torch.multinomial(probs, num_samples=1, generator=generator)
            if on_token is not None:
                on_token(idx_next)
            # append sampled index to the running sequence and continue
            idx = torch.cat((idx, idx_next), dim=1)
        return idx
