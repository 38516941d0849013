"""Adapter kinds beside SVF (LoRA, IA3, DoRA): pytrees applied to named kernels in the forward."""
