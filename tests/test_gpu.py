"""The CUDA path: MoE dispatch, the Embedder, the CLP loss and a DeepSpeed bf16 engine on one GPU.

Skipped without CUDA (``conftest.py``). CPU tests cover the same code in fp32/fp64 and with gloo;
these check what only a GPU exercises: CUDA kernels against float64 CPU references, bf16 weights
as DeepSpeed's bf16 mode leaves them (router still computed in fp32), and ZeRO-2/3 with NCCL.
"""

from __future__ import annotations

import copy
import json
import socket
import warnings

import pytest
import torch
from torch import nn

pytestmark = pytest.mark.gpu

TEXTS = ["how to protect a sheet", "insert a chart into a slide", "짧은 문장", "numbering pages in a document"]


@pytest.fixture(autouse=True)
def exact_fp32():
    """Plain fp32 matrix products (no TF32), so fp32 results can be held to 1e-5."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def moe_layer(d_in=64, d_out=256, experts=4, k=1, seed=0):
    from clp_ray.model.moe import MoEFeedForward

    torch.manual_seed(seed)
    layer = MoEFeedForward(nn.Linear(d_in, d_out), experts, k)
    with torch.no_grad():  # distinct experts and a router that spreads tokens over all of them
        for ex in layer.experts:
            ex.weight.add_(torch.randn_like(ex.weight) * 0.05)
            ex.bias.add_(torch.randn_like(ex.bias) * 0.05)
        layer.router.weight.normal_(std=d_in ** -0.5)
    return layer


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm())


def routed_inputs(layer, k: int, n: int, dtype: torch.dtype, seed: int):
    """Routing, gates, inputs and an upstream gradient for ``dispatch``; at top-1 the last expert
    gets no tokens (its gradient must still be a zero tensor)."""
    experts = len(layer.experts)
    g = torch.Generator().manual_seed(seed)
    if k == 1:
        top_i = torch.randint(0, experts - 1, (n, 1), generator=g)
    else:
        top_i = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(n)])
    gates = torch.rand(n, k, generator=g, dtype=torch.float64).to(dtype)
    x = torch.randn(n, layer.in_features, generator=g, dtype=torch.float64).to(dtype)
    upstream = torch.randn(n, layer.out_features, generator=g, dtype=torch.float64).to(dtype)
    return top_i, gates, x, upstream


def dispatch_grads(layer, inputs, device, dtype):
    """``dispatch``'s output on ``device`` in ``dtype`` and its gradients by name (x, gates, experts)."""
    from clp_ray.model.moe import dispatch

    top_i, gates, x, upstream = inputs
    exps = copy.deepcopy(layer.experts).to(device, dtype)
    xi = x.to(device, dtype).requires_grad_(True)
    gi = gates.to(device, dtype).requires_grad_(True)
    out = dispatch(xi, top_i.to(device), gi, exps)
    named = [("x", xi), ("gates", gi), *exps.named_parameters()]
    grads = torch.autograd.grad(out, [p for _, p in named], upstream.to(device, dtype))
    return out, dict(zip([name for name, _ in named], grads))


@pytest.mark.parametrize("k", [1, 2])
def test_dispatch_on_gpu_equals_float64_reference(k):
    layer = moe_layer(k=k)
    inputs = routed_inputs(layer, k, 300, torch.float64, seed=k)
    out, grads = dispatch_grads(layer, inputs, "cuda", torch.float32)
    ref, ref_grads = dispatch_grads(layer, inputs, "cpu", torch.float64)
    assert out.is_cuda and out.dtype == torch.float32
    assert rel_err(out, ref) < 1e-5
    for name, want in ref_grads.items():
        got = grads[name]
        assert got is not None and got.is_cuda
        assert rel_err(got, want) < 1e-5 if want.norm() > 0 else not got.any(), name


