"""What the methods share: the interface, the registry, baselines, target scores, map helpers."""
