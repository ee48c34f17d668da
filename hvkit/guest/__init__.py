"""hvkit's guests: a Debian kernel (the default: the cloud kernel of the machine's Debian;
or any Debian kernel package) with a busybox initramfs built into hvkit's cache, its
workloads, and the ground truth it exports about its own memory."""

from hvkit.guest.build import GuestArtifacts, build_default_guest, build_kernel_guest, guest_of_kernel
from hvkit.guest.groundtruth import GroundTruth, parse_ground_truth
from hvkit.guest.workload import Workload

__all__ = ["GroundTruth", "GuestArtifacts", "Workload", "build_default_guest", "build_kernel_guest",
           "guest_of_kernel", "parse_ground_truth"]
