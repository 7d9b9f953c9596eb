"""Readers for measured data (nccl-tests, Kineto traces, Nsight Systems exports, vLLM benchmark_moe, aiconfigurator tables), calibration and predicted-vs-measured comparison."""
