"""A procedural world of 64x64 scenes with known factors (shape, color, pattern, mark, background,
pose) and the shipped base model trained on it (docs/world.md).

``render`` draws scenes and builds the pretraining distribution (with held-out subjects);
``probe`` is a small CNN that reads scenes back, and the world metric set computed from its
readings; ``pretrain`` trains the model (`dreambooth world pretrain`).
"""
