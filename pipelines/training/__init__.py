"""Training and data tools: the reference CNNs, the AAE for abele, MNIST shards, the demo data."""
