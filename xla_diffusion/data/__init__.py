"""Host-side data sources: each yields endless fixed-shape batches of CPU tensors."""
