import os
import stat

import pytest

from llmslim.util import staged_output


def test_staged_output_gives_files_the_usual_permissions(tmp_path):
    out = tmp_path / "ckpt"
    with staged_output(out, force=False) as part:
        f = part / "model.safetensors"
        f.write_bytes(b"x")
        f.chmod(0o600)  # as files written through mkstemp are
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((out / "model.safetensors").stat().st_mode) == 0o666 & ~umask


def test_staged_output_leaves_out_untouched_on_failure(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "old").write_text("keep")
    with pytest.raises(RuntimeError), staged_output(out, force=True) as part:
        (part / "new").write_text("half")
        raise RuntimeError("crash")
    assert (out / "old").read_text() == "keep" and not (out / "new").exists()


def _fresh_page_faults(pages: int) -> int:
    """Minor faults counted for writing ``pages`` freshly mapped pages (one each on Linux)."""
    import mmap
    import resource

    buf = mmap.mmap(-1, pages * mmap.PAGESIZE)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for i in range(pages):
        buf[i * mmap.PAGESIZE] = 1
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    buf.close()
    return faults


_CHURN = """
import json, resource, torch
from llmslim.util import heap_allocations, map_large_allocations

def faults_of_churn(numel):
    # minor page faults of making and freeing a tensor 20 times, once the heap has grown
    for _ in range(20):
        torch.empty(numel).fill_(1.0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        torch.empty(numel).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

small, large = 2**19, 2**22  # 2 MB (a search's piece), 16 MB (above the 4 MB threshold)
map_large_allocations()
mapped = faults_of_churn(small)
with heap_allocations():
    heap = faults_of_churn(small)
    heap_large = faults_of_churn(large)
after = faults_of_churn(large)  # (a small one may reuse a free heap chunk: glibc's bins come first)
print(json.dumps([small, large, mapped, heap, heap_large, after]))
"""


def test_heap_allocations_stop_the_page_faults_of_repeated_large_temporaries():
    """Mapped afresh, every large temporary is faulted in page by page; from the heap the pages are
    reused. Whole-matrix sizes (above the threshold) keep their own pages, inside and afterwards.
    In a fresh process: glibc serves even a 16 MB request from a free chunk of its heap before it
    maps one, so a test process whose heap has holes (after a quantize run: the packed weights stay
    allocated above them) would reuse pages whatever the thresholds say."""
    import json
    import subprocess
    import sys

    from llmslim.util import _libc

    if _libc() is None:
        pytest.skip("glibc's malloc tunables only")
    if _fresh_page_faults(256) == 0:  # gVisor-like sandboxes report no minor faults at all
        pytest.skip("this kernel does not count minor page faults (getrusage's ru_minflt stays 0)")
    out = subprocess.run([sys.executable, "-c", _CHURN], capture_output=True, text=True, check=True).stdout
    small, large, mapped, heap, heap_large, after = json.loads(out.splitlines()[-1])
    counts = (mapped, heap, heap_large, after)
    assert mapped > 20 * small * 4 // 4096 // 2, counts  # about one fault per page, every time
    assert heap < mapped / 10, counts
    assert heap_large > 20 * large * 4 // 4096 // 2, counts
    assert after > 20 * large * 4 // 4096 // 2, counts


def test_update_json_adds_a_key_and_keeps_the_others(tmp_path):
    import json

    from llmslim.util import update_json

    path = tmp_path / "raw.json"
    update_json(path, "before", [1, 2])
    update_json(path, "after", {"ms": 8.5})
    update_json(path, "before", [3])
    assert json.loads(path.read_text()) == {"before": [3], "after": {"ms": 8.5}}
    assert [p.name for p in tmp_path.iterdir()] == ["raw.json"]  # no temporary left behind
