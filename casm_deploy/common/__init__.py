"""Helpers every stage uses: progress bars, CPUs, devices, checked paths and safe writes."""
