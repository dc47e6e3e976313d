"""Data plane: distributed step-patch parallel diffusion on torch.distributed ranks."""