@pytest.mark.parametrize("k", [1, 2])
def test_bf16_dispatch_on_gpu_equals_float64_reference(k):
    """bf16 experts on the GPU stay within bf16 rounding of float64 on the same bf16 values,
    every gradient included (measured ~3e-3 on CPU), and an expert without tokens gets a zero
    gradient."""
    layer = moe_layer(k=k).to(torch.bfloat16)
    inputs = routed_inputs(layer, k, 4096, torch.bfloat16, seed=k)
    ref, ref_grads = dispatch_grads(layer, inputs, "cpu", torch.float64)
    out, grads = dispatch_grads(layer, inputs, "cuda", torch.bfloat16)
    assert out.dtype == torch.bfloat16 and rel_err(out, ref) < 1e-2
    errors = {name: (rel_err(grads[name], want) if want.norm() > 0 else float(grads[name].abs().max()))
              for name, want in ref_grads.items()}
    assert max(errors.values()) < 1e-2, errors


def test_bf16_moe_layer_routes_in_fp32_and_matches_fp32_on_gpu():
    """DeepSpeed's bf16 mode casts every parameter to bf16, the router's too: routing must still
    be computed in fp32, the output stay within bf16 rounding of the fp32 layer, and the top-1
    router still get a gradient."""
    layer16 = moe_layer(k=1).cuda().to(torch.bfloat16)
    # The reference: the same bf16-rounded weights and inputs, computed in fp32. Routing is then
    # identical (the router sees the same fp32 values), so only the experts' bf16 products differ.
    layer32 = copy.deepcopy(layer16).float()
    seen = []
    layer16.router.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    x = torch.randn(512, layer16.in_features, device="cuda").to(torch.bfloat16)
    ref = layer32(x.float())
    out = layer16(x)
    assert seen == [torch.float32] and layer16.router.weight.dtype == torch.bfloat16
    assert out.dtype == torch.bfloat16
    assert torch.equal(layer16.aux.expert_fraction, layer32.aux.expert_fraction)
    assert rel_err(out, ref) < 1e-2
    out.float().pow(2).mean().backward()
    g = layer16.router.weight.grad
    assert g is not None and torch.isfinite(g.float()).all() and g.float().abs().sum() > 0


@pytest.mark.parametrize("k", [1, 2])
def test_moe_layer_waits_for_the_gpu_once_per_forward_and_backward(k):
    """The per-expert row counts are read back to the host once per forward (the expert loop
    needs them); nothing else waits for the GPU: not the routing, not the router losses over a
    padding mask, not the backward. Each wait stalls the GPU until the host catches up."""
    from clp_ray.loss.router import router_loss
    from clp_ray.model.moe import token_mask

    layer = moe_layer(k=k).cuda()
    x = torch.randn(4, 96, layer.in_features, device="cuda", requires_grad=True)
    mask = torch.ones(4, 96, dtype=torch.long, device="cuda")
    mask[1:, 60:] = 0
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with token_mask(layer, mask):
                out = layer(x)
            (out.pow(2).mean() + router_loss(layer)).backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    waits = [str(w.message)[:200] for w in seen if "called a synchronizing" in str(w.message)]
    assert len(waits) == 1, waits
    assert int(layer.aux.tokens) == 4 * 96 - 3 * 36
    assert x.grad is not None and layer.router.weight.grad.abs().sum() > 0


