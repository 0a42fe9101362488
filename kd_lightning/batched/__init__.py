"""Many small students of a sweep trained at once (`hydra/launcher=batched`, docs/batched.md)."""
