"""
A model built on the meta device: every rank allocates only its shards, and gets exactly the
single-device model's weights, from a seed or from a checkpoint.
"""

import threading
import time

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.debug import CommDebugMode
from torch.distributed.tensor.parallel import loss_parallel

from distributed import run_distributed
from dtensor_gpt import GPT, GPTConfig, init_weights, load_checkpoint, parallelize, save_checkpoint
from dtensor_gpt.format import CheckpointError
from helpers import fake_process_group, full, local_parameter_bytes, small_config
from plans import PLANS

SEED = 5


def _meta_model(mesh, plan, config):
    with torch.device("meta"):
        model = GPT(config)
    return parallelize(model, mesh, plan, loss_parallel=True)


def _init_every_plan(rank, world_size):
    mesh = init_device_mesh("cpu", (world_size,))
    out = {}
    for plan in PLANS:
        model = _meta_model(mesh, plan, small_config())
        torch.manual_seed(SEED)
        init_weights(model)
        after = torch.rand(4)  # the generator moved as GPT's constructor moves it
        weights = {name: full(p).detach().clone() for name, p in model.named_parameters()}
        out[plan] = weights, after, model.lm_head.weight is model.transformer.wte.weight
    return out


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_weights_from_a_seed_equal_the_single_device_models(tp):
    torch.manual_seed(SEED)
    reference = GPT(small_config())
    after = torch.rand(4)
    if tp == 1:  # no process group: a plain model on meta, as parallelize leaves it at TP=1
        with torch.device("meta"):
            model = GPT(small_config())
        torch.manual_seed(SEED)
        init_weights(model)
        by_plan = {"megatron": ({n: p.detach() for n, p in model.named_parameters()}, torch.rand(4),
                                model.lm_head.weight is model.transformer.wte.weight)}
    else:
        by_plan = run_distributed(_init_every_plan, tp)
    for plan, (weights, rng, tied) in by_plan.items():
        assert tied, f"{plan}: wte and lm_head stay one parameter"
        assert torch.equal(rng, after), plan
        for name, p in reference.named_parameters():
            assert torch.equal(weights[name], p), (plan, name)


def test_a_forward_on_meta_is_one_clear_error():
    with fake_process_group(2):
        model = _meta_model(init_device_mesh("cpu", (2,)), "megatron", small_config())
        with pytest.raises(RuntimeError, match=r"parameters are on the meta device \(transformer.wte.weight and \d+ "
                                               r"more\) and hold no values; call load_checkpoint"):
            model(torch.zeros(1, 4, dtype=torch.long))


def _backward_twice(model, idx):
    """Gradients accumulated over two backwards, and each backward's collectives."""
    counts = []
    for _ in range(2):
        with loss_parallel(), CommDebugMode() as mode:
            model(idx, idx)[1].backward()
        counts.append({str(op).split(".")[-1]: n for op, n in mode.get_comm_counts().items() if n})
    return {name: full(p.grad).clone() for name, p in model.named_parameters()}, counts


def _load_on_meta(rank, world_size, path, bad_path):
    mesh = init_device_mesh("cpu", (world_size,))
    model = _meta_model(mesh, "megatron-sp", small_config())
    with pytest.raises(CheckpointError, match="NaN"):
        load_checkpoint(model, bad_path)
    refused_to_meta = all(p.is_meta for p in model.parameters())
    load_checkpoint(model, path)
    idx = torch.arange(24).reshape(2, 12) % 96
    with torch.no_grad(), loss_parallel():
        logits = full(model(idx, idx)[0])
    grads, counts = _backward_twice(model, idx)
    built_whole = parallelize(GPT(small_config()), mesh, "megatron-sp", loss_parallel=True)  # the collectives to expect
    return logits, grads, counts, _backward_twice(built_whole, idx)[1], refused_to_meta, \
        model.lm_head.weight is model.transformer.wte.weight


