"""Perturbation methods: occlusion, meaningful perturbation (mask) and RISE."""
