"""``charlm export --format web``: a static folder that generates in the browser with onnxruntime-web.

The folder: ``index.html`` and ``app.js`` (the page), ``model.onnx`` and ``model.tokenizer.json``
(the export of :mod:`charlm.export.graph`), ``charlm.json`` (what the page needs from the model's
metadata), onnxruntime-web's WebAssembly build (``ort.wasm.min.js``, ``ort-wasm-simd-threaded.mjs``
and ``.wasm``), so nothing is loaded from a CDN and any static file server works (the page asks for
one thread, which needs no cross-origin isolation headers), and the marker ``.charlm`` that lists
them. The folder is replaced whole, and only when it is new, empty or an earlier web export holding
nothing else (:mod:`charlm.outputs`).

onnxruntime-web comes from the npm registry's package tarball, pinned by version and checksum, and
is cached (``$CHARLM_CACHE_DIR``); ``$CHARLM_ORT_WEB`` may name a copy of that tarball instead.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from importlib import resources
from pathlib import Path

from charlm.corpus import _copy_stream, _sha256_file
from charlm.export.graph import ExportError, export_onnx, metadata, replace_tree
from charlm.outputs import (check_folder, check_not_cwd, check_not_inside_owned, check_parent, folder_mode,
                            new_folders, resolve_path, temp_prefix, write_marker)
from charlm.tokens import cache_root

ORT_WEB_VERSION = "1.30.0"
ORT_WEB_URL = f"https://registry.npmjs.org/onnxruntime-web/-/onnxruntime-web-{ORT_WEB_VERSION}.tgz"
# sha256 of that tarball; the registry's integrity for it is sha512-q0y+JrrtukXSzsBWEMccVfqX25LRmosXHF+CaRJmg8pZ
# ClzcV7svNc4rKY3jL02Vb7QmRMDs1SigqR4CXAfKYQ== (npm view onnxruntime-web@1.30.0 dist.integrity)
ORT_WEB_SHA256 = "d2228df7e4616bc3348bf504ee888f3bec43789a273f0a63f3e68d203ce3bf71"
ORT_WEB_FILES = ("ort.wasm.min.js", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
ORT_WEB_ENV = "CHARLM_ORT_WEB"
PAGE_FILES = ("index.html", "app.js")


def export_web(ckpt, out: str | os.PathLike, progress: bool = True, quantize: str | None = None) -> Path:
    """Write the folder ``out`` (replacing an earlier web export there); nothing half-written is left, and a
    folder or file charlm did not write is refused, untouched."""
    out = resolve_path(out)  # (q/../site is site, checked as such)
    check_not_cwd(out)
    check_parent(out)
    check_not_inside_owned(out, "web")
    check_folder(out, "web")
    runtime = ort_web_files(progress)  # before anything is written: no fetch, no folder
    parent = out.parent
    try:
        with new_folders(parent):
            _write_site(ckpt, out, runtime, quantize)
    except OSError as exc:
        raise ExportError(f"--out: cannot write in {parent} ({exc.strerror or exc})") from None
    return out


def _write_site(ckpt, out: Path, runtime: dict, quantize: str | None) -> None:
    """The page's folder, built beside ``out`` and moved into place (:func:`~charlm.export.graph.replace_tree`)."""
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=temp_prefix(out.name)))
    try:
        export_onnx(ckpt, tmp / "model.onnx", quantize=quantize)
        # (the corpus's path stays off a page that may be published)
        page_meta = {k: v for k, v in metadata(ckpt, "", quantize).items() if k not in ("tokenizer_sha256", "corpus")}
        page_meta["onnxruntime_web"] = ORT_WEB_VERSION
        (tmp / "charlm.json").write_text(json.dumps(page_meta), encoding="utf-8")
        for name, data in runtime.items():
            (tmp / name).write_bytes(data)
        for name in PAGE_FILES:
            (tmp / name).write_text(resources.files("charlm.export.page").joinpath(name).read_text(encoding="utf-8"),
                                    encoding="utf-8")
        write_marker(tmp, "web", [p.name for p in tmp.iterdir()])
        for path in tmp.iterdir():
            os.chmod(path, 0o644)
        os.chmod(tmp, folder_mode(out) or 0o755)  # an existing folder keeps its mode; a new one is readable
        replace_tree(tmp, out, "web", last="index.html")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ort_web_files(progress: bool = True) -> dict[str, bytes]:
    """onnxruntime-web's files the page needs, from the pinned tarball (fetched once, then cached)."""
    local = os.environ.get(ORT_WEB_ENV, "").strip()
    cached = cache_root() / f"onnxruntime-web-{ORT_WEB_VERSION}.tgz"
    path = Path(local) if local else cached
    if not path.is_file() or _sha256_file(path) != ORT_WEB_SHA256:
        if local:
            raise ExportError(f"${ORT_WEB_ENV}={local} is not onnxruntime-web {ORT_WEB_VERSION}'s npm tarball "
                              f"(missing, or its sha256 differs)")
        _fetch(cached, progress)
    with tarfile.open(path, "r:gz") as tar:
        return {name: tar.extractfile(f"package/dist/{name}").read() for name in ORT_WEB_FILES}


def _fetch(target: Path, progress: bool) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    except OSError as exc:
        raise ExportError(f"cannot write the onnxruntime-web cache in {target.parent} ({exc.strerror or exc})") \
            from None
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(ORT_WEB_URL, timeout=60) as response:
            length = response.headers.get("Content-Length")
            _copy_stream(response, out, int(length) if length else None, f"onnxruntime-web {ORT_WEB_VERSION}",
                         progress)
        if _sha256_file(tmp) != ORT_WEB_SHA256:
            raise ExportError(f"{ORT_WEB_URL} sent a file whose sha256 is not the pinned one; nothing was kept")
        os.replace(tmp, target)
    except (OSError, urllib.error.URLError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
        raise ExportError(f"cannot fetch onnxruntime-web {ORT_WEB_VERSION} from the npm registry ({reason}); "
                          f"offline, set ${ORT_WEB_ENV} to a copy of {ORT_WEB_URL.rsplit('/', 1)[1]}") from None
    finally:
        tmp.unlink(missing_ok=True)
