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
