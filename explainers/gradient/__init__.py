"""Gradient methods: saliency, gradient x input, integrated and expected gradients, SmoothGrad, XRAI."""
