"""Black-box methods on superpixels and latent codes: LIME, Anchor, LORE and ABELE, and their searches."""
