"""One forward of any model under a TorchFunctionMode that sees its torch calls: what the
transformer methods share.

The mode never looks at module classes or names, so the same code reads Hugging Face (eager or
sdpa attention), timm (fused_attn on or off) and hand-written transformers:

- it flags every tensor the forward computes from the input: a parameter requires grad as well,
  so requires_grad cannot tell an activation from a weight, and AttnLRP's rules must;
- it keeps each attention matrix: the output of a softmax over the last dimension of an
  input-dependent [N, heads, T, T] tensor (HF eager attention, timm with fused_attn off);
- it computes fused attention (F.scaled_dot_product_attention: HF "sdpa", timm's fused_attn,
  which never materialise the weights) explicitly, as softmax(q k^T * scale + mask) v under the
  same mode, so its weights are kept and its products and softmax meet the same rules; and so
  nn.MultiheadAttention (torchvision's ViT), whose one call hides the projections, products and
  softmax. The model itself is not switched (no attn_implementation or fused_attn to set and
  restore), so one model object may serve several threads;
- it notes the output grid of each 2-D convolution before the first attention (the patch
  embedding), which maps tokens back to the image.
"""
from __future__ import annotations

import inspect
import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from saliency_audit.explainers.core.base import UnsupportedModel

_LIVE = "_saliency_audit_live"  # the flag on the tensors a forward computes from its input
SOFTMAX = (F.softmax, torch.softmax, torch.Tensor.softmax)
CONV2D = (F.conv2d, torch.conv2d)
# Fused kernels of nn.MultiheadAttention and nn.TransformerEncoderLayer; they run only without
# gradients to the input, so never here, but a model may call them directly.
HIDDEN_ATTENTION = (torch._native_multi_head_attention, torch._transformer_encoder_layer_fwd)
_MHA_PARAMETERS = inspect.signature(F.multi_head_attention_forward)


def tensors(obj):
    """The tensors in a call's arguments or results (nested in lists, tuples and dicts)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from tensors(item)


def is_live(t: torch.Tensor) -> bool:
    return getattr(t, _LIVE, False)


def arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    """A call's argument by position or keyword."""
    return args[index] if len(args) > index else kwargs.get(name, default)


def explicit_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                       enable_gqa=False):
    """F.scaled_dot_product_attention's result, computed with its weights as a tensor (PyTorch's
    documented reference implementation)."""
    return _attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)[0]


def _attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """(output, weights) of scaled dot-product attention."""
    if enable_gqa:  # grouped-query attention: each key/value head serves several query heads
        repeat = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(repeat, -3), value.repeat_interleave(repeat, -3)
    scale = 1 / math.sqrt(query.shape[-1]) if scale is None else scale
    scores = torch.matmul(query, key.transpose(-2, -1)) * scale
    if is_causal:
        keep = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        scores = (scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool
                  else scores + attn_mask)
    weights = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    if dropout_p > 0:
        weights = F.dropout(weights, dropout_p)
    return torch.matmul(weights, value), weights


def explicit_multi_head_attention(*args, **kwargs):
    """F.multi_head_attention_forward's result (output, weights or None), computed from its parts:
    the projections, heads, masks and scaled dot-product attention. None for the arguments it does
    not cover (bias_k/bias_v, add_zero_attn, static keys or values)."""
    a = _MHA_PARAMETERS.bind(*args, **kwargs)
    a.apply_defaults()
    a = a.arguments
    if a["bias_k"] is not None or a["bias_v"] is not None or a["add_zero_attn"] or a["static_k"] is not None \
            or a["static_v"] is not None:
        return None
    query, key, value, heads = a["query"], a["key"], a["value"], a["num_heads"]
    unbatched = query.dim() == 2
    if unbatched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
    (length, batch, dim), source = query.shape, key.shape[0]
    if a["use_separate_proj_weight"]:
        weights = a["q_proj_weight"], a["k_proj_weight"], a["v_proj_weight"]
    else:
        weights = a["in_proj_weight"].chunk(3)
    biases = a["in_proj_bias"].chunk(3) if a["in_proj_bias"] is not None else (None,) * 3
    q, k, v = (F.linear(t, w, b).reshape(t.shape[0], batch, heads, -1).permute(1, 2, 0, 3)
               for t, w, b in zip((query, key, value), weights, biases))
    mask = _additive(a["attn_mask"])  # (L,S) or (N*heads,L,S)
    if mask is not None and mask.dim() == 3:
        mask = mask.reshape(batch, heads, length, source)
    padding = _additive(a["key_padding_mask"])  # (N,S): masks keys
    if padding is not None:
        padding = padding.reshape(batch, 1, 1, source)
        mask = padding if mask is None else mask + padding
    out, attention = _attention(q, k, v, mask, a["dropout_p"] if a["training"] else 0.0,
                                a["is_causal"] and mask is None)
    out = F.linear(out.permute(2, 0, 1, 3).reshape(length, batch, dim), a["out_proj_weight"], a["out_proj_bias"])
    if not a["need_weights"]:
        attention = None
    elif a["average_attn_weights"]:
        attention = attention.mean(dim=1)
    if unbatched:
        out, attention = out.squeeze(1), attention.squeeze(0) if attention is not None else None
    return out, attention


