"""AdamW with bf16 states whose step runs inside backward: full fine-tuning of the 9B on one 80 GB card.

Why: full fine-tuning of CogAgent's language model trains 9.4 B parameters. With torch's AdamW the
card holds bf16 weights (25.9 GiB for the whole model), bf16 gradients (17.5 GiB) and two states per
parameter (35 GiB in bf16, 70 GiB in fp32) at the same time: more than 80 GB before any activation.
Two changes bring the peak under 75 GiB:

1. The update of a parameter runs as soon as its gradient is complete, from a
   `Tensor.register_post_accumulate_grad_hook` (PyTorch >= 2.1; the recipe of the PyTorch tutorial
   "How to save memory by fusing the optimizer step into the backward pass"), and the gradient is
   freed right after: at most one parameter's gradient exists at a time, never 17.5 GiB of them.
2. The two moment estimates are kept in bf16 (2 bytes each) instead of fp32.

Numerics (what `BackwardFusedAdamW` computes, per parameter p with gradient g, step t):

    m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2          (in fp32, from the stored bf16 m, v)
    p = p (1 - lr wd) - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)   (decoupled decay, as torch AdamW)

all arithmetic in fp32; m, v and (when p is bf16) p are then stored back in bf16 by *stochastic
rounding*: a value between two bf16 neighbours is rounded up with probability equal to its distance
from the lower one, so the stored value is unbiased. Round-to-nearest would lose every change smaller
than half a bf16 step (8 mantissa bits, 0.4% relative): with b2 = 0.999 the second moment could never
decay (0.1% < 0.2%), and a learning rate of 1e-5 would leave most bf16 weights unchanged. This is the
argument of Zamirai et al., "Revisiting BFloat16 Training" (arXiv 2010.06192). `tests/test_optim.py`
shows on the tiny model that the loss curve follows torch's fp32-state AdamW.

Limits, by construction: no global gradient-norm clipping (the gradients never coexist; clip each
parameter's gradient instead with `max_grad_norm_per_param`), and gradient accumulation only by
`accumulate()`: inside that context the hooks leave the summed gradients in place, and the next
backward outside it steps. `step()` and `zero_grad()` are no-ops, so a training loop written for a
plain optimizer keeps working; the learning rate lives in `param_groups` (torch LR schedulers work).
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch

CHUNK_ELEMENTS = 1 << 26  # update large tensors (the 620 M-entry embedding) in 64 M-element slices


def stochastic_round_to_bf16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Round fp32 `x` to bf16, up or down at random with probabilities that make the result unbiased.

    bf16 is the upper 16 bits of an fp32 word. Adding a uniform random integer in [0, 2^16) to the
    word's low bits and truncating them carries into the kept bits with probability (low bits) / 2^16,
    which is the distance to the lower neighbour over the spacing. Floats are sign-magnitude, so this
    rounds magnitudes and is unbiased for negative values too.
    """
    bits = x.float().contiguous().view(torch.int32)
    extra = {} if generator is None else {"generator": generator}  # torch.compile traces randint without one
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device, **extra)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)


def _rounded(value: torch.Tensor, like: torch.Tensor, stochastic: bool) -> torch.Tensor:
    if like.dtype == torch.bfloat16 and stochastic:
        return stochastic_round_to_bf16(value)
    return value.to(like.dtype)


def adamw_slice_(
    p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, hyper: torch.Tensor, stochastic: bool
) -> None:
    """One AdamW update of a slice in fp32, written back into p, m, v with (stochastic) rounding.

    `hyper` is a float32 tensor [lr, beta1, beta2, eps, decay, bias1, bias2_sqrt, grad_scale] on the
    parameter's device: a tensor, not Python floats, so that `torch.compile` builds one kernel for
    every step (bias corrections change each step) instead of recompiling.
    """
    lr, beta1, beta2, eps, decay, bias1, bias2_sqrt, grad_scale = hyper.unbind()
    grad = g.float() * grad_scale
    m32 = m.float() * beta1 + grad * (1 - beta1)
    v32 = v.float() * beta2 + grad * grad * (1 - beta2)
    update = (m32 / bias1) / (v32.sqrt() / bias2_sqrt + eps)
    p32 = p.float() * decay - lr * update
    m.copy_(_rounded(m32, m, stochastic))
    v.copy_(_rounded(v32, v, stochastic))
    p.copy_(_rounded(p32, p, stochastic))


_COMPILED: dict[str, object] = {}


