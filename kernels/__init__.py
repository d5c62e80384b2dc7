"""Kernel sources (.metal, .cu, .inc), shipped inside the wheel as flashmoe._kernel_sources."""
