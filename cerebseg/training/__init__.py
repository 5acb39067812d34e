"""Trainers of cerebseg's networks: one module per network family, plus their augmentation and
data. Imported by ``cerebseg-train`` (and the benchmarks), never by the pipeline.
"""
