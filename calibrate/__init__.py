"""Calibration: per-layer latency profiles, acceptance traces and link profiles, written as versioned files."""