def _slice_kernel(device: torch.device):  # noqa: ANN202 - a callable with adamw_slice_'s signature
    """`adamw_slice_` fused into one kernel by torch.compile on CUDA (about 14 bytes moved per bf16
    parameter instead of ~250 for the eager chain of elementwise ops); eager elsewhere or if compiling fails."""
    if device.type != "cuda":
        return adamw_slice_
    if "cuda" not in _COMPILED:
        _COMPILED["cuda"] = torch.compile(adamw_slice_, dynamic=True, fullgraph=True)
    return _COMPILED["cuda"]


class BackwardFusedAdamW(torch.optim.Optimizer):
    """AdamW stepping each parameter from its gradient hook; bf16 moments; stochastic rounding.

    Use: build it after the trainable parameters are set (requires_grad), then run forward/backward as
    usual; the parameters are updated during `loss.backward()`. Don't call `clip_grad_norm_` (no full
    gradient exists). The state is two tensors per parameter in `state_dtype` plus a step count.
    Keep a reference to the optimizer for as long as it should train: its hooks hold it weakly
    (see `_make_hook`) and do nothing once it is gone.
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        lr: float = 1e-5,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        state_dtype: torch.dtype = torch.bfloat16,
        stochastic_rounding: bool = True,
        max_grad_norm_per_param: float | None = None,
        compile: bool = True,
    ) -> None:
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        super().__init__([p for p in params if p.requires_grad], defaults)
        self.state_dtype = state_dtype
        self.stochastic_rounding = stochastic_rounding
        self.max_grad_norm_per_param = max_grad_norm_per_param
        self.compile = compile  # fuse the update into one kernel with torch.compile on CUDA
        self._accumulating = False
        self._hooks = []
        for index, group in enumerate(self.param_groups):
            for p in group["params"]:
                self._hooks.append(p.register_post_accumulate_grad_hook(self._make_hook(index)))

    def _make_hook(self, group_index: int):  # noqa: ANN202 - a tensor hook
        """The hook holds the optimizer weakly: autograd keeps hooks in C++, where Python's garbage
        collector cannot see the cycle parameter -> hook -> optimizer -> parameter, so a strong
        reference would keep model and states alive forever (seen: ~50 GiB left on the card after
        `del model, optimizer`). Once the optimizer is gone the hooks do nothing."""
        owner = weakref.ref(self)

        def hook(p: torch.Tensor) -> None:
            optimizer = owner()
            if optimizer is None or optimizer._accumulating or p.grad is None:
                return
            optimizer._update(p, optimizer.param_groups[group_index])
            p.grad = None

        return hook

    @contextmanager
    def accumulate(self) -> Iterator[None]:
        """Backward passes inside this context only sum gradients; the next one outside it steps."""
        self._accumulating = True
        try:
            yield
        finally:
            self._accumulating = False

    @torch.no_grad()
    def _update(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, dtype=self.state_dtype, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.state_dtype, memory_format=torch.contiguous_format)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        step = state["step"]
        scale = 1.0
        if self.max_grad_norm_per_param is not None:
            norm = float(p.grad.float().norm())
            scale = min(1.0, self.max_grad_norm_per_param / (norm + 1e-6))
        hyper = torch.tensor(
            [
                group["lr"],
                beta1,
                beta2,
                group["eps"],
                1.0 - group["lr"] * group["weight_decay"],
                1.0 - beta1**step,
                math.sqrt(1.0 - beta2**step),
                scale,
            ],
            dtype=torch.float32,
        ).to(p.device, non_blocking=True)
        kernel = _slice_kernel(p.device) if self.compile else adamw_slice_
        flat = [t.view(-1) for t in (p.data, p.grad, state["exp_avg"], state["exp_avg_sq"])]
        for start in range(0, flat[0].numel(), CHUNK_ELEMENTS):
            pieces = [t[start : start + CHUNK_ELEMENTS] for t in flat]
            try:
                kernel(*pieces, hyper, self.stochastic_rounding)
            except Exception as err:  # a compiler failure (no Triton, old driver): same arithmetic, eager
                if kernel is adamw_slice_:
                    raise
                warnings.warn(
                    f"torch.compile of the AdamW update failed ({err!r:.200}); running it eagerly", stacklevel=2
                )
                self.compile, kernel = False, adamw_slice_
                kernel(*pieces, hyper, self.stochastic_rounding)

    def step(self, closure=None):  # noqa: ANN001, ANN201 - the torch.optim.Optimizer signature
        """Nothing to do: every parameter was updated during backward. Runs `closure` if given."""
        return closure() if closure is not None else None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Gradients are freed by the hooks; only those left by `accumulate()` or frozen hooks remain."""
        if not self._accumulating:
            super().zero_grad(set_to_none=set_to_none)

    def remove_hooks(self) -> None:
        """Detach from the parameters (after training, before another optimizer takes over)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