def _additive(mask: torch.Tensor | None) -> torch.Tensor | None:
    """nn.MultiheadAttention's mask as scores to add: True (bool) masks out, as -inf does."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, device=mask.device).masked_fill(mask, float("-inf"))


class ForwardTrace(TorchFunctionMode):
    """``with ForwardTrace(images) as trace: logits = model(images)``; then ``trace.attention``
    holds each attention matrix [N, heads, T, T] in forward order. Subclasses add rules: HANDLERS
    maps a torch function to the name of the method that computes it when an argument is live."""

    HANDLERS: ClassVar[dict] = {**dict.fromkeys(SOFTMAX, "_softmax"), **dict.fromkeys(CONV2D, "_conv"),
                F.scaled_dot_product_attention: "_fused", F.multi_head_attention_forward: "_multi_head",
                **dict.fromkeys(HIDDEN_ATTENTION, "_hidden")}

    def __init__(self, source: torch.Tensor):
        super().__init__()
        setattr(source, _LIVE, True)
        self.attention: list[torch.Tensor] = []
        self.rectangular: list[int] = []  # per other attention softmax, how many square ones came before it
        self.sequence: torch.Tensor | None = None
        self.conv_grids: list[tuple[int, int]] = []
        self.fused = self.hidden = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        live = sum(is_live(t) for t in tensors((args, kwargs)))
        if not live:
            return func(*args, **kwargs)
        name = self.HANDLERS.get(func)
        out = getattr(self, name)(func, args, kwargs, live) if name else func(*args, **kwargs)
        for t in tensors(out):  # computed from the input, unless a rule detached it (a constant)
            if t.requires_grad or not torch.is_grad_enabled():
                setattr(t, _LIVE, True)
                if t.dim() == 3 and self.attention and t.shape[1] == self.attention[-1].shape[-1]:
                    self.sequence = t  # the last token sequence: what the head reads its tokens from
        return out

    def _softmax(self, func, args, kwargs, live):
        out = func(*args, **kwargs)
        if out.dim() >= 4 and arg(args, kwargs, 1, "dim") in (-1, out.dim() - 1):
            if out.dim() == 4 and out.shape[-1] == out.shape[-2]:
                self.attention.append(out)
            elif out.shape[-1] != out.shape[-2]:  # queries over another set of keys: spatial-reduction (PVT,
                self.rectangular.append(len(self.attention))  # CvT) or pooled (Hiera) attention
            # else windows of neighbours (VOLO's outlook attention, [B,heads,HW,k*k,k*k]): local mixing, as
            # a hybrid ViT's convolutions, before the tokens that are composed
        return self.weights(out)

    def weights(self, softmax: torch.Tensor) -> torch.Tensor:
        """A live softmax's output as the forward goes on with it (a rule may hold it constant)."""
        return softmax

    def _fused(self, func, args, kwargs, live):
        self.fused += 1
        with self:  # under this mode again: its softmax is kept, its products meet the rules
            return explicit_attention(*args, **kwargs)

    def _multi_head(self, func, args, kwargs, live):
        with self:
            out = explicit_multi_head_attention(*args, **kwargs)
        if out is None:
            return self._hidden(func, args, kwargs, live)
        self.fused += 1
        return out

    def _hidden(self, func, args, kwargs, live):
        self.hidden += 1
        return func(*args, **kwargs)

    def _conv(self, func, args, kwargs, live):
        out = func(*args, **kwargs)
        if not self.attention and out.dim() == 4:
            self.conv_grids.append(tuple(out.shape[-2:]))
        return out

    def read_tokens(self, logits: torch.Tensor) -> torch.Tensor | None:
        """[T] bool: the tokens of the last sequence that the head reads (a gradient reaches them from
        the logits): the class token of a ViT, class and distillation tokens of a DeiT, the patches
        of a model that pools their mean (BEiT, timm's gap models), both for DINOv2. None if unknown."""
        if self.sequence is None or not self.sequence.requires_grad or not logits.requires_grad:
            return None
        (grad,) = torch.autograd.grad(logits.sum(), self.sequence, retain_graph=True, allow_unused=True)
        return None if grad is None else grad.abs().sum((0, 2)) > 0

    def refuse_hidden(self, method: str) -> None:
        if self.hidden:
            raise UnsupportedModel(method, "the model's attention runs in a fused kernel that hides its weights "
                                           "(nn.MultiheadAttention with bias_k/bias_v or add_zero_attn, or a "
                                           "native fast path); use gradcam or grad")

    def attention_layers(self, batch: int, method: str) -> list[torch.Tensor]:
        """Every attention matrix [B, heads, T, T], or UnsupportedModel where the model has none or
        its attention cannot be composed across layers (windows, changing token counts)."""
        self.refuse_hidden(method)
        # an attention pooling head after the blocks (one query over every token) is not composed: it may stay
        if self.rectangular and (not self.attention or min(self.rectangular) < len(self.attention)):
            raise UnsupportedModel(method, "it composes attention over one token sequence through every layer, and "
                                           "some of this model's layers attend from their tokens to another set "
                                           "(keys pooled or spatially reduced: PVT, CvT, Hiera), "
                                           f"{len(self.rectangular)} of {len(self.rectangular) + len(self.attention)}"
                                           " attention layers; use attnlrp or gradcam")
        if not self.attention:
            raise UnsupportedModel(method, "the model has no attention layers (no softmax over "
                                           "[batch, heads, tokens, tokens]); use gradcam")
        if {(a.shape[0], a.shape[-1]) for a in self.attention} != {(batch, self.attention[0].shape[-1])}:
            per_layer = ", ".join(f"{a.shape[0] // batch}x{a.shape[-1]}" for a in self.attention)
            raise UnsupportedModel(method, "it composes attention over one token sequence through every layer, and "
                                           "this model attends within windows or changes its token count (sequences "
                                           f"x tokens per image, by layer: {per_layer}); use attnlrp or gradcam")
        return self.attention


