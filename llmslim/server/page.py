"""The chat playground at ``GET /``, its static files, and the model facts it shows.

The page (``static/index.html``, ``app.js``, ``style.css``: plain HTML/CSS/JS, shipped as package
data, nothing fetched from elsewhere) is served without a key: it holds no data. Everything it
shows comes through the API, with the key the user types in: the answers from
``/v1/chat/completions`` and ``/v1/completions``, the facts from ``GET /v1/llmslim/info`` (under
``/v1/``, so the server's key check covers it like every other API route).

Every URL the page uses is relative, so the page works unchanged behind a reverse proxy that
mounts the server at a sub-path (``https://host/llm/`` -> ``http://127.0.0.1:8000/``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from functools import cache
from importlib import resources
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ..util import rss_bytes

router = APIRouter()

STATIC = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


@cache
def _asset(name: str) -> bytes:
    return resources.files("llmslim.server").joinpath("static", name).read_bytes()


@cache
def _policy() -> str:
    """Content-Security-Policy of the page: its own files only (no CDN can load, nothing can frame it);
    the one inline script (the trailing-slash redirect) is allowed by its hash."""
    page = _asset("index.html").decode()
    hashes = [base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()
              for s in re.findall(r"<script>(.*?)</script>", page, flags=re.S)]
    scripts = " ".join(["'self'", *(f"'sha256-{h}'" for h in hashes)])
    return (f"default-src 'none'; script-src {scripts}; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def _headers(policy: bool = False) -> dict[str, str]:
    h = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
    if policy:
        h |= {"Content-Security-Policy": _policy(), "Referrer-Policy": "no-referrer"}
    return h


@router.get("/", include_in_schema=False)
async def playground() -> Response:
    return Response(_asset("index.html"), media_type="text/html; charset=utf-8", headers=_headers(policy=True))


@router.get("/static/{name}", include_in_schema=False)
async def static(name: str) -> Response:
    if name not in STATIC:
        raise HTTPException(404, f"no static file {name!r}")
    return Response(_asset(name), media_type=STATIC[name], headers=_headers())


@router.get("/v1/llmslim/info")
async def info(request: Request) -> dict:
    """What the playground shows about the served model: its quantization and pruning, its size on
    disk and this process's memory (resident now and at peak)."""
    facts = getattr(request.app.state, "llmslim_page_facts", None)
    if facts is None:  # the static part once: it walks the folder and the model's parameters
        facts = await run_in_threadpool(model_facts, request.app.state.llmslim)
        request.app.state.llmslim_page_facts = facts
    current, peak = rss_bytes()
    return facts | {"rss_bytes": current, "peak_rss_bytes": peak}


def model_facts(state) -> dict:
    from .. import __version__

    engine = state.engine
    model = engine.model
    config = getattr(model, "config", None)
    checkpoint = state.model_names[-1]
    folder = _folder(checkpoint, getattr(model, "name_or_path", None) or getattr(config, "_name_or_path", None))
    qc = getattr(config, "quantization_config", None)
    if qc is not None and not isinstance(qc, dict):
        qc = qc.to_dict() if hasattr(qc, "to_dict") else str(qc)
    params = list(model.parameters()) + list(model.buffers())
    floats = [p.dtype for p in params if p.is_floating_point()]
    facts = {
        "id": state.name,
        "checkpoint": checkpoint,
        "folder": str(folder) if folder else None,
        "architecture": (getattr(config, "architectures", None) or [type(model).__name__])[0],
        "model_type": getattr(config, "model_type", None),
        "dtype": str(floats[0]).replace("torch.", "") if floats else None,
        "quantization_config": qc,
        "pruning": getattr(config, "pruning", None),
        "size_on_disk_bytes": _weight_bytes(Path(checkpoint).expanduser()) or (_weight_bytes(folder) if folder else 0)
        or None,
        "memory_bytes": sum(p.numel() * p.element_size() for p in params),
        "max_model_len": engine.max_model_len,
        "max_batch": engine.max_batch,
        "batched": engine.batched,
        "api_key_required": state.api_key is not None,
        "llmslim_version": __version__,
        "recipe": None,
        "made_from": None,
    }
    if folder is not None:
        recipe = folder / "recipe.yaml"
        if recipe.is_file():
            facts["recipe"] = recipe.read_text(encoding="utf-8", errors="replace")
        log = folder / "quant_log.json"
        try:
            facts["made_from"] = json.loads(log.read_text()).get("source") if log.is_file() else None
        except (OSError, ValueError, AttributeError):
            pass
    return facts


def _folder(*candidates: str | None) -> Path | None:
    for c in candidates:
        if c and Path(c).expanduser().is_dir():
            return Path(c).expanduser()
    return None


def _weight_bytes(path: Path | None) -> int:
    if path is None:
        return 0
    if path.is_file():
        return path.stat().st_size if path.suffix in WEIGHT_SUFFIXES else 0
    if path.is_dir():
        return sum(p.stat().st_size for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    return 0
