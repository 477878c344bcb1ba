"""Relevance propagation over a traced graph of the model: DeepLIFT and LRP with its composites."""
