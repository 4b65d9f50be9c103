"""Print the folder of libcudart.so.13 on this machine (the CUDA toolkit's, else one in an nvidia-* wheel), or
nothing: TVM's CUDA runtime library (libtvm_runtime_cuda.so) links against it."""

import glob
import os
import sys

PATTERNS = ["/usr/local/cuda*/lib64/libcudart.so.13*", "/usr/local/cuda*/targets/*/lib/libcudart.so.13*"]
PATTERNS += [os.path.join(p, "nvidia", "**", "libcudart.so.13*") for p in sys.path if p and os.path.isdir(p)]

for pattern in PATTERNS:
    hits = sorted(glob.glob(pattern, recursive=True))
    if hits:
        print(os.path.dirname(hits[0]))
        break
