"""moesim: a hardware simulator and cost-model planner for Mixture-of-Experts models."""

__version__ = "0.1.0"
