"""The leaner CPU step of issue 26 changes how the experts run, never the function: the shipped
checkpoint still loads (its keys, old names included, are read strictly) and gives the logits it gave
before (recorded at commit 1c084bc with the `reference` and `sorted` back-ends), under every back-end
a CPU runs natively; a checkpoint loaded for a preset runs the preset's back-end.

Run: .venv/bin/python -m pytest tests/test_cpu_step.py -q
"""
from pathlib import Path

import pytest
import torch

from moe_lab.training.checkpoint import load_checkpoint
from moe_lab.core.config import preset
from moe_lab.model import expert_backends as B

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "data" / "checkpoints" / "moe_cpu.safetensors"
# logits of the shipped checkpoint in eval mode on torch.randint(0, 99, (4, 48), generator seeded 0),
# computed at commit 1c084bc (before issue 26): their sum, logits[0, -1, :6] and logits[3, 10, 40:44]
BEFORE_SUM = -17937.760745133142
BEFORE_ROW = [-6.112623691558838, -6.092432498931885, -5.946080684661865, -0.39452996850013733, 0.8107770681381226,
              -2.016779661178589]
BEFORE_COLS = [-1.8964171409606934, -0.5804296731948853, -0.8847723007202148, -2.4924309253692627]


@pytest.fixture(scope="module")
def shipped():
    if not SHIPPED.exists():
        pytest.skip("no shipped checkpoint in data/checkpoints/")
    model, _ = load_checkpoint(SHIPPED, expected=preset("cpu").moe)
    return model.eval()


@pytest.mark.parametrize("backend", [n for n in B.names(cpu_interpreted=False)])
def test_the_shipped_checkpoint_gives_the_logits_it_gave_before(shipped, backend):
    reason = B.status(backend, "cpu", torch.float32)
    if reason is not None:
        pytest.skip(reason)
    idx = torch.randint(0, shipped.cfg.vocab_size, (4, 48), generator=torch.Generator().manual_seed(0))
    shipped.set_backend(backend)
    with torch.no_grad():
        logits = shipped(idx)[0]
    assert logits.double().sum().item() == pytest.approx(BEFORE_SUM, rel=1e-6)
    torch.testing.assert_close(logits[0, -1, :6], torch.tensor(BEFORE_ROW), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[3, 10, 40:44], torch.tensor(BEFORE_COLS), rtol=1e-5, atol=1e-5)


def test_a_checkpoint_loaded_for_a_preset_runs_the_presets_backend(shipped):
    for name in ("reference", "sorted"):
        want = preset("cpu").moe
        want.moe.backend = name
        model, _ = load_checkpoint(SHIPPED, expected=want)
        assert {layer.backend for layer in model.moe_layers()} == {name}
