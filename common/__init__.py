"""Shared, method-agnostic pieces: samplers, networks, LoRA, data, run plumbing."""
