"""Loading in lower precision: the checkpoint's values cast on load, bad dtypes refused before anything moves."""

import json

import pytest
import torch

from dtensor_gpt import GPT, GPTConfig, load_checkpoint
from dtensor_gpt.checkpoint import CheckpointError
from test_generate import SHIPPED


def shipped_model():
    return GPT(GPTConfig(**json.loads((SHIPPED / "index.json").read_text())["config"]))


@pytest.mark.parametrize("name, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_load_casts_every_parameter(name, dtype):
    reference = shipped_model()
    load_checkpoint(reference, str(SHIPPED))
    model = shipped_model()
    load_checkpoint(model, str(SHIPPED), dtype=name)
    assert model.lm_head.weight is model.transformer.wte.weight, "still tied"
    ref = dict(reference.named_parameters())
    for pname, p in model.named_parameters():
        assert p.dtype == dtype and torch.equal(p, ref[pname].to(dtype)), pname
    with pytest.raises(CheckpointError, match="is F32 in the checkpoint but torch.bfloat16 in the model; convert it with "
                                              "python -m dtensor_gpt.reshard --dtype, or cast it on load with dtype="):
        load_checkpoint(shipped_model().to(torch.bfloat16), str(SHIPPED))


def test_bad_dtype_is_refused_before_anything_moves():
    model = shipped_model()
    before = model.transformer.wpe.weight.clone()
    with pytest.raises(ValueError, match=r"^dtype='float64' is not a dtype to load into; give one of fp32, bf16, fp16, int8$"):
        load_checkpoint(model, str(SHIPPED), dtype="float64")
    with pytest.raises(ValueError, match="dtype='bf16' casts a model for inference; load an optimizer's state without it"):
        load_checkpoint(model, str(SHIPPED), dtype="bf16", optimizer=torch.optim.AdamW(model.parameters()))
    assert model.transformer.wpe.weight.dtype == torch.float32 and torch.equal(model.transformer.wpe.weight, before)


def test_values_beyond_fp16_are_refused_not_loaded_as_infinity(tmp_path):
    from dtensor_gpt import save_checkpoint

    model = shipped_model()
    load_checkpoint(model, str(SHIPPED))
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight[3, 5] = 1e5
    save_checkpoint(model, str(tmp_path / "large"))
    target = shipped_model()
    with pytest.raises(CheckpointError, match=r"transformer.h.1.mlp.c_fc.weight holds 1 value beyond fp16's range "
                                              r"\(±65504\), which would load as infinity; load it in fp32 or bf16"):
        load_checkpoint(target, str(tmp_path / "large"), dtype="fp16")
    assert target.transformer.wpe.weight.dtype == torch.float32, "nothing moved"
    load_checkpoint(target, str(tmp_path / "large"), dtype="bf16")
    assert target.transformer.h[1].mlp.c_fc.weight[3, 5].item() == 99840.0, "bf16's range holds it (rounded)"
