"""Python client for the RealAlign gRPC server (run generate_stubs.sh once first)."""

from .client import RealAlignClient, Sample, generate, numpy_to_tensor, tensor_to_numpy

__all__ = ["RealAlignClient", "Sample", "generate", "numpy_to_tensor", "tensor_to_numpy"]
