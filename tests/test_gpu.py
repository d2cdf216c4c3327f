"""
What only a CUDA device can check: the model and the plans on CUDA kernels, whose attention
(flash or memory-efficient SDPA) takes DTensor's own CUDA sharding rules, not the plugin's CPU
ones. Skipped without a GPU; benchmarks/gpu_check.sh runs them where there is one.
"""

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.debug import CommDebugMode

from dtensor_gpt import GPT, compile_decoding, parallelize
from dtensor_gpt.sampling import VocabParallelSampler
from dtensor_gpt.sharding_rules import check_torch_version
from helpers import fake_process_group, resumed_adamw, small_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_cuda_forward_and_gradients_match_cpu():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    model = GPT(small_config())
    idx = torch.randint(0, 96, (2, 32))
    logits, loss = model(idx, idx)
    loss.backward()
    on_gpu = GPT(small_config()).cuda()
    on_gpu.load_state_dict(model.state_dict())
    gpu_logits, gpu_loss = on_gpu(idx.cuda(), idx.cuda())
    gpu_loss.backward()
    assert (gpu_logits.cpu() - logits).abs().max().item() < 1e-4
    for (name, a), b in zip(model.named_parameters(), on_gpu.parameters()):
        assert (a.grad - b.grad.cpu()).abs().max().item() < 1e-4, name


def torch_is_too_old():
    try:
        check_torch_version()
    except RuntimeError as error:
        return str(error)
    return ""


@pytest.mark.skipif(bool(torch_is_too_old()), reason=torch_is_too_old())
@pytest.mark.parametrize("plan", ["megatron", "megatron-sp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plans_run_on_cuda_with_the_collectives_of_cpu(plan, dtype):
    """
    TP=2 over torch's fake process group (one GPU plays both ranks): the packed q|k|v heads reach
    CUDA's SDPA kernels (bf16: flash attention) through DTensor, forward and backward, with the
    same collectives as on CPU. The fake group computes no collective, so no number is checked.
    """
    counts = {}
    for device in ("cpu", "cuda"):
        with fake_process_group(2):
            torch.manual_seed(0)
            model = GPT(small_config()).to(device=device, dtype=dtype)
            parallelize(model, init_device_mesh(device, (2,)), plan, loss_parallel=True)
            idx = torch.randint(0, 96, (2, 32), device=device)
            with CommDebugMode() as mode:
                with torch.distributed.tensor.parallel.loss_parallel():
                    _, loss = model(idx, idx)
                    loss.backward()
            counts[device] = {str(op): n for op, n in mode.get_comm_counts().items() if n}
    assert counts["cuda"] == counts["cpu"] and counts["cuda"], counts


def test_sampling_and_compiled_decoding_on_cuda():
    """Vocabulary-parallel sampling draws on CUDA what it draws on CPU; the compiled step decodes as eager."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    model = GPT(small_config()).eval()
    prompt = torch.randint(0, 96, (2, 5))
    on_cpu = model.generate(prompt, 10, temperature=0.8, top_k=20, sample=VocabParallelSampler(seed=7))
    model.cuda()
    on_gpu = model.generate(prompt.cuda(), 10, temperature=0.8, top_k=20, sample=VocabParallelSampler(seed=7))
    assert torch.equal(on_gpu.cpu(), on_cpu)
    greedy = model.generate(prompt.cuda(), 10, top_k=1)
    compile_decoding(model)
    assert torch.equal(model.generate(prompt.cuda(), 10, top_k=1), greedy)


def test_cuda_graph_decoding_gives_the_eager_tokens():
    """
    mode="reduce-overhead" replays each block's step as a CUDA graph, writing the cache in place
    inside it; a skipped graph (an input it cannot keep) is an error here, not a silent fallback.
    """
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    model = GPT(small_config()).cuda().eval()
    prompt = torch.randint(0, 96, (2, 5), device="cuda")
    greedy = model.generate(prompt, 20, top_k=1)
    compile_decoding(model, mode="reduce-overhead")
    with torch._inductor.config.patch({"triton.cudagraph_or_error": True}):
        for _ in range(2):  # the second generation has a new cache: recorded again, not recompiled
            assert torch.equal(model.generate(prompt, 20, top_k=1), greedy)


@pytest.mark.parametrize("options", [dict(fused=True), dict(capturable=True)])
def test_fused_and_capturable_adamw_resume_with_their_step_on_the_gpu(tmp_path, options):
    """Their kernels read `step` on the parameters' device: loaded there, as Optimizer.load_state_dict puts it."""
    torch.backends.cuda.matmul.allow_tf32 = False
    equal, placed, by_torch = resumed_adamw(str(tmp_path / "ckpt"), "cuda", **options)
    assert placed == by_torch and placed["step"] == (torch.device("cuda", 0), torch.float32)
    assert equal, "resumed for 2 steps, the weights of 4 uninterrupted steps"


def _train_on_cuda(args, steps=20):
    """examples/train.py's step (autocast, loss, backward, clipping, AdamW) on CUDA; the losses."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from dtensor_gpt.grad import LossScaler
    from train import DataParallel, train_step

    torch.manual_seed(0)
    model = GPT(small_config()).cuda()
    if args.compile:
        for block in model.transformer.h:
            block.compile(dynamic=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(1)
    tokens = [torch.randint(0, 96, (4, 33), generator=generator).cuda() for _ in range(4)]
    batches = [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in tokens]
    with fake_process_group(1):
        dp = DataParallel(init_device_mesh("cuda", (1,)))
        return [train_step(model, optimizer, LossScaler(False), [batch], args, dp) for batch in batches * (steps // 4)]


def test_compiled_bf16_training_on_cuda():
    """Compiled blocks under bf16 autocast train on CUDA as eager ones do; fp32 compiled gives eager's losses."""
    from types import SimpleNamespace

    torch.backends.cuda.matmul.allow_tf32 = False
    runs = {(dtype, compile): _train_on_cuda(SimpleNamespace(dtype=dtype, compile=compile, grad_clip=1.0))
            for dtype in ("fp32", "bf16") for compile in (False, True)}
    assert max(abs(a - b) for a, b in zip(runs["fp32", False], runs["fp32", True])) < 1e-4
    for (dtype, compile), losses in runs.items():
        assert losses[-1] < losses[0] - 0.5, (dtype, compile, losses)
        assert max(abs(a - b) for a, b in zip(losses, runs["fp32", False])) < 0.05, (dtype, compile)
