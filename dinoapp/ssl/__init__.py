"""Self-supervised (continued) pretraining: DINO + iBOT + KoLeo (DINOv3 spec, section 2)."""