def test_upcycled_embedder_equals_dense_and_cpu_on_gpu(tiny_embedder):
    dense = tiny_embedder.to("cuda")
    moe = copy.deepcopy(dense)
    moe.upcycle([0, -1], num_experts=4, top_k=1)
    moe2 = copy.deepcopy(dense)
    moe2.upcycle([-1], num_experts=4, top_k=2)
    want = dense.encode(TEXTS)
    for m in (moe, moe2):
        torch.testing.assert_close(m.encode(TEXTS), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(moe.encode(TEXTS), copy.deepcopy(moe).cpu().encode(TEXTS), atol=1e-5, rtol=0)


def test_clp_loss_and_gradients_on_gpu_equal_float64_cpu():
    from clp_ray.loss.clp import clp_loss

    b, g_size, d = 3, 5, 32
    torch.manual_seed(0)
    raw = [torch.randn(n, d, dtype=torch.float64) for n in (b, b * g_size, b * (g_size - 1))]

    def run(device, dtype):
        leaves = [t.to(device, dtype).requires_grad_(True) for t in raw]
        q, p, nq = (torch.nn.functional.normalize(t, dim=-1) for t in leaves)
        out = clp_loss(q, p, nq, temperature=0.05, lam=0.3)
        return out.loss, torch.autograd.grad(out.loss, leaves)

    loss, grads = run("cuda", torch.float32)
    ref, ref_grads = run("cpu", torch.float64)
    assert abs(float(loss.detach()) - float(ref.detach())) < 1e-5 * abs(float(ref.detach()))
    for got, want in zip(grads, ref_grads):
        assert rel_err(got, want) < 1e-5


# --------------------------------------------------------------------------------------------
# DeepSpeed on one GPU.


@pytest.fixture(scope="module")
def nccl_group():
    """A one-process NCCL group, as Ray Train gives each GPU worker."""
    import deepspeed
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        torch.cuda.set_device(0)
        deepspeed.init_distributed(dist_backend="nccl")
        yield
        dist.destroy_process_group()


def training_batch(embedder, cfg, n=8):
    from clp_ray.config import resolve_path
    from clp_ray.data import Collator, normalize_record, sample_group

    with open(resolve_path(cfg.data.train_paths[0]), encoding="utf-8") as f:
        records = [normalize_record(json.loads(line)) for _, line in zip(range(n), f)]
    groups = [sample_group(r, cfg.data.train_group_size, seed=0, epoch=0, index=i) for i, r in enumerate(records)]
    return Collator.for_embedder(embedder, cfg.data.length_bucket_size)(groups)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_bf16_engine_trains_only_moe_and_saves_it_on_gpu(stage, nccl_group, tmp_path):
    """The worker's engine (``build_engine``) at bf16 on one GPU: the loss falls, only the experts
    and routers change, the router computes in fp32, and the saved final model reloads to the
    same embeddings (ZeRO-3 gathers its shards for the save)."""
    import deepspeed

    from clp_ray.config import load_config
    from clp_ray.loss.objective import CLPObjective
    from clp_ray.loss.settings import LossSettings
    from clp_ray.model.embedder import Embedder
    from clp_ray.model.moe import apply_train_only, moe_layers
    from clp_ray.model.source import load_embedder
    from clp_ray.train import build_engine, deepspeed_config, save_final_model
    from clp_ray.train.engine import to_device

    cfg = load_config("ko", "tiny", [
        f"deepspeed.stage={stage}", "train.precision=bf16", "ray.use_gpu=true", "ray.gpus_per_worker=1",
        "moe.num_experts=4", "moe.train_only=moe", "loss.lam=0.1", "train.learning_rate=1e-2", "train.warmup_ratio=0",
        "deepspeed.overrides={zero_optimization: {stage3_param_persistence_threshold: 0}}"])
    torch.manual_seed(cfg.train.seed)
    embedder = load_embedder(cfg.model, cfg.moe)
    apply_train_only(embedder, "moe")
    before = {n: p.detach().clone() for n, p in embedder.named_parameters()}
    trained = {n for n, p in embedder.named_parameters() if p.requires_grad}
    assert trained and all(".dense.experts." in n or ".dense.router." in n for n in trained)
    module = CLPObjective(embedder, LossSettings.from_config(cfg))
    ds = deepspeed_config(cfg, world_size=1)
    assert ds["bf16"]["enabled"] and ds["zero_optimization"]["stage"] == stage
    steps = 12
    engine, _ = build_engine(module, ds, cfg, total_opt=steps)
    dtypes = []
    for _, layer in moe_layers(embedder.encoder):
        layer.router.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    batch = training_batch(embedder, cfg)
    dev = engine.device
    losses = []
    for _ in range(steps):
        out = engine(to_device(batch["query"], dev), to_device(batch["passage"], dev), to_device(batch["neg_query"], dev))
        engine.backward(out.loss)
        engine.step()
        losses.append(float(out.loss.detach()))
        assert out.penalty > 0 and out.router_loss > 0
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.9 * losses[0], losses
    assert dtypes and set(dtypes) == {torch.float32}

    params = dict(embedder.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), enabled=stage == 3):
        for n, p in params.items():
            assert p.dtype == torch.bfloat16 and p.is_cuda, n
            start = before[n].to(torch.bfloat16).to(p.device)
            if n in trained:
                assert not torch.equal(p, start), f"{n} did not train"
            else:
                assert torch.equal(p, start), f"frozen {n} changed"

    out = tmp_path / "model"
    save_final_model(embedder, out, rank=0, stage3=stage == 3)
    engine.eval()
    enc = to_device(embedder.tokenize(TEXTS), dev)
    with torch.no_grad():
        in_engine = embedder(**enc).float()
        reloaded = Embedder.from_pretrained(out).to(dev, torch.bfloat16)
        assert reloaded.moe_spec == embedder.moe_spec
        again = reloaded(**enc).float()
    torch.testing.assert_close(again, in_engine, atol=1e-3, rtol=0)


