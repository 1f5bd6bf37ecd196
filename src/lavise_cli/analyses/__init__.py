"""Analyses built on explanations: what the questions users bring are answered with.

Each analysis runs its passes over images through the one pass runner, uses the explainer and
the methods as they are, and returns plain results that the CLI prints and pages draw:
comparisons of image groups and of models (paper §4.6, §4.5.5), class-relevant filters (Oramas
et al., ICLR 2019).  Nothing here is imported by the core pipeline.
"""
