"""PyTorch/XLA SPMD text-to-image latent diffusion trainer."""
