"""Helpers every stage uses, one module each: crash-safe files, terminal output, devices and precision, torchrun."""

__all__ = ["console", "device", "distributed", "fileio"]
