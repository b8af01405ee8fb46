"""Per-token NLL and the weighted step objective, computed here rather than taken from
`outputs.loss` (a scalar mean).

Two paths give the same numbers:
- plain: the model's logits, then cross-entropy per token. Holds [tokens, vocabulary] logits
  (in float32) for the backward pass: with a 150k vocabulary that dominates memory and time.
- chunked: the model's last hidden states go through the LM head a chunk of tokens at a time;
  the gradient of the weighted objective with respect to each chunk's logits is formed at once
  and folded into the gradients of the hidden states and of the LM head, so no [tokens,
  vocabulary] tensor outlives its chunk. The token weights are known before the forward pass
  (harness/training/reduction.py), which is what makes this possible. Only tokens that carry loss go
  through the LM head (prompts and padding need no logits).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from harness.data.batching import MicroBatch
from harness.data.chat_format import IGNORE


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # bf16 -> fp32, fp64 stays fp64


def _nll_eager(logits, targets, acc):
    logits = logits.to(acc)
    return torch.logsumexp(logits, dim=-1) - logits.gather(1, targets).squeeze(1)


def _nll_and_grad_eager(logits, targets, w, acc, grad_dtype):
    """nll per row and d(w * nll)/d logits = w * (softmax - onehot(target)), in `grad_dtype`."""
    logits = logits.to(acc)
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    nll = (lse - logits.gather(1, targets)).squeeze(1)
    # one new [chunk, vocabulary] buffer, then in place: eager runs (compile off) hold ~1 GiB chunks
    grad = (logits - lse).exp_()
    grad.scatter_add_(1, targets, torch.full_like(lse, -1.0))
    return nll, grad.mul_(w.unsqueeze(1)).to(grad_dtype)


@functools.cache
def _compiled(fn):
    # Under trainer.compile the two functions above run compiled: each becomes one or two passes over the
    # chunk's logits instead of one per operation (with a 150k vocabulary this part is bound by
    # memory traffic). The last chunk of a micro-batch is shorter, hence dynamic shapes.
    return torch.compile(fn, dynamic=True)


def _nll(logits, targets, acc, compiled: bool):
    return (_compiled(_nll_eager) if compiled else _nll_eager)(logits, targets, acc)


def _nll_and_grad(logits, targets, w, acc, grad_dtype, compiled: bool):
    return (_compiled(_nll_and_grad_eager) if compiled else _nll_and_grad_eager)(logits, targets, w, acc, grad_dtype)


class ChunkedWeightedNLL(torch.autograd.Function):
    """(sum_t w_t * nll_t, nll) from hidden states [T, H] and the LM head weight [V, H]."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, token_weights, chunk: int, need_grad: bool, compiled: bool = False):
        acc = _accumulation_dtype(hidden.dtype)
        nll = torch.zeros(hidden.shape[0], dtype=acc, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_grad else None
        grad_weight = torch.zeros_like(weight, dtype=_accumulation_dtype(weight.dtype)) if need_grad else None
        valid = targets != IGNORE
        safe_targets = targets.clamp(min=0).unsqueeze(1)
        # The three matrix products run in autocast's dtype, as autocast would run them, with the
        # casts made once: the head once per call, the logits' gradient as it is formed (not
        # formed in float32 and cast again before each product).
        device_type = hidden.device.type
        autocasts = torch.is_autocast_enabled(device_type) and hidden.dtype != torch.float64  # as autocast decides
        mm_dtype = torch.get_autocast_dtype(device_type) if autocasts else torch.promote_types(hidden.dtype, weight.dtype)
        head = weight.to(mm_dtype)
        for start in range(0, hidden.shape[0], chunk):
            end = start + chunk
            h = hidden[start:end].to(mm_dtype)
            logits = h @ head.t()
            if need_grad:
                w = torch.where(valid[start:end], token_weights[start:end].to(acc), 0.0)
                nll[start:end], grad_logits = _nll_and_grad(logits, safe_targets[start:end], w, acc, mm_dtype,
                                                                compiled)
                grad_hidden[start:end] = grad_logits @ head
                grad_weight += (grad_logits.t() @ h).to(grad_weight.dtype)
            else:
                nll[start:end] = _nll(logits, safe_targets[start:end], acc, compiled)
            nll[start:end].masked_fill_(~valid[start:end], 0.0)
        loss = (nll * token_weights.to(acc)).sum()
        ctx.mark_non_differentiable(nll)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss, nll

    @staticmethod
    def backward(ctx, grad_loss, grad_nll):
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_h = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_h = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (grad_weight * grad_loss.to(grad_weight.dtype)).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None, None, None


def supports_chunked_loss(model) -> bool:
    """The LM head is a plain linear map with no bias and no logit scaling or capping."""
    head = model.get_output_embeddings()
    config = model.config
    return (isinstance(head, torch.nn.Linear) and head.bias is None
            and not getattr(config, "final_logit_softcapping", None) and getattr(config, "logit_scale", None) is None)


class CausalLMLoss(torch.nn.Module):
    """A causal LM and its per-token loss as one module, so DDP and torch.compile see both.

    forward(input_ids, position_ids, targets, weights, target_index) -> (sum_t weights_t * nll_t, nll),
    nll shaped like `targets` (0 where there is no target) and detached; `target_index` lists the
    flat positions of the tokens with a target (MicroBatch.target_index, made on the host so
    the device never waits to learn it). `chunk_tokens=None` takes the plain path."""

    def __init__(self, model, chunk_tokens: int | None = None):
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens
        self.compiled = False

    def compile_model(self, scope: str = "layers", **options) -> None:
        """torch.compile the transformer in place (parameter names unchanged) and, on the chunked
        path, the per-chunk softmax and its gradient; the LM head's matrix products stay eager
        (compiling the whole autograd.Function failed on the GPU with an illegal memory access).

        Where the model is a stack of like layers (`base_model.layers`), each layer is compiled
        rather than the whole model: the layers share one compiled graph per shape, so a cold
        compile traces and builds one layer, not thirty (on a 30-layer model that is the
        difference between minutes and seconds), at the price of no fusion across layers.
        `scope="model"` compiles the whole transformer as one graph. `options` go to
        torch.compile (a test's backend)."""
        base = self.model.base_model
        layers = getattr(base, "layers", None)
        if scope == "layers" and isinstance(layers, torch.nn.ModuleList) and len(layers) > 0:
            for layer in layers:
                layer.compile(**options)
            if isinstance(getattr(base, "norm", None), torch.nn.Module):
                base.norm.compile(**options)
            if self.chunk_tokens is None:
                self.model.get_output_embeddings().compile(**options)
        else:
            (base if self.chunk_tokens is not None else self.model).compile(**options)
        self.compiled = True

    def forward(self, input_ids, position_ids, targets, weights, target_index):
        if self.chunk_tokens is None:
            logits = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
            nll = F.cross_entropy(logits.to(_accumulation_dtype(logits.dtype)).flatten(0, 1), targets.flatten(),
                                  ignore_index=IGNORE, reduction="none").view_as(targets)
            return (weights.to(nll.dtype) * nll).sum(), nll.detach()
        hidden = self.model.base_model(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        head = self.model.get_output_embeddings().weight
        need_grad = torch.is_grad_enabled() and (hidden.requires_grad or head.requires_grad)
        loss, nll = ChunkedWeightedNLL.apply(hidden.flatten(0, 1)[target_index], head, targets.flatten()[target_index],
                                             weights.flatten()[target_index], self.chunk_tokens, need_grad,
                                             self.compiled)
        full = torch.zeros(targets.numel(), dtype=nll.dtype, device=nll.device).index_copy_(0, target_index, nll)
        return loss, full.view_as(targets)


def position_ids_of(batch: MicroBatch) -> torch.Tensor | None:
    # Unpacked rows are right-padded, so the default positions and causal mask are exact; packed
    # rows pass position ids that restart per example, from which the document mask is built.
    return batch.position_ids if batch.packed else None


@torch.no_grad()
def token_nll(model, batch: MicroBatch, chunk_tokens: int | None = None) -> torch.Tensor:
    """NLL of every token's target, shape [rows, length]; 0 where there is no target."""
    loss_model = CausalLMLoss(model, chunk_tokens)
    zeros = torch.zeros_like(batch.targets, dtype=torch.float32)
    return loss_model(batch.input_ids, position_ids_of(batch), batch.targets, zeros, batch.target_index)[1]


def per_example_sums(values: torch.Tensor, batch: MicroBatch) -> torch.Tensor:
    """Sum of `values` over each example's tokens, shape [len(batch.examples)]."""
    sums = torch.zeros(len(batch.examples) + 1, dtype=values.dtype, device=values.device)
    sums.index_add_(0, (batch.seq_index + 1).flatten(), values.flatten())
    return sums[1:]
