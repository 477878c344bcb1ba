"""Methods made for transformers: attention rollout, gradient-weighted attention (Chefer et al.) and
AttnLRP. Pure PyTorch and architecture-agnostic: trace.py watches one forward through a
TorchFunctionMode (no import of transformers or timm, no module names, no patched classes)."""
