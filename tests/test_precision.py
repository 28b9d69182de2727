"""train.precision: auto — bf16 autocast on a CPU with native bf16, fp32 weights and loss."""

import pytest
import torch
from test_grad_cache import batch
from test_prefix_cache import paper_model

from clp_ray.loss.objective import CLPObjective
from clp_ray.loss.settings import LossSettings
from clp_ray.train import precision


@pytest.mark.parametrize(("forced", "want"), [("1", torch.bfloat16), ("0", None)])
def test_auto_follows_the_cpu(monkeypatch, forced, want):
    monkeypatch.setenv("CLP_RAY_CPU_BF16", forced)
    precision.cpu_has_bf16.cache_clear()
    try:
        assert precision.autocast_dtype("auto", torch.device("cpu")) is want
        assert precision.autocast_dtype("fp32", torch.device("cpu")) is None  # explicit precisions are DeepSpeed's
        assert precision.autocast_dtype("auto", torch.device("meta")) is None  # a GPU's auto is DeepSpeed bf16
    finally:
        precision.cpu_has_bf16.cache_clear()


def test_cpu_flags_are_read_from_cpuinfo(monkeypatch):
    monkeypatch.delenv("CLP_RAY_CPU_BF16", raising=False)
    precision.cpu_has_bf16.cache_clear()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
        assert precision.cpu_has_bf16() == any(flag in flags.split() for flag in precision.BF16_FLAGS)
    finally:
        precision.cpu_has_bf16.cache_clear()


@pytest.mark.parametrize("policy", ["moe", "all"])
def test_bf16_autocast_step_keeps_fp32_weights_loss_and_gradients(tiny_path, policy):
    """Under autocast the loss and every gradient are fp32 and close to the fp32 step's (bf16
    matmuls: a few parts in a thousand), the weights untouched in dtype."""
    emb = paper_model(tiny_path, policy).eval()
    inputs = batch(emb)
    obj = CLPObjective(emb, LossSettings(temperature=0.05, lam=0.1, cross_device=False))
    ref = obj(*inputs)
    ref.loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in emb.named_parameters() if p.grad is not None}
    emb.zero_grad(set_to_none=True)
    with precision.autocast(torch.bfloat16, torch.device("cpu")):
        out = obj(*inputs)
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and out.contrastive.dtype == torch.float32
    torch.testing.assert_close(out.loss, ref.loss, rtol=2e-2, atol=0)
    for n, p in emb.named_parameters():
        assert p.dtype == torch.float32
        if n in ref_grads and not n.endswith("key.bias"):  # softmax ignores a key bias: its gradient is rounding noise
            assert p.grad.dtype == torch.float32
            cos = torch.nn.functional.cosine_similarity(p.grad.flatten(), ref_grads[n].flatten(), dim=0)
            assert cos > 0.95, n
