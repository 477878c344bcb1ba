"""Class activation maps: Grad-CAM and its variants on one shared base."""
