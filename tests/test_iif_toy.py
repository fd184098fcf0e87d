"""IIF on the 2D toy with the analytic base (no base-model error), scored against the exact tilted target.

The paper's claims: IIF reproduces the target's mode weighting; reward-only fine-tuning (no path RND in the
weights) collapses onto the highest-reward mode. Fixed seeds. The IIF run is the documented default command
(90 s on 2 CPU cores: 40 iterations of 2048 trajectories and 100 gradient steps).
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from iif.build import build
from iif.config import compose
from iif.guidance.oracle import ExactTiltGuidance
from iif.train import train

pytestmark = pytest.mark.slow  # multi-process, Slurm, CLI or pretraining: minutes; `make test` runs it



@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The documented default run of IIF through the CLI; reward-only in-process at the ci budget of figure1. The CLI
    run and the in-process runs overlap, one torch thread each (two cores: 1.5x the throughput of one after the
    other; the thresholds below do not depend on the threads' summation order)."""
    import os

    import torch

    out = {}
    run_dir = tmp_path_factory.mktemp("iif") / "run"
    env = dict(os.environ, WANDB_MODE="offline", CI="1")
    cli = subprocess.Popen([sys.executable, "-m", "iif.train", "experiment=toy2d", "method=iif",
                            "base_model=gmm_exact", "logger=none", "torch_threads=1", f"hydra.run.dir={run_dir}"],
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _in_process_runs(out, tmp_path_factory)
    finally:
        torch.set_num_threads(threads)
        _, err = cli.communicate(timeout=900)
    assert cli.returncode == 0, err[-2000:]
    out["iif"] = json.loads((run_dir / "metrics.json").read_text())
    return out


def _in_process_runs(out: dict, tmp_path_factory) -> None:
    cfg, choices = compose(["method=reward_only", "base_model=gmm_exact", "logger=none", "iterations=30"])
    out["reward_only"] = train(cfg, tmp_path_factory.mktemp("reward_only"), choices)
    # online fine-tuning at half figure1's budget (10 of its 20 iterations: it has plateaued by then); the best-gamma
    # guidance
    for method, its in (("pathwise", 10), ("cg_oracle", 30)):
        cfg, choices = compose([f"method={method}", "base_model=gmm_exact", "logger=none", f"iterations={its}"])
        out[method] = train(cfg, tmp_path_factory.mktemp(method), choices)
    cfg, choices = compose(["method=base", "base_model=gmm_exact", "logger=none"])
    out["base"] = train(cfg, tmp_path_factory.mktemp("base"), choices)
    # the exact optimal h* (closed form) on the same sampler, scored by the same evaluator
    cfg, _ = compose(["base_model=gmm_exact", "logger=none", "method=base"])
    comp = build(cfg)
    comp.method.guidance = ExactTiltGuidance(comp.base.prior, comp.evaluator.target.mixture, comp.base.schedule)
    out["oracle"] = comp.evaluator(comp.method).metrics


def test_default_iif_run_matches_exact_mode_weights(runs):
    """`iif-train experiment=toy2d method=iif base_model=gmm_exact` brings mode_tv below 0.05 (exact target
    samples give ~0.016 with the 10k evaluation samples; the exact h* on the same 100-step sampler ~0.02)."""
    assert runs["iif"]["mode_tv"] < 0.05


def test_reward_only_collapses(runs):
    """Without the RND the weights ignore how likely a path was: mass piles onto the highest-reward mode."""
    assert runs["reward_only"]["mode_tv"] > 0.2
    assert runs["reward_only"]["mode_tv"] > 4 * runs["iif"]["mode_tv"]
    assert runs["reward_only"]["reward_mean"] > runs["iif"]["reward_mean"]


def test_ordering_of_the_baselines(runs):
    """IIF beats classifier guidance even at its oracle gamma, which beats reward-only fine-tuning (the paper's
    gamma, max E[r], is worse still here: 0.43, see experiments/figure1/README.md)."""
    assert runs["iif"]["mode_tv"] < runs["cg_oracle"]["mode_tv"] < runs["reward_only"]["mode_tv"]


def test_pathwise_online_fine_tuning_moves_to_the_target(runs):
    """The pathwise SC-loss method (STL estimator) at 10 iterations (80 optimiser steps on 256 trajectories): most
    of the way from the base (mode_tv 0.44, SC loss 5.44) to the target (0.117 and 4.74 here; 0.115 after
    figure1's 20 iterations), and an SC loss far below the base's. It does not reach the 0.05 of IIF (0.10-0.12 over
    the settings tried; 0.098 after 1500 steps; experiments/figure1/README.md says why: a heavy-tailed gradient on a
    loss that is flat in the mode weights)."""
    assert runs["pathwise"]["mode_tv"] < 0.16
    assert runs["pathwise"]["mode_tv"] < runs["cg_oracle"]["mode_tv"]
    assert runs["pathwise"]["sc_loss"] < runs["base"]["sc_loss"] - 0.6


def test_iif_approaches_the_control_optimum(runs):
    """The SC loss KL(P^h || P^tilt) - log Z (§1.2): IIF ends within 0.03 nats of the exact h* on the same sampler
    (the discrete chain's own optimum lies a little lower; -log Z of the continuous problem is 4.589, of the
    100-step chain about 4.563), the base 0.8 nats above, reward-only far from it."""
    assert runs["oracle"]["mode_tv"] < 0.035
    assert runs["iif"]["sc_loss"] < runs["oracle"]["sc_loss"] + 0.03
    assert runs["reward_only"]["sc_loss"] > runs["iif"]["sc_loss"] + 0.1
