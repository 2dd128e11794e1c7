"""A golden run: the tiny recipe, in process on CPU with a fixed seed, must reproduce its loss terms
at every step. A change to the method (a loss term, a schedule, the student, the optimiser, the
reader's batches) shows up here as a failing number, not only in a reference comparison.

What it runs: configs/tiny.yaml on the session's synthetic world (shards through the real
reader), DL-DKD++ with a randomly initialised tiny teacher (seeded like the student), 2 epochs
of 4 steps, random negatives in epoch 0 and hard ones in epoch 1, and the schedule horizon
stretched (loss.schedule_epochs=60) so lambda, alpha and beta move between the steps.

The tolerance: rtol 1e-3. The same run with 1 and with 2 torch threads (a different reduction
order in every matmul) differed by at most 1.6e-7 relative over all terms of all 8 steps, which is
float32 rounding; kernels of another CPU or MKL build may differ more, so the bound leaves a
margin of about 6000x. A real change moves the numbers much further: loss.nce_weight 0.04 ->
0.0404 (1%) moved the total loss by 1.4e-3 to 3e-2 at each step; loss.kd_schedule=exp_up by
3e-2 to 0.35. If a deliberate change of the method moves them, re-record GOLDEN (run this test;
the message prints the new values) and say why in the commit.
"""
from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import tiny_overrides
from trainer.config import load_config
from trainer.recipe import Recipe

pytestmark = pytest.mark.slow
RTOL = 1e-3
TERMS = ("inh_trip", "inh_nce", "inh_kd", "exp_trip", "exp_nce", "loss")
# Step -> the terms above, recorded from this run (OMP_NUM_THREADS=1, as tests/conftest.py sets).
GOLDEN = {
    1: (0.182787, 5.63555, 4.59638, 0.215346, 6.06858, 1.32594),
    2: (0.210523, 5.92678, 5.59685, 0.222111, 5.83082, 1.28389),
    3: (0.177254, 5.58828, 4.37291, 0.151084, 5.25346, 0.964601),
    4: (0.165319, 5.26372, 5.49352, 0.144637, 5.46313, 0.912263),
    5: (0.341892, 5.83229, 5.97899, 0.3654, 5.54846, 1.29085),
    6: (0.309537, 5.01223, 5.22008, 0.318567, 4.82997, 1.09805),
    7: (0.309457, 4.93368, 6.47834, 0.384694, 4.90456, 1.1521),
    8: (0.287971, 5.23874, 5.74621, 0.320527, 4.42801, 1.03406),
}


def test_tiny_recipe_reproduces_its_losses(world, tmp_path):
    cfg = load_config("configs/tiny.yaml", tiny_overrides(world, tmp_path, "golden", **{
        "data.val": "", "train.epochs": 2, "data.steps_per_epoch": 4, "train.seed": 9527,
        "loss.hard_negative_start_epoch": 1, "loss.schedule_epochs": 60,
        "teacher.pretrained": "", "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}))
    assert cfg.uses_teacher() and cfg.loss.targets == "soft" and cfg.loss.kd == "dynamic"
    recipe = Recipe(cfg, use_deepspeed=False)
    recipe.setup()
    seen: dict[int, tuple[float, ...]] = {}
    step = recipe.train_step

    def recorded(batch, weights, timer):
        terms = step(batch, weights, timer)
        seen[recipe.state.step + 1] = tuple(float(terms[k]) for k in TERMS)
        return terms

    recipe.train_step = recorded
    try:
        state = recipe.train()
    finally:
        recipe.cleanup()
    assert state.step == 8 and sorted(seen) == sorted(GOLDEN)
    got, want = np.array([seen[s] for s in GOLDEN]), np.array(list(GOLDEN.values()))
    new = "\n".join(f"    {s}: ({', '.join(f'{v:.6g}' for v in seen[s])})," for s in GOLDEN)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=0, err_msg=f"this run:\n{new}")
