"""Inference engines behind one small Protocol (see base.py)."""
