"""bench/quality.py --recover-barrier: recoveries that share a GPU and a deadline start together (the
like-for-like protocol of bench/gpu_long_recovery.sh), and a process left alone is let go at the deadline."""
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import quality  # noqa: E402


def test_the_first_process_ready_waits_for_the_others(tmp_path, monkeypatch):
    monkeypatch.setattr(quality, "RECOVER_UNTIL", time.time() + 60)
    started = {}

    def process(name, delay):
        time.sleep(delay)
        quality.wait_for_others(str(tmp_path / "ready"), 2, name)
        started[name] = time.monotonic()
    t0 = time.monotonic()
    early = threading.Thread(target=process, args=("sparsegpt", 0.0))
    late = threading.Thread(target=process, args=("proxsparse", 1.5))    # still learning its mask
    early.start(), late.start()
    early.join(10), late.join(10)
    assert started["sparsegpt"] - t0 >= 1.4                               # it waited for the late one
    assert abs(started["sparsegpt"] - started["proxsparse"]) < 0.8


def test_a_process_left_alone_goes_at_the_deadline(tmp_path, monkeypatch):
    monkeypatch.setattr(quality, "RECOVER_UNTIL", time.time() + 1.0)
    t0 = time.monotonic()
    quality.wait_for_others(str(tmp_path / "ready"), 2, "alone")
    assert 0.8 <= time.monotonic() - t0 < 5
