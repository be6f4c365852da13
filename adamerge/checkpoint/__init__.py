"""Writing exports: the flattened checkpoint, PEFT adapters, and the model card."""
