"""The playground's files and routes, without a browser (the browser tests are test_playground.py)."""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

import llmslim
from llmslim.server.page import STATIC, model_facts

STATIC_DIR = Path(llmslim.__file__).parent / "server" / "static"


def test_the_page_is_served_without_a_key(server):
    r = httpx.get(server.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "<title>llmslim playground</title>" in r.text
    policy = r.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy and "frame-ancestors 'none'" in policy
    for name, kind in STATIC.items():
        r = httpx.get(f"{server.url}/static/{name}")
        assert r.status_code == 200 and r.headers["content-type"] == kind
        assert r.content == (STATIC_DIR / name).read_bytes()


@pytest.mark.parametrize("path", ["/static/page.py", "/static/..%2Fpage.py", "/static/index.html", "/static/"])
def test_only_the_page_files_are_served(server, path):
    r = httpx.get(server.url + path)
    assert r.status_code == 404 and "error" in r.json()


def test_the_inline_script_is_allowed_by_its_hash_and_nothing_else(server):
    r = httpx.get(server.url + "/")
    scripts = re.findall(r"<script>(.*?)</script>", r.text, flags=re.S)
    assert len(scripts) == 1 and "location.replace" in scripts[0]  # the trailing-slash redirect
    digest = base64.b64encode(hashlib.sha256(scripts[0].encode()).digest()).decode()
    assert f"'sha256-{digest}'" in r.headers["content-security-policy"]


def test_no_outside_resources_and_only_relative_urls():
    """No CDN, and every URL relative to the page: it must work under a reverse proxy's sub-path."""
    for f in STATIC_DIR.iterdir():
        text = f.read_text()
        assert not re.search(r"https?://|//cdn|@import", text), f.name
        assert not re.search(r"""(src|href)=["']/""", text), f.name  # no root-relative links
    js = (STATIC_DIR / "app.js").read_text()
    paths = re.findall(r"""url\(\s*(?:chat \? )?["'`]([^"'`]+)["'`]""", js)
    assert paths and all(not p.startswith("/") for p in paths), paths
    assert "v1/llmslim/info" in paths


def test_every_page_file_ships_in_the_wheel():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((Path(llmslim.__file__).parent.parent / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["llmslim"]
    shipped = {p for g in globs for p in (Path(llmslim.__file__).parent).glob(g)}
    assert set(STATIC_DIR.iterdir()) <= shipped
    assert {f.name for f in STATIC_DIR.iterdir()} == {"index.html", *STATIC}


def test_info_needs_the_key(server, http):
    assert httpx.get(server.url + "/v1/llmslim/info").status_code == 401
    facts = http.get("/v1/llmslim/info").json()
    assert facts["id"] == "tiny" and facts["architecture"] == "LlamaForCausalLM" and facts["dtype"] == "float32"
    assert facts["quantization_config"] is None and facts["api_key_required"] is True
    assert facts["max_model_len"] == server.engine.max_model_len and facts["rss_bytes"] > 10_000_000
    assert facts["peak_rss_bytes"] >= facts["rss_bytes"] and facts["memory_bytes"] > 0


def test_facts_of_a_checkpoint_folder(tiny_folder):
    """Size on disk, quantization and pruning from the config, and the recipe that made it."""
    from llmslim.loader import load

    folder = Path(tiny_folder())
    (folder / "recipe.yaml").write_text("stages:\n  - rtn: {bits: 4}\n")
    (folder / "quant_log.json").write_text('{"source": "org/original"}')
    model, _ = load(str(folder))
    model.config.quantization_config = {"quant_method": "gptq", "bits": 4, "group_size": 64}
    model.config.pruning = [{"method": "wanda", "sparsity": 0.5}]
    engine = SimpleNamespace(model=model, max_model_len=256, max_batch=16, batched=True)
    state = SimpleNamespace(engine=engine, model_names=["served", str(folder)], name="served", api_key=None)
    facts = model_facts(state)
    assert facts["id"] == "served" and facts["folder"] == str(folder)
    assert facts["size_on_disk_bytes"] == sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    assert facts["quantization_config"]["bits"] == 4 and facts["pruning"][0]["method"] == "wanda"
    assert facts["recipe"].startswith("stages:") and facts["made_from"] == "org/original"
    assert facts["api_key_required"] is False
