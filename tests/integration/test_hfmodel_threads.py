"""Two jobs' evaluations load their source models at the same time (``limits.concurrency = 2``): transformers is not
thread-safe there (a first import in two threads fails; two ``from_pretrained`` at once leave every later model of
the process with tensors on the meta device), so :mod:`converters.formats.hfmodel` loads one model at a time. In a fresh
interpreter (the damage is to the process), as the bot's runner threads do it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.models import tiny_random_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import sys, threading
errors = []
start = threading.Barrier(2)

def load(together):
    try:
        import torch
        from converters.formats import hfmodel
        if together:
            start.wait()
        hfmodel.load_tokenizer(sys.argv[1])
        model = hfmodel.load_causal_lm(sys.argv[1], dtype=torch.float32)
        model(torch.tensor([[1, 2, 3]]))
    except Exception as e:
        errors.append(f"{type(e).__name__}: {e}"[:300])

threads = [threading.Thread(target=load, args=(True,)) for _ in range(2)]
[t.start() for t in threads]
[t.join() for t in threads]
load(False)  # and the process can still load a model afterwards
print(errors)
"""


def test_two_threads_load_models_at_once() -> None:
    ckpt = tiny_random_checkpoint("llama")
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(ckpt)], cwd=REPO_ROOT, capture_output=True, text=True,
                       timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "[]", r.stdout[-3000:]
