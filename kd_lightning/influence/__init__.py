"""TracIn influence analysis of a teacher and its student (docs/influence.md).

gradients.py: per-example gradient embeddings (torch.func; Linear layers in factored form; optional projection);
tracin.py: checkpoints, their learning rates, and the chunked scores; compare.py: teacher vs student overlaps,
rank correlations and figures; cli.py: `python tracin.py`; bench.py: speed against a plain autograd loop.
"""
