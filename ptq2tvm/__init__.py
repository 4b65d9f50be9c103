"""ptq2tvm: post-training quantization of PyTorch CNNs to true-integer TVM shared libraries."""

__version__ = "0.1.0"
