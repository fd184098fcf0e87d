"""``prompts``: the evaluator of text-to-image models (IIF paper Table 2): per prompt, the mean reward and the
diversity of a fixed set of samples, and a grid of them."""
from __future__ import annotations

import torch

from iif.metrics.base import Evaluation
from iif.metrics.images import ImageEvaluator, image_grid, sc_loss

Tensor = torch.Tensor


def diversity(features: Tensor) -> float:
    """``1 - mean_{i<j} cos(f_i, f_j)`` of ``features [n, D]`` (``n >= 2``): the mean pairwise cosine distance of
    the samples' embeddings (IIF paper Table 2, with CLIP image embeddings)."""
    f = torch.nn.functional.normalize(features.double(), dim=1)
    n = f.shape[0]
    if n < 2:
        raise ValueError(f"diversity needs at least 2 samples, got {n}")
    cos = f @ f.T
    return 1.0 - (cos.sum() - cos.diagonal().sum()).item() / (n * (n - 1))


class PromptEvaluator(ImageEvaluator):
    """For each prompt ``p`` of the run, ``n_per_prompt`` samples drawn with fixed seeds (the same noise for every
    method and run seed: ``seed + 1000 * run_seed``), in batches of ``batch_size``; reports

    * ``reward_mean``, ``diversity``: over prompts, the mean of the per-prompt values;
    * ``reward_p<i>``, ``diversity_p<i>`` per prompt index ``i`` when there are several prompts;
      ``diversity = 1 - mean_{j<k} cos(E(x_j), E(x_k))`` over the prompt's samples, ``E`` a CLIP image encoder;
    * ``sc_loss``, ``kl_path`` (path methods) and ``sample_nfe`` as :class:`ImageEvaluator`.

    Args:
        base, reward: the run's (rewards see decoded pixels).
        prompts: the run's prompt list (``conditions.prompts``).
        n_per_prompt: samples per prompt (>= 2).
        batch_size: samples per sampler call (memory: a 512 px SD batch of 8 with CFG fits 24 GB).
        embedder: the image encoder of the diversity (``iif.rewards.clip.CLIPEncoder``; built by Hydra).
        seed, n_grid: see :class:`ImageEvaluator`.
    """

    def __init__(self, base, reward, sampler=None, prompts=(), n_per_prompt: int = 16, batch_size: int = 8,
                 embedder=None, seed: int = 12345, n_grid: int = 16):
        texts = [str(p) for p in prompts or ()]
        if not texts:
            raise ValueError("evaluation.prompts must list the run's prompts (conditions=prompts sets it)")
        if n_per_prompt < 2 or batch_size < 1:
            raise ValueError(f"evaluation.n_per_prompt must be >= 2 and evaluation.batch_size >= 1, got "
                             f"{n_per_prompt}, {batch_size}")
        if embedder is None:
            raise ValueError("evaluation.embedder must be an image encoder (e.g. iif.rewards.clip.CLIPEncoder)")
        super().__init__(base, reward, sampler, n_samples=len(texts) * n_per_prompt, seed=seed, n_grid=n_grid)
        self.texts, self.n_per_prompt, self.batch_size = texts, int(n_per_prompt), int(batch_size)
        self.embedder = embedder.place(base.device)

    def conditions(self, n: int) -> Tensor:
        """Prompt ``i`` for rows ``[i * n_per_prompt, (i + 1) * n_per_prompt)``."""
        return torch.arange(len(self.texts)).repeat_interleave(self.n_per_prompt)[:n]

    @torch.no_grad()
    def __call__(self, method, run_seed: int = 0, figures: bool = False, label: str = "samples") -> Evaluation:
        cond = self.conditions(self.n_samples)
        pixels, rewards, costs, nfe = [], [], [], 0
        with torch.random.fork_rng(devices=[self.base.device] if self.base.device.type == "cuda" else []):
            torch.manual_seed(self.seed + 1000 * run_seed)
            for start in range(0, self.n_samples, self.batch_size):
                # 1. a batch of samples of the method, with their prompts
                c = cond[start:start + self.batch_size]
                traj = method.sample(c.shape[0], cond=c)
                # 2. their rewards (the run's reward; on decoded pixels for a latent model) and the path cost
                rewards.append((self.reward.log_tilt(traj.x0, traj.cond) * self.reward.temperature).double().cpu())
                costs.append(None if traj.control_cost is None else traj.control_cost.double().cpu())
                pixels.append(self.base.decode(traj.x0).float().cpu())
                nfe = traj.nfe
        x, r = torch.cat(pixels), torch.cat(rewards)
        # 3. image embeddings of the samples, the diversity per prompt
        feats = torch.cat([self.embedder.image_features(x[i:i + self.batch_size].to(self.base.device)).float().cpu()
                           for i in range(0, x.shape[0], self.batch_size)])
        per_prompt = {}
        for i in range(len(self.texts)):
            rows = cond == i
            per_prompt[i] = (r[rows].mean().item(), diversity(feats[rows]))
        metrics = {"reward_mean": sum(v[0] for v in per_prompt.values()) / len(per_prompt),
                   "diversity": sum(v[1] for v in per_prompt.values()) / len(per_prompt), "sample_nfe": nfe}
        if len(self.texts) > 1:
            for i, (rm, dv) in per_prompt.items():
                metrics[f"reward_p{i}"], metrics[f"diversity_p{i}"] = rm, dv
        if all(c is not None for c in costs):
            cost = torch.cat(costs)
            metrics.update(sc_loss(cost, r / self.reward.temperature), kl_path=cost.mean().item())
        figs = {"samples": image_grid(x[: self.n_grid], label)} if figures else {}
        return Evaluation(metrics, x, figs)
