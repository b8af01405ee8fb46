"""The model-and-loss module: how it is compiled."""

import torch
from torch._dynamo.utils import counters

from harness.data.batching import pack
from harness.training.losses import CausalLMLoss
from tests.helpers.models import flat_grad, make_examples, rel_err, tiny_model


def _grad(loss_model, batch, weights):
    loss_model.model.zero_grad(set_to_none=True)
    loss, _ = loss_model(batch.input_ids, batch.position_ids, batch.targets, weights, batch.target_index)
    loss.backward()
    return flat_grad(loss_model.model)


def test_each_layer_is_compiled_and_the_layers_share_one_graph():
    """Per-layer compilation: every decoder layer (and the final norm) is compiled, not the whole
    model, and the layers reuse one Dynamo graph, so a cold compile builds one layer; the
    gradient equals the eager one."""
    import torch._dynamo
    torch._dynamo.reset()
    model = tiny_model(dtype=torch.float32)
    batch = pack(make_examples([20, 30, 14]), 64, pad_id=0, fixed_length=True)
    weights = torch.rand(batch.targets.shape)
    eager = _grad(CausalLMLoss(model, chunk_tokens=16), batch, weights)

    compiled = CausalLMLoss(model, chunk_tokens=16)
    compiled.compile_model(backend="aot_eager")
    assert all(layer._compiled_call_impl is not None for layer in model.model.layers)
    assert model.model.norm._compiled_call_impl is not None and model.model._compiled_call_impl is None
    before = counters["stats"]["unique_graphs"]
    got = _grad(compiled, batch, weights)
    # one graph for both layers, one for the norm, one for the chunked loss's softmax (4 if the layers did not share)
    assert len(model.model.layers) == 2 and counters["stats"]["unique_graphs"] - before == 3
    assert rel_err(got, eager) < 1e-5
    torch._dynamo.reset()


def test_the_model_scope_compiles_the_whole_transformer():
    model = tiny_model(dtype=torch.float32)
    CausalLMLoss(model, chunk_tokens=16).compile_model("model", backend="aot_eager")
    assert model.model._compiled_call_impl is not None
    assert all(layer._compiled_call_impl is None for layer in model.model.layers)


def test_flex_attention_in_compiled_layers_does_not_recompile_when_the_packing_changes():
    """Packed rows of one length but different documents: the document mask is built outside the
    compiled layers (a new block mask every step) and passed into them; Dynamo must not compile
    again for each new mask. Forward only: FlexAttention has no backward on the CPU (the GPU
    tests run the compiled step with FlexAttention forward and backward)."""
    import torch._dynamo
    torch._dynamo.reset()
    model = tiny_model(dtype=torch.float32, vocab=64, hidden=32, heads=4)
    model.set_attn_implementation("flex_attention")
    loss_model = CausalLMLoss(model, chunk_tokens=64)
    loss_model.compile_model(backend="aot_eager")
    graphs = []
    for seed, lengths in enumerate([[40, 60, 28], [100, 28], [9, 30, 50, 39]]):
        batch = pack(make_examples(lengths, seed=seed, vocab=64), 128, pad_id=0, fixed_length=True)
        with torch.no_grad():
            loss_model(batch.input_ids, batch.position_ids, batch.targets, torch.ones(batch.targets.shape),
                       batch.target_index)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] > 0 and graphs[1:] == [graphs[0]] * 2, graphs
    torch._dynamo.reset()
