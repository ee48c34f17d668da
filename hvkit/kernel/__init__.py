"""Guest kernel files: what a kernel image is and which version it is.

Identification (later: headers, compiled layouts) builds on the version read here.
"""

from hvkit.kernel.image import KernelImage, read_kernel_image

__all__ = ["KernelImage", "read_kernel_image"]
