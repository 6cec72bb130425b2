"""The CPU allocator setting removes most page faults of re-allocated large activations."""

import subprocess
import sys

import pytest

PROBE = """
import resource, sys, torch
from glide_text2im.memory import retain_freed_memory
from glide_text2im.unet import ResBlock
torch.set_num_threads(1)
if sys.argv[1] == "retain":
    assert retain_freed_memory()
block = ResBlock(64, 256, 0.0, use_scale_shift_norm=True).eval()
x, emb = torch.randn(1, 64, 256, 256), torch.randn(1, 256)  # 16 MB activations
with torch.no_grad():
    for _ in range(2):
        block(x, emb)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        block(x, emb)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def minor_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return int(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt exists on Linux only")
def test_retained_memory_is_reused_without_page_faults():
    default, retained = minor_faults("default"), minor_faults("retain")
    assert default > 3 * 4096  # each call maps fresh 16 MB activations and faults their pages in
    assert retained < default / 4
