"""Installable as a package: the wheel holds every module and data file, and, installed (not editable) into a
clean environment outside the checkout, gives a ``streamer`` that runs the demo with its built-in model."""

from __future__ import annotations

import asyncio
import os
import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from streamer import WorkerSettings

from .helpers import settings_env

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("schemas", "streamer", "producers", "consumers")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(ROOT)], check=True, timeout=300, capture_output=True)
    [built] = out.glob("streamer-*.whl")
    return built


def test_the_wheel_holds_every_module_and_data_file(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    want = {p.relative_to(ROOT).as_posix() for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")
            if "__pycache__" not in p.parts}
    want |= {f"{pkg}/py.typed" for pkg in PACKAGES}
    want |= {p.relative_to(ROOT).as_posix() for p in (ROOT / "streamer" / "pipelines").glob("*.toml")}
    want.add("schemas/WIRE.md")
    assert not want - names, sorted(want - names)
    assert not [n for n in names if n.split("/")[0] in ("tests", "bench", "examples")]


def _install(wheel: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A clean venv with the wheel installed (not editable); its python, and a folder outside the checkout."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    (Path(purelib) / "borrowed.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", purelib, str(wheel)],
                   check=True, timeout=300, capture_output=True)
    run = tmp_path / "elsewhere"
    run.mkdir()
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing of the checkout may come along
    where = subprocess.run([str(python), "-c", "import streamer, schemas; print(streamer.__file__, schemas.__file__)"],
                           cwd=run, env=clean, capture_output=True, text=True, check=True).stdout
    files = [Path(f) for f in where.split()]
    assert all(not f.is_relative_to(ROOT) and f.is_relative_to(purelib) for f in files), where
    return python, run


@pytest.mark.kafka
@pytest.mark.slow
async def test_the_installed_wheel_runs_the_demo_outside_the_checkout(wheel: Path, tmp_path: Path,
                                                                      worker_settings: WorkerSettings) -> None:
    """A clean virtual environment (its third-party packages borrowed from this one's, read as a plain path so
    that this checkout's editable install does not come along), the wheel installed into it, run from elsewhere."""
    python, run = await asyncio.to_thread(_install, wheel, tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = await asyncio.to_thread(
        subprocess.run, [str(python), "-m", "streamer", "demo", "--workers", "1", "--requests", "200", "--rate", "100",
                         "--rate-seconds", "1", "--partitions", "2", "--no-progress"],
        cwd=run, env={**env, **settings_env(worker_settings), "COLUMNS": "200"}, capture_output=True, text=True,
        timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "all 200 results match the model run directly" in " ".join(out.stderr.split())


def test_a_worker_process_does_not_load_replay() -> None:
    # `streamer worker` (the CLI, then consumers.Worker) loads neither replay's range reader nor its sinks; the
    # replay names of `consumers` still import on first use.
    code = ("import sys, streamer.app.cli\nfrom consumers import Worker\n"
            "print(sorted(m for m in sys.modules if m.startswith('consumers.replay')))\n"
            "from consumers import Engine, ReplayJob, ReplaySummary\nprint(Engine.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                         check=True).stdout.splitlines()
    assert out == ["[]", "consumers.replay.engine"], out
