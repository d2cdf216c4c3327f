"""
No vocabulary padding: a TP degree that does not divide the vocabulary shards it unevenly,
so losses, log-probabilities and gradients are the source model's at every degree.
"""

import json
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import loss_parallel

from distributed import run_distributed
from dtensor_gpt import GPT, GPTConfig, load_checkpoint, parallelize, save_checkpoint
from helpers import as_written_before_index_hashes, compare_with_single_device, full, max_grad_errors, small_config

TOL = 1e-5
NANOGPT = Path(__file__).resolve().parents[1].parent / "shared" / "nanogpt"


@pytest.mark.parametrize("tp, plan", [(2, "megatron-sp"), (3, "megatron"), (4, "megatron"), (4, "megatron-sp")])
def test_65_tokens_at_every_degree(tp, plan):
    """nanoGPT's shakespeare_char vocabulary: 22/22/21 rows at TP=3, 17/17/17/14 at TP=4."""
    r = run_distributed(compare_with_single_device, tp, small_config(vocab_size=65), (2, 16), plan)
    assert r["logits"] < TOL and r["loss"] < TOL and r["last"] < TOL
    worst = max(r["grads"], key=r["grads"].get)
    assert r["grads"][worst] < TOL, f"gradient of {worst} differs by {r['grads'][worst]}"


def _strongly_negative_gpt2(path):
    """A random GPT-2 whose every logit sits near -30, as real GPT-2's do: padding at logit 0 would win."""
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=12, n_embd=48, n_positions=32, vocab_size=101,
                                     activation_function="gelu", resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    hf = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        u = torch.randn(48)
        hf.transformer.ln_f.weight.zero_()
        hf.transformer.ln_f.bias.copy_(u)
        hf.transformer.wte.weight.add_(-30 * u / u.dot(u))
    hf.save_pretrained(path)
    return hf


def _against_single_device(rank, world_size, path, tokens):
    """Loss with and without loss_parallel, real-token log-probabilities and gradients, TP vs one device."""
    config = GPTConfig(**json.loads((Path(path) / "index.json").read_text())["config"])
    reference = GPT(config)
    load_checkpoint(reference, path)
    idx, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    ref_logits, ref_loss = reference(idx, targets)
    ref_loss.backward()
    model = parallelize(GPT(config), init_device_mesh("cpu", (world_size,)), "megatron", loss_parallel=True)
    load_checkpoint(model, path)
    with loss_parallel():
        logits, loss = model(idx, targets)
        loss.backward()
    gathered = parallelize(GPT(config), init_device_mesh("cpu", (world_size,)), "megatron")
    load_checkpoint(gathered, path)
    _, plain_loss = gathered(idx, targets)
    logprobs = torch.log_softmax(full(logits).detach(), -1)
    return dict(
        loss=full(loss).item(), plain_loss=plain_loss.item(), ref_loss=ref_loss.item(),
        vocab=full(logits).shape[-1],
        logprobs=(logprobs - torch.log_softmax(ref_logits.detach(), -1)).abs().max().item(),
        grads=max(max_grad_errors(model, reference).values()),
    )


@pytest.mark.parametrize("tp", [1, 2, 3, 4])
def test_hf_gpt2_with_negative_logits_matches_transformers(tmp_path, tp):
    pytest.importorskip("transformers")
    from dtensor_gpt.reshard import main as reshard

    hf = _strongly_negative_gpt2(tmp_path / "hf")
    tokens = torch.randint(0, 101, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = hf(tokens, labels=tokens)
    assert out.logits.max().item() < -20, "the test model must have strongly negative logits"
    assert reshard([str(tmp_path / "hf"), str(tmp_path / "native"), "--tp", str(tp)]) == 0
    r = run_distributed(_against_single_device, tp, str(tmp_path / "native"), tokens)
    assert r["vocab"] == 101, "no padding column enters the softmax"
    for key in ("loss", "plain_loss", "ref_loss"):
        assert abs(r[key] - out.loss.item()) < TOL, (key, r[key], out.loss.item())
    assert r["logprobs"] < TOL and r["grads"] < TOL


def test_padded_format_1_checkpoint_reads_its_real_rows(tmp_path):
    """A checkpoint from before this rule (vocabulary padded to 68, 65 real) loads as the 65-token model."""
    torch.manual_seed(0)
    padded = GPT(small_config(vocab_size=68))
    save_checkpoint(padded, str(tmp_path / "old"))
    as_written_before_index_hashes(tmp_path / "old", "dtensor_gpt/1", vocab_size_unpadded=65)
    model = GPT(small_config(vocab_size=65))
    load_checkpoint(model, str(tmp_path / "old"))
    assert torch.equal(model.transformer.wte.weight, padded.transformer.wte.weight[:65])
    assert torch.equal(model.transformer.h[1].mlp.c_fc.weight, padded.transformer.h[1].mlp.c_fc.weight)


def _nanogpt_loss_at(rank, world_size, path, tokens):
    from dtensor_gpt.sources import open_source

    config = GPTConfig(**{f: open_source(path).config[f] for f in GPTConfig.__dataclass_fields__})
    model = parallelize(GPT(config), init_device_mesh("cpu", (world_size,)), "megatron", loss_parallel=True)
    load_checkpoint(model, path)
    with torch.no_grad(), loss_parallel():
        return full(model(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())[1]).item()


@pytest.mark.skipif(not NANOGPT.exists(), reason="needs nanoGPT's own model.py in ../shared/nanogpt (the oracle)")
@pytest.mark.parametrize("tp", [2, 4])
def test_nanogpt_ckpt_with_65_characters_gives_nanogpts_loss(tmp_path, tp):
    sys.path.insert(0, str(NANOGPT))
    try:
        import model as nanogpt
    finally:
        sys.path.remove(str(NANOGPT))
    args = dict(n_layer=2, n_head=4, n_embd=32, block_size=32, bias=False, vocab_size=65, dropout=0.0)
    torch.manual_seed(0)
    oracle = nanogpt.GPT(nanogpt.GPTConfig(**args)).eval()
    torch.save({"model": oracle.state_dict(), "model_args": args}, tmp_path / "ckpt.pt")
    tokens = torch.randint(0, 65, (3, 33), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = oracle(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())[1].item()
    assert abs(run_distributed(_nanogpt_loss_at, tp, str(tmp_path / "ckpt.pt"), tokens) - expected) < TOL
