"""Models: the one door every command loads a backbone through, and everything about backbones.

`pipeline.models.door.open_model` loads or builds any backbone (a hub id, a local directory, a run's base model,
a tiny or skeleton preset) for any purpose (the base stage, training, evaluation, the merge reload, `structlora
eval` of a foreign model), with quantization, dtype and device as options, and checks it once, at start.
"""