def token_grid(tokens: int, conv_grids: list[tuple[int, int]], height: int, width: int) -> tuple[int, int, int] | None:
    """(rows, cols, prefix): the patch grid of a sequence of ``tokens`` and the number of tokens
    before it (class, distillation and register tokens come first in ViT, DeiT and timm). The grid
    is the last convolution's output before attention (the patch embedding) where one fits; else
    the grid of the image's aspect ratio with the fewest prefix tokens."""
    for rows, cols in reversed(conv_grids):
        if rows * cols <= tokens < 2 * rows * cols:
            return rows, cols, tokens - rows * cols
    for prefix in range(tokens // 2 + 1):
        n = tokens - prefix
        rows = round(math.sqrt(n * height / width))
        if rows and n % rows == 0 and rows * width == n // rows * height:
            return rows, n // rows, prefix
    return None


def token_map(relevance: torch.Tensor, trace: ForwardTrace, size, method: str,
              read: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Token-to-token relevance [B,T,T] -> the map [B,H,W] of the patches and a record of what was read.

    The rows read are those of the tokens the head reads (``read``, ForwardTrace.read_tokens), each
    prefix token's row and the mean of the patches' rows counting once: a ViT's class token, the mean
    of a DeiT's class and distillation tokens (its two heads' mean), the patches' mean where the
    model pools them (BEiT, timm's gap models; row 0 there is a patch or a register), half each for
    DINOv2's class token and patch mean. Unknown: the first row with prefix tokens, else the mean of
    all rows. Then patch_map."""
    prefix = _grid(relevance.shape[-1], trace, size, method, "use attnlrp or gradcam")[2]
    if read is None or not read.any():
        read = torch.zeros(relevance.shape[-1], dtype=torch.bool)
        read[0 if prefix else slice(None)] = True
    read = read.to(relevance.device)
    rows = [relevance[:, i] for i in range(prefix) if read[i]]
    names = [("class token (first)" if i == 0 else f"token {i}") for i in range(prefix) if read[i]]
    if read[prefix:].any():
        rows.append(relevance[:, prefix:][:, read[prefix:]].mean(dim=1))
        names.append("mean of the patch tokens" if prefix else "mean of all tokens")
    maps, record = patch_map(torch.stack(rows).mean(dim=0), trace, size, method)
    return maps, {**record, "row": " and ".join(names) + (", averaged" if len(names) > 1 else "")}


def patch_map(values: torch.Tensor, trace: ForwardTrace, size, method: str,
              advice: str = "use attnlrp or gradcam") -> tuple[torch.Tensor, dict]:
    """Per-token values [B,T] -> the map [B,H,W] of the patches and a record of what was read.

    Prefix tokens are dropped, the rest reshaped to the patch grid and upsampled by nearest neighbour:
    each token is one patch, so each pixel takes its patch's value; bilinear upsampling would move
    relevance across patch borders into patches the token never covered (on a 4x4 grid, over most of
    the image). A sequence that forms no grid is refused, with ``advice``."""
    tokens = values.shape[-1]
    rows, cols, prefix = _grid(tokens, trace, size, method, advice)
    patches = values[:, prefix:].reshape(-1, 1, rows, cols).float()
    maps = F.interpolate(patches, size=(int(size[0]), int(size[1])), mode="nearest")[:, 0]
    record = {"attention_layers": len(trace.attention), "tokens": tokens, "grid": [rows, cols],
              "prefix_tokens_dropped": prefix, "fused_attention_computed": trace.fused, "upsampling": "nearest"}
    return maps, record


def _grid(tokens: int, trace: ForwardTrace, size, method: str, advice: str) -> tuple[int, int, int]:
    height, width = int(size[0]), int(size[1])
    grid = token_grid(tokens, trace.conv_grids, height, width)
    if grid is None:
        raise UnsupportedModel(method, f"its {tokens} tokens form no patch grid of the {height}x{width} image; {advice}")
    return grid