def test_a_checkpoint_loads_into_shards_allocated_on_load(tmp_path):
    """
    megatron-sp's LayerNorm gradients are hooked on the allocated parameters: reduced once per
    backward and accumulated exactly, even after a refused load sent the model back to meta.
    """
    torch.manual_seed(SEED)
    reference = GPT(small_config())
    save_checkpoint(reference, str(tmp_path / "ckpt"))
    with torch.no_grad():
        reference.transformer.h[1].mlp.c_fc.weight[-1, 0] = float("nan")  # in the last rank's shard
    save_checkpoint(reference, str(tmp_path / "nan"))
    logits, grads, counts, expected_counts, refused_to_meta, tied = run_distributed(
        _load_on_meta, 2, str(tmp_path / "ckpt"), str(tmp_path / "nan"))
    torch.manual_seed(SEED)
    reference = GPT(small_config())
    idx = torch.arange(24).reshape(2, 12) % 96
    with torch.no_grad():
        expected = reference(idx, idx)[0]
    for _ in range(2):
        reference(idx, idx)[1].backward()
    assert refused_to_meta, "a refused load leaves the model holding nothing, as it was"
    assert tied and (logits - expected).abs().max().item() < 1e-5
    assert max((grads[n] - p.grad).abs().max().item() for n, p in reference.named_parameters()) < 1e-5
    assert counts == expected_counts and counts[0] == counts[1], (counts, expected_counts)


MEMORY_CONFIG = dict(n_layer=4, n_head=8, n_embd=768, block_size=64, vocab_size=8192, bias=True, dropout=0.0)  # 34.7M


def _anonymous_bytes():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


class PeakAnonymousMemory:
    """
    The most anonymous memory (RssAnon: tensors, not the checkpoint's page cache, which every
    rank shares) above the start, sampled every half millisecond by a thread. Sampling can miss
    a peak shorter than that, never invent one: a bound it breaks was broken.
    """

    def __enter__(self):
        self.start = self.peak = _anonymous_bytes()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.done.is_set():
            self.peak = max(self.peak, _anonymous_bytes())
            time.sleep(0.0005)

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, _anonymous_bytes()) - self.start


def _peak_of_build_and_load(rank, world_size, path):
    mesh = init_device_mesh("cpu", (world_size,))
    _meta_model(mesh, "megatron", GPTConfig(**MEMORY_CONFIG))  # imports and registrations happen once, here
    with PeakAnonymousMemory() as memory:
        model = _meta_model(mesh, "megatron", GPTConfig(**MEMORY_CONFIG))
        load_checkpoint(model, path)
    idx = torch.arange(24).reshape(2, 12) % MEMORY_CONFIG["vocab_size"]
    with torch.no_grad(), loss_parallel():
        logits = full(model(idx, idx)[0])
    return memory.peak, local_parameter_bytes(model), logits


def test_a_rank_holds_its_shards_and_one_whole_tensor_at_most(tmp_path):
    """At TP=4 each rank's peak while building and loading a 35M-parameter model stays below its shards plus the largest tensor."""
    torch.manual_seed(SEED)
    reference = GPT(GPTConfig(**MEMORY_CONFIG))
    save_checkpoint(reference, str(tmp_path / "ckpt"))
    model_bytes = sum(p.numel() * p.element_size() for p in reference.parameters())
    largest = max(p.numel() * p.element_size() for p in reference.parameters())
    peak, shards, logits = run_distributed(_peak_of_build_and_load, 4, str(tmp_path / "ckpt"))
    idx = torch.arange(24).reshape(2, 12) % MEMORY_CONFIG["vocab_size"]
    with torch.no_grad():
        expected = reference(idx, idx)[0]
    assert (logits - expected).abs().max().item() < 1e-5
    assert shards < model_bytes / 3, "a quarter of the sharded tensors, the replicated ones whole"
    assert peak <= shards + largest < model_bytes, (peak, shards, largest, model_bytes)