@pytest.mark.gpu
def test_grad_cache_gradients_on_gpu_in_bf16_match_the_uncached_objective(tiny_path):
    """bf16 on the GPU: cached and uncached gradients agree to bf16 rounding (the fp32 CPU test holds
    them to 1e-5)."""
    from clp_ray.loss.objective import CLPObjective
    from clp_ray.loss.settings import LossSettings
    from clp_ray.model.embedder import Embedder

    emb = Embedder.from_pretrained(tiny_path)
    emb.upcycle([0], num_experts=2)
    emb = emb.cuda().to(torch.bfloat16).eval()  # as DeepSpeed's bf16 mode casts it
    texts = [f"질문 {i} 셀 보호 해제" * (1 + i % 3) for i in range(32)]
    q, p, nq = (emb.tokenize(texts[:n], kind=k) for n, k in ((8, "query"), (32, "passage"), (24, "query")))
    q, p, nq = ({k: v.cuda() for k, v in t.items()} for t in (q, p, nq))
    grads = []
    for chunk in (None, 3):
        emb.zero_grad(set_to_none=True)
        CLPObjective(emb, LossSettings(temperature=0.05, lam=0.1, cross_device=False), chunk_size=chunk)(q, p, nq).loss.backward()
        grads.append({n: t.grad.float() for n, t in emb.named_parameters() if t.grad is not None})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=0.05, atol=2e-3, msg=name)


def test_m3_modes_and_unified_loss_on_gpu_in_bf16_match_the_cpu():
    """BGE-M3's sparse and ColBERT outputs on CUDA (fp32 to 1e-5 of the CPU; bf16 close), and the
    unified loss in bf16 reaching the heads with finite gradients."""
    from clp_ray.config import TinyModelConfig
    from clp_ray.data import Collator, Group
    from clp_ray.loss.objective import CLPObjective
    from clp_ray.loss.settings import LossSettings
    from clp_ray.model.embedder import Embedder
    from clp_ray.model.tiny import tiny_model_path

    path = tiny_model_path(TinyModelConfig(m3_heads=True))
    cpu = Embedder.from_pretrained(path).encode(TEXTS, output=("sparse", "colbert"))
    gpu_model = Embedder.from_pretrained(path).cuda()
    gpu = gpu_model.encode(TEXTS, output=("sparse", "colbert"))
    for a, b, ca, cb in zip(cpu.sparse, gpu.sparse, cpu.colbert, gpu.colbert):
        assert a.keys() == b.keys() and all(abs(a[t] - b[t]) < 1e-5 for t in a)
        assert torch.allclose(ca, cb, atol=1e-5)
    model = gpu_model.to(torch.bfloat16).train()
    groups = [Group(f"{t} ?", [t, TEXTS[(i + 1) % len(TEXTS)]], [TEXTS[(i + 2) % len(TEXTS)]]) for i, t in enumerate(TEXTS)]
    batch = Collator.for_embedder(model, 2)(groups)
    obj = CLPObjective(model, LossSettings(temperature=0.05, lam=0.1, cross_device=False, unified=True))
    out = obj(*(batch[k].to("cuda") for k in ("query", "passage", "neg_query")))
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.loss.dtype == torch.float32
    for head in (model.heads.sparse_linear, model.heads.colbert_linear):
        assert head.weight.grad is not None and torch.isfinite(head.weight.grad.float()).all()
        assert head.weight.grad.abs().sum() > 0
