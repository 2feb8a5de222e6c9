"""Training: data on the device, the lab's MLP and its stacked form, the engine, optimizers, the hand-written step."""
