import pytest
import torch
from conftest import make_encoder
from torch import nn

from clp_ray.loss.clp import clp_loss
from clp_ray.loss.router import router_loss, router_stats
from clp_ray.model.embedder import Embedder
from clp_ray.model.moe import (
    MoEFeedForward,
    apply_train_only,
    dispatch,
    dispatch_naive,
    find_encoder_layers,
    moe_layers,
    token_mask,
    trainable_parameters,
    upcycle,
)

ENCODERS = [("bert", 48, 3, 96), ("xlmr", 64, 2, 256)]


def inputs(batch=3, length=7, seed=1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 300, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, 4:] = 0  # some padding
    return ids, mask


@pytest.mark.parametrize("kind,hidden,layers,inter", ENCODERS)
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("site", ["intermediate", "output"])
def test_upcycled_encoder_equals_dense_at_init(kind, hidden, layers, inter, top_k, site):
    dense = Embedder(make_encoder(kind, hidden, layers, inter), None).eval()
    moe = Embedder(make_encoder(kind, hidden, layers, inter), None).eval()
    moe.upcycle([0, layers - 1], site, num_experts=4, top_k=top_k)
    assert len(moe_layers(moe.encoder)) == 2
    ids, mask = inputs()
    with torch.no_grad():
        torch.testing.assert_close(moe(ids, mask), dense(ids, mask), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind,hidden,layers,inter", ENCODERS)
def test_expert_sizes_come_from_the_layer(kind, hidden, layers, inter):
    enc = make_encoder(kind, hidden, layers, inter)
    upcycle(enc, [0], "intermediate", 2)
    upcycle(enc, [0], "output", 3)
    layer = find_encoder_layers(enc)[0]
    assert layer.intermediate.dense.experts[1].weight.shape == (inter, hidden)
    assert layer.intermediate.dense.router.weight.shape == (2, hidden)
    assert layer.output.dense.experts[2].weight.shape == (hidden, inter)
    assert layer.output.dense.router.weight.shape == (3, inter)


@pytest.mark.parametrize("gate", ["straight_through", "switch"])
def test_top1_router_receives_gradient_from_task_loss(gate):
    emb = Embedder(make_encoder("xlmr", 64, 2, 128), None)
    emb.upcycle([1], num_experts=4, top_k=1, top1_gate=gate, balance_coef=0.0, z_coef=0.0)
    ids, mask = inputs(batch=4)
    e = emb(ids, mask)
    loss = clp_loss(e[:2], e[2:], None, temperature=0.05, lam=0.0).loss  # task loss only
    loss.backward()
    (_, layer), = moe_layers(emb.encoder)
    assert layer.router.weight.grad is not None
    assert layer.router.weight.grad.abs().sum() > 0


def test_router_runs_in_fp32_for_bf16_inputs():
    layer = MoEFeedForward(nn.Linear(8, 16).to(torch.bfloat16), num_experts=2)
    assert layer.router.weight.dtype == torch.float32
    logits, probs, _, _ = layer.route(torch.randn(5, 8, dtype=torch.bfloat16))
    assert logits.dtype == probs.dtype == torch.float32
    assert layer(torch.randn(5, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_balance_and_z_loss_equal_their_formulas_on_hand_made_routing():
    layer = MoEFeedForward(nn.Linear(3, 4), num_experts=3, top_k=1)
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(3) * 4.0)  # token e_i routes to expert i
    # 4 real tokens: experts 0, 0, 1, 2; one padding token that would go to expert 2.
    x = torch.tensor([[[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0, 0, 1.0]]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    with token_mask(layer, mask):
        layer(x)
    aux = layer.aux
    logits = x[0, :4] @ (torch.eye(3) * 4.0).T
    p = logits.softmax(-1)
    f = torch.tensor([2 / 4, 1 / 4, 1 / 4])
    expected_balance = 3 * sum(f[i] * p[:, i].mean() for i in range(3))
    expected_z = (torch.logsumexp(logits, -1) ** 2).mean()
    torch.testing.assert_close(aux.balance_loss, expected_balance)
    torch.testing.assert_close(aux.z_loss, expected_z)
    torch.testing.assert_close(aux.expert_fraction, f)
    assert int(aux.tokens) == 4  # padding excluded
    entropy = -(p * p.log()).sum(-1).mean()
    torch.testing.assert_close(aux.entropy, entropy)
    torch.testing.assert_close(router_loss(layer), 0.01 * expected_balance + 0.001 * expected_z)


@pytest.mark.parametrize("top_k", [1, 2])
def test_router_losses_over_a_padding_mask_equal_the_real_tokens_alone(top_k):
    """Padding is weighted out of the router losses and statistics (no boolean indexing): the
    result equals the same layer run on the real tokens only, losses' gradients included."""
    torch.manual_seed(3)
    layer = MoEFeedForward(nn.Linear(8, 12), num_experts=4, top_k=top_k)
    with torch.no_grad():
        layer.router.weight.normal_()
    x = torch.randn(3, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    with token_mask(layer, mask):
        layer(x)
    padded = layer.aux
    (g_padded,) = torch.autograd.grad(router_loss(layer), layer.router.weight)
    layer(x[mask.bool()])  # the 9 real tokens alone, no mask
    alone = layer.aux
    (g_alone,) = torch.autograd.grad(router_loss(layer), layer.router.weight)
    for field in ("balance_loss", "z_loss", "expert_fraction", "entropy"):
        torch.testing.assert_close(getattr(padded, field), getattr(alone, field))
    assert int(padded.tokens) == int(alone.tokens) == 9
    torch.testing.assert_close(g_padded, g_alone)


@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_layer_sizes_no_output_by_its_data_except_the_row_counts(top_k):
    """On a GPU, an op whose output size depends on tensor values (boolean indexing, nonzero,
    bincount) makes the host wait for the device. The CPU stand-in for the GPU test: over a padded
    forward+backward no such op runs; the one read of values is dispatch's per-expert row counts."""
    from torch.utils._python_dispatch import TorchDispatchMode

    data_sized = {torch.ops.aten.nonzero.default, torch.ops.aten.bincount.default,
                  torch.ops.aten.masked_select.default, torch.ops.aten._local_scalar_dense.default}
    seen = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            bool_index = func is torch.ops.aten.index.Tensor and any(
                t is not None and t.dtype == torch.bool for t in args[1])
            if func in data_sized or bool_index:
                seen.append(str(func))
            return func(*args, **(kwargs or {}))

    layer = MoEFeedForward(nn.Linear(8, 12), num_experts=4, top_k=top_k)
    x = torch.randn(3, 5, 8, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    with Watch():
        with token_mask(layer, mask):
            out = layer(x)
        (out.pow(2).mean() + router_loss(layer)).backward()
    assert seen == []
    assert int(layer.aux.tokens) == 9 and x.grad is not None


def test_router_losses_of_an_all_padding_batch_are_zero():
    layer = MoEFeedForward(nn.Linear(8, 12), num_experts=3, top_k=2)
    with token_mask(layer, torch.zeros(2, 4, dtype=torch.long)):
        layer(torch.randn(2, 4, 8))
    aux = layer.aux
    assert int(aux.tokens) == 0
    for value in (aux.balance_loss, aux.z_loss, aux.entropy, *aux.expert_fraction):
        assert float(value.detach()) == 0.0
    (g,) = torch.autograd.grad(router_loss(layer), layer.router.weight)
    assert torch.equal(g, torch.zeros_like(g))


def test_uniform_routing_gives_balance_loss_one():
    layer = MoEFeedForward(nn.Linear(4, 4), num_experts=4)
    with torch.no_grad():
        layer.router.weight.zero_()
    layer(torch.randn(10, 4))  # all probabilities 1/4; f sums to 1 -> E * sum f_i / E = 1
    assert layer.aux.balance_loss.item() == pytest.approx(1.0)


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_vectorised_dispatch_equals_naive_loop(top_k):
    torch.manual_seed(0)
    layer = MoEFeedForward(nn.Linear(16, 24), num_experts=5, top_k=top_k)
    for expert in layer.experts:  # make experts differ so routing matters
        nn.init.normal_(expert.weight)
    h = torch.randn(50, 16, requires_grad=True)
    _, _, top_i, gates = layer.route(h)
    fast = dispatch(h, top_i, gates, layer.experts)
    slow = dispatch_naive(h, top_i, gates, layer.experts, 24)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    g_fast = torch.autograd.grad(fast.square().sum(), [h, layer.router.weight, layer.experts[0].weight])
    _, _, top_i, gates = layer.route(h)
    g_slow = torch.autograd.grad(dispatch_naive(h, top_i, gates, layer.experts, 24).square().sum(),
                                 [h, layer.router.weight, layer.experts[0].weight])
    for a, b in zip(g_fast, g_slow):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_router_stats_per_layer():
    emb = Embedder(make_encoder("bert", 48, 3, 96), None)
    emb.upcycle([0, 2], num_experts=3)
    ids, mask = inputs()
    emb(ids, mask)
    stats = router_stats(emb.encoder)
    for layer in (0, 2):
        fr = [stats[f"moe/layer{layer}/expert{e}_frac"] for e in range(3)]
        assert sum(fr) == pytest.approx(1.0)
        assert 0 <= stats[f"moe/layer{layer}/entropy"] <= torch.log(torch.tensor(3.0)).item() + 1e-6


def test_layer_index_errors():
    enc = make_encoder("bert", 48, 3, 96)
    with pytest.raises(ValueError, match="out of range for an encoder with 3 layers"):
        upcycle(enc, [3])
    with pytest.raises(ValueError, match="same layer twice"):
        upcycle(enc, [2, -1])
    upcycle(enc, [-1])
    with pytest.raises(ValueError, match="already an MoE layer"):
        upcycle(enc, [2])
    with pytest.raises(ValueError, match="no BERT-family encoder layers"):
        upcycle(nn.Sequential(nn.Linear(2, 2)), [0])


def test_save_load_round_trip_restores_moe(tiny_embedder, tmp_path):
    emb = tiny_embedder
    emb.upcycle([0, -1], "intermediate", num_experts=3, top_k=2, balance_coef=0.05)
    torch.manual_seed(3)
    with torch.no_grad():  # move experts and routers away from init so a lossy load would show
        for _, m in moe_layers(emb.encoder):
            m.router.weight.normal_(std=1.0)
            for ex in m.experts:
                ex.weight.add_(torch.randn_like(ex.weight) * 0.1)
    texts = ["표 삽입 방법", "Insert rows above", "차트 데이터 범위 편집"]
    before = emb.encode(texts)
    out = tmp_path / "model"
    out.mkdir()
    (out / "stale.txt").write_text("old folder is replaced whole")
    emb.save_pretrained(out)
    assert not (out / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temp folder left behind
    loaded = Embedder.from_pretrained(out)
    assert loaded.moe_spec == emb.moe_spec
    assert loaded.moe_spec.balance_coef == 0.05
    assert len(moe_layers(loaded.encoder)) == 2
    torch.testing.assert_close(loaded.encode(texts), before, rtol=0, atol=1e-6)


@pytest.mark.parametrize("policy", ["moe", "ffn", "all"])
def test_train_only_policies_and_optimizer_state(policy):
    emb = Embedder(make_encoder("bert", 48, 3, 96), None)
    emb.upcycle([1], num_experts=2)
    trainable, total = apply_train_only(emb, policy)
    names = {n for n, p in emb.named_parameters() if p.requires_grad}
    assert trainable == sum(p.numel() for p in emb.parameters() if p.requires_grad)
    if policy == "moe":
        assert names and all(".intermediate.dense." in n and "layer.1." in n for n in names)
        assert any("router" in n for n in names)
    elif policy == "ffn":
        assert any("layer.0.intermediate.dense" in n for n in names)
        assert any("layer.2.output.LayerNorm" in n for n in names)
        assert not any("attention" in n or "embeddings" in n for n in names)
    else:
        assert trainable == total
    params = trainable_parameters(emb)
    opt = torch.optim.AdamW(params, lr=1e-2)
    frozen_before = {n: p.detach().clone() for n, p in emb.named_parameters() if not p.requires_grad}
    ids, mask = inputs()
    e = emb(ids, mask)
    (e.sum() + router_loss(emb.encoder)).backward()
    opt.step()
    with_state = {id(p) for p in opt.state}
    assert with_state == {id(p) for p in params}
    for n, p in emb.named_parameters():
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n]), n


@pytest.mark.parametrize("site", ["intermediate", "output"])
def test_train_only_site_trains_the_weights_upcycling_replaces(site):
    dense = Embedder(make_encoder("bert", 48, 3, 96), None)
    trainable, _ = apply_train_only(dense, "site", layers=[-1], site=site)
    names = {n for n, p in dense.named_parameters() if p.requires_grad}
    assert names == {f"encoder.encoder.layer.2.{site}.dense.weight", f"encoder.encoder.layer.2.{site}.dense.bias"}
    layer = dense.encoder.encoder.layer[2]
    assert trainable == sum(p.numel() for p in getattr(layer, site).dense.parameters())
    moe = Embedder(make_encoder("bert", 48, 3, 96), None)
    moe.upcycle([2], site=site, num_experts=2)
    apply_train_only(moe, "site", layers=[2], site=site)
    moe_names = {n for n, p in moe.named_parameters() if p.requires_grad}
    assert moe_names == {n for n, p in moe.named_parameters() if f"layer.2.{site}.dense." in n}  # experts + router
    assert any("router" in n for n in moe_names) and any("experts" in n for n in moe_names)
    with pytest.raises(ValueError, match="needs the layers"):
        apply_train_only(dense, "site")


def test_train_only_moe_without_moe_layers_is_an_error():
    with pytest.raises(ValueError, match="no MoE layers"):
        apply_train_only(make_encoder("bert", 48, 2, 96), "moe")


@pytest.mark.parametrize("gate", ["straight_through", "switch"])
def test_top1_layer_forward_and_gradients_equal_naive_reference(gate):
    torch.manual_seed(1)
    layer = MoEFeedForward(nn.Linear(12, 20), num_experts=3, top_k=1, top1_gate=gate, balance_coef=0, z_coef=0)
    with torch.no_grad():
        layer.router.weight.normal_()
        for ex in layer.experts:
            nn.init.normal_(ex.weight)
    h = torch.randn(2, 9, 12, requires_grad=True)
    upstream = torch.randn(2, 9, 20)
    params = [h, layer.router.weight, *[ex.weight for ex in layer.experts], layer.experts[1].bias]
    out = layer(h)
    g_fast = torch.autograd.grad(out, params, upstream)

    flat = h.reshape(-1, 12)
    probs = torch.softmax(flat @ layer.router.weight.T, -1)
    top_p, top_i = probs.max(-1, keepdim=True)
    gates = top_p / top_p.detach() if gate == "straight_through" else top_p
    ref = dispatch_naive(flat, top_i, gates, layer.experts, 20).reshape(2, 9, 20)
    g_ref = torch.autograd.grad(ref, params, upstream)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("top_k", [1, 2])
def test_expert_without_tokens_gets_zero_gradient_not_none(top_k):
    # Data-parallel gradient reduction needs the same set of gradients on every rank.
    layer = MoEFeedForward(nn.Linear(4, 6), num_experts=4, top_k=top_k)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 10.0  # everything to expert 0 (and 1 for top-2, by tie order)
        layer.router.weight[1, 0] = 5.0
    x = torch.ones(5, 4)
    layer(x).sum().backward()
    unused = layer.experts[3]
    assert unused.weight.grad is not None and torch.equal(unused.weight.grad, torch.zeros_like(unused.weight))
    assert unused.bias.grad is not None


def test_loaded_models_are_in_eval_mode_dense_and_moe(tiny_embedder, tmp_path):
    """As after transformers' from_pretrained, a loaded model's direct forward runs without dropout
    (the tiny encoder has dropout 0.1), whether the folder holds MoE layers or not. The MoE folder
    is rebuilt from its config, which used to leave it in training mode."""
    dense_dir = tiny_embedder.save_pretrained(tmp_path / "dense")
    tiny_embedder.upcycle([-1], num_experts=2)
    moe_dir = tiny_embedder.save_pretrained(tmp_path / "moe")
    for folder in (dense_dir, moe_dir):
        loaded = Embedder.from_pretrained(folder)
        assert not any(m.training for m in loaded.modules()), folder.name
        enc = loaded.tokenize(["표 삽입 방법", "Insert rows above"])
        with torch.no_grad():
            torch.testing.assert_close(loaded(**enc), loaded(**enc), rtol=0, atol=0)
