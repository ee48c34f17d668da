"""The default guest: a Debian cloud kernel with a busybox initramfs built into hvkit's
cache, its workloads, and the ground truth it exports about its own memory."""

from hvkit.guest.build import GuestArtifacts, build_default_guest
from hvkit.guest.groundtruth import GroundTruth, parse_ground_truth
from hvkit.guest.workload import Workload

__all__ = ["GroundTruth", "GuestArtifacts", "Workload", "build_default_guest",
           "parse_ground_truth"]
