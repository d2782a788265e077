import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_DEFAULT_MIRROR = REPO.parent / "shared" / "corpora"

# Every process a test starts inherits this variable (tests pass {**os.environ, ...} to their children), so
# the processes of this test run can be found at the end, orphans included (a torchrun worker lives in a
# session of its own and outlives a killed torchrun), wherever they were reparented.
RUN_MARK = "CHARLM_TEST_RUN"


def marked_processes(name: str, value: str) -> list[int]:
    """Live (not zombie) processes whose environment holds ``name=value``, this one excluded."""
    needle = f"{name}={value}".encode()
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if int(proc.name) == os.getpid() or proc.joinpath("stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            if needle in proc.joinpath("environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def kill_marked(name: str, value: str, timeout: float = 10.0) -> list[int]:
    """SIGKILL every process marked ``name=value`` (stopped ones too) and wait until none is left; the pids."""
    pids = marked_processes(name, value)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while marked_processes(name, value) and time.monotonic() < deadline:
        time.sleep(0.05)
    return pids


def stop_process(p: subprocess.Popen) -> None:
    """Kill a process a test started, if it is still running, and reap it."""
    if p.poll() is None:
        p.kill()
    p.wait(timeout=30)


def pytest_configure(config):
    os.environ[RUN_MARK] = str(os.getpid())


def pytest_sessionfinish(session, exitstatus):
    """No process of this test run may outlive it: any left is killed, named, and fails the run."""
    if sys.platform != "linux" or os.environ.get(RUN_MARK) != str(os.getpid()):
        return
    left = {pid: _command_line(pid) for pid in marked_processes(RUN_MARK, str(os.getpid()))}
    if not left:
        return
    kill_marked(RUN_MARK, str(os.getpid()))
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.ensure_newline()
        reporter.write_line(f"FAILED: {len(left)} process(es) started by the tests were still running (now killed):",
                            red=True)
        for pid, command in left.items():
            reporter.write_line(f"  {pid}: {command}", red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


@pytest.fixture(scope="session")
def mirror() -> Path:
    """The offline corpus mirror (CHARLM_CORPUS_MIRROR, else ../shared/corpora beside the repo)."""
    path = Path(os.environ.get("CHARLM_CORPUS_MIRROR") or _DEFAULT_MIRROR).resolve()  # tests chdir
    if not (path / "timemachine.txt").is_file():
        pytest.skip("no corpus mirror: set CHARLM_CORPUS_MIRROR to a folder holding timemachine.txt")
    return path


SENTENCE = ("the time traveller for so it will be convenient to speak of him was expounding a recondite "
            "matter to us his grey eyes shone and twinkled and his usually pale face was flushed and animated\n")


@pytest.fixture
def write_corpus(tmp_path):
    """``write_corpus(repeats, name="tiny.txt", upper=False)``: a corpus file in ``tmp_path`` holding one
    sentence of The Time Machine ``repeats`` times (the few KB that training tests run on)."""

    def write(repeats: int, name: str = "tiny.txt", upper: bool = False) -> Path:
        path = tmp_path / name
        path.write_text((SENTENCE.upper() if upper else SENTENCE) * repeats)
        return path

    return write


def rewrite_config(checkpoint, config: dict) -> None:
    """Write ``config`` as the checkpoint folder's config.json and its sha256 into manifest.json, as charlm
    would have written them (a checkpoint of an older charlm, or one edited by hand)."""
    import hashlib
    import json

    checkpoint = Path(checkpoint)
    (checkpoint / "config.json").write_text(json.dumps(config))
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest["config.json"] = hashlib.sha256((checkpoint / "config.json").read_bytes()).hexdigest()
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture
def corpus(write_corpus):
    """About 2.4 KB: the sentence 12 times."""
    return write_corpus(12)


@pytest.fixture(autouse=True)
def _token_cache(monkeypatch, tmp_path_factory):
    """Tests prepare corpora into a cache of their own, never the user's ~/.cache/charlm."""
    monkeypatch.setenv("CHARLM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "token-cache"))


@pytest.fixture(autouse=True)
def _offline_mirror(monkeypatch):
    """Every test reads known corpora from the mirror, never from the network."""
    path = Path(os.environ.get("CHARLM_CORPUS_MIRROR") or _DEFAULT_MIRROR).resolve()
    monkeypatch.setenv("CHARLM_CORPUS_MIRROR", str(path) if path.is_dir() else str(REPO / "no-mirror"))


@pytest.fixture(scope="session")
def load_script():
    """Import a script that is not part of the package by its path in the repo, e.g. ``scripts/x.py``."""

    def load(relative_path: str):
        path = REPO / relative_path
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="session")
def tiny_disk():
    """Run ``command`` with a ``size``-byte tmpfs mounted at ``where``, in a private mount namespace
    (``unshare -rm``): a real full disk that vanishes with the process. Skips where Linux does not
    allow it. Returns the ``subprocess.CompletedProcess``."""
    if sys.platform != "linux" or not shutil.which("unshare"):
        pytest.skip("needs Linux's unshare")
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=4k tmpfs /mnt"],
                           capture_output=True, timeout=30)
    if probe.returncode:
        pytest.skip("user and mount namespaces are not allowed here")

    def run(where: Path, size: str, command: str) -> subprocess.CompletedProcess:
        script = f"mount -t tmpfs -o size={size} tmpfs {where} && {command}"
        return subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})

    return run
