"""The gradient checks again on CUDA (float64), one GPU and two GPUs with NCCL."""

import pytest
import torch
import torch.multiprocessing as mp

from harness.training.reduction import MODES
from tests.helpers.gradients import TOL, TWO_RANK_LAYOUTS, UNEQUAL, chunks_of, formula_grad, harness_grad, two_rank_worker
from tests.helpers.models import make_examples, rel_err, tiny_model


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("packing", [False, True])
def test_cuda_gradient_matches_formula(mode, packing):
    examples = make_examples(UNEQUAL)
    got = harness_grad(examples, mode, 4, packing, device="cuda")
    assert rel_err(got, formula_grad(examples, mode, chunks_of(8, 4))) <= TOL


@pytest.mark.multigpu
def test_two_gpus_with_nccl_match_formula(tmp_path):
    out = str(tmp_path / "grads")
    mp.spawn(two_rank_worker, args=("nccl", str(tmp_path / "init"), out), nprocs=2, join=True)
    examples = make_examples(UNEQUAL)
    for (mode, layout), got in torch.load(f"{out}.0").items():
        chunks = TWO_RANK_LAYOUTS[layout][-1]
        assert rel_err(got, formula_grad(examples, mode, chunks_of(8, chunks))) <= TOL, (mode, layout)


def _bf16_setup(vocab=8192, lengths=(300, 41, 977, 12, 530, 88, 1500, 260), device="cuda"):
    """A random model with a larger vocabulary, in float32 with bf16 autocast (how training runs)."""
    model = tiny_model(dtype=torch.float32, vocab=vocab, positions=4096, hidden=64, heads=4).to(device)  # head dim 16
    return model, make_examples(list(lengths), seed=1, vocab=vocab)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_chunked_loss_matches_plain_in_bf16(device):
    """Both paths round the same bf16 logits and differ only in how the products accumulate, so
    per-example mean NLL agrees to well under bf16's resolution (2^-8 relative) and the gradient
    to within that resolution."""
    from harness.data.batching import collate
    from harness.training.losses import CausalLMLoss, per_example_sums
    from harness.training.reduction import token_weights

    model, examples = _bf16_setup(device=device)
    if device == "cpu":
        model.config._attn_implementation = "eager"  # no FlexAttention kernel for the CPU here
    batch = collate(examples, 0, packing=True, row_length=4096).to(device)
    seq_w = torch.rand(len(examples), dtype=torch.float64, device=device)
    weights = token_weights(seq_w, batch.seq_index, batch.target_mask)
    results = {}
    for chunk in (None, 1024):
        model.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16):
            loss, nll = CausalLMLoss(model, chunk)(batch.input_ids, batch.position_ids, batch.targets, weights,
                                                   batch.target_index)
        loss.backward()
        per_example = per_example_sums(nll.double(), batch) / torch.tensor([e.target_tokens for e in examples], device=device)
        results[chunk] = (per_example, torch.cat([p.grad.flatten() for p in model.parameters()]), float(loss.detach()))
    (pe_plain, g_plain, l_plain), (pe_chunk, g_chunk, l_chunk) = results[None], results[1024]
    assert (pe_plain - pe_chunk).abs().max() < 2e-3
    assert abs(l_plain - l_chunk) / abs(l_plain) < 1e-3
    assert rel_err(g_chunk, g_plain) < 1e-2


@pytest.mark.gpu
def test_packed_rows_through_flex_attention_give_the_unpacked_per_example_losses():
    from harness.distributed import World
    from harness.training.evaluate import evaluate

    model, examples = _bf16_setup()
    out = {}
    for impl, packing in (("sdpa", False), ("flex_attention", True)):
        model.config._attn_implementation = impl
        out[impl] = evaluate(model, examples, batch_size=8, pad_id=0, packing=packing, row_length=4096,
                             device=torch.device("cuda"), world=World())
    assert (out["sdpa"].example_id == out["flex_attention"].example_id).all()
    assert ((out["sdpa"].loss_mean - out["flex_attention"].loss_mean).abs() < 1e-4).all()  # float32, two kernels


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
def test_compiled_step_with_physical_rows_and_flex_attention_matches_eager(mode):
    """torch.compile, FlexAttention on 4096-token physical rows, chunked loss, bf16 autocast: the
    training path on a GPU, against the same step eager with the plain loss, padded rows."""
    from harness.distributed import World
    from harness.training.losses import CausalLMLoss
    from harness.training.step import Split, train_step

    grads = {}
    for name, compiled, tokens, chunk, impl in (("eager", False, None, None, "sdpa"),
                                                ("fast", True, 4096, 1024, "flex_attention")):
        model, examples = _bf16_setup()
        model.config._attn_implementation = impl
        step_model = CausalLMLoss(model, chunk)
        if compiled:
            step_model.compile_model()
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.0, fused=True)
        train_step(step_model, optimizer, None, examples, list(range(len(examples))), mode=mode, loss_scale=1e-3,
                   split=Split(8, None, tokens), max_grad_norm=None, world=World(), device=torch.device("cuda"),
                   layout=dict(pad_id=0, packing=False, row_length=4096), autocast_dtype=torch.bfloat16)
        grads[name] = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert rel_err(grads["fast"], grads["eager"]) < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
def test_liger_kernels_give_the_formula_gradient(mode, monkeypatch):
    """model.liger_kernels (Liger's RMSNorm, SwiGLU and RoPE Triton kernels) in float32, packed rows
    of several lengths as tokens_per_micro_batch=auto cuts them: the float64 formula's gradient to
    float32 precision, as the same model without Liger gives it."""
    pytest.importorskip("liger_kernel")
    from transformers.models.llama import modeling_llama

    from harness.distributed import World
    from harness.model.loading import apply_liger_kernels
    from harness.training.losses import CausalLMLoss
    from harness.training.step import Split, train_step

    for name in ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP"):  # Liger patches the module: undone after
        monkeypatch.setattr(modeling_llama, name, getattr(modeling_llama, name))
    examples = make_examples(UNEQUAL)
    expected = formula_grad(examples, mode, chunks_of(len(examples), 8))
    grads = {}
    for liger in (False, True):
        model = tiny_model(dtype=torch.float32).cuda()
        if liger:
            apply_liger_kernels(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
        train_step(CausalLMLoss(model, None), optimizer, None, examples, list(range(len(examples))), mode=mode,
                   loss_scale=0.37, split=Split(8, None, 64, (48,)), max_grad_norm=None, world=World(),
                   device=torch.device("cuda"), layout=dict(pad_id=0, packing=False, row_length=64))
        grads[liger] = torch.cat([p.grad.flatten() for p in model.parameters()]).double().cpu()
    assert rel_err(grads[False], expected) < 1e-4
    assert rel_err(grads[True], expected) < 1e-4
