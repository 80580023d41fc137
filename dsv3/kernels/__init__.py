"""Compute kernels: each fast path here has a plain-torch reference it is tested against."""
