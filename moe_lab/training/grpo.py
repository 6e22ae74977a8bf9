"""Group Relative Policy Optimization (GRPO) on verifiable arithmetic (notebook 08).

GRPO (Shao et al. 2024, "DeepSeekMath", section 4.1) is PPO without a value network. For every
prompt q it samples a *group* of G answers o_1..o_G from the current policy, scores each with a
reward r_i, and uses the group itself as the baseline:

    A_i = (r_i - mean(r_1..r_G)) / std(r_1..r_G)                        (the advantage of every token of o_i)

    J(θ) = E[ 1/G Σ_i 1/|o_i| Σ_t  min( ρ_it A_i , clip(ρ_it, 1-ε, 1+ε) A_i )  -  β KL_it ]
           with ρ_it = π_θ(o_it | q, o_i<t) / π_old(o_it | q, o_i<t)

    KL_it = π_ref/π_θ - log(π_ref/π_θ) - 1                              (the "k3" estimator, always >= 0)

The steps, in the order of the paper's Algorithm 1 and of this module:

    1. rollouts     sample_rollouts()      G completions per prompt from π_old (the policy, frozen for the batch)
    2. rewards      rewards()              the task's verifier, plus a small format reward
    3. advantages   group_advantages()     reward minus group mean, over group std
    4. log-probs    token_logprobs()       under the policy (with gradient), π_old and π_ref (without),
                                           all at the sampling temperature
    5. objective    grpo_loss()            clipped surrogate, k3 KL penalty, and the aggregation over tokens
    6. μ updates    GRPOTrainer.step()     μ optimiser steps on the same rollouts, then back to 1.

Everything a learner may want to vary is a field of GRPOConfig. Where this module simplifies the
paper: no value model (as in GRPO), rewards are outcome rewards (no process supervision), the
reference model is the starting checkpoint for the whole run (the paper refreshes it between
iterations of its iterative variant), and answers are a few tokens long.
"""
from __future__ import annotations

import copy
import math
import numbers
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from moe_lab.core.config import boolean, check_argument, choice, integer, number, validated
from moe_lab.core.runtime import check_mode, detect_mode
from moe_lab.data.tasks import ArithmeticTask, Problem
from moe_lab.data.tokenizer import TOKENIZER
from moe_lab.training.evaluation import generate_completions, solve
from moe_lab.training.loop import optimizer_step

Aggregation = Literal["sequence", "token", "constant"]
AGGREGATIONS = ("sequence", "token", "constant")
ADVANTAGES = ("group", "group_mean", "batch_mean")


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------
@validated(
    steps=integer(1), prompts_per_step=integer(1), group_size=integer(2, why="a group of one has no baseline"),
    temperature=number(0, lo_open=True, why="rollouts are sampled, never greedy"),
    lr=number(0, lo_open=True), warmup_steps=integer(0), clip_eps=number(0, 1, lo_open=True, hi_open=True),
    beta=number(0), inner_updates=integer(1), aggregation=choice(*AGGREGATIONS), advantage=choice(*ADVANTAGES),
    format_weight=number(0), balance_coef=number(0), update_router_biases=boolean(), grad_clip=number(0),
    eval_every=integer(1), eval_problems=integer(1), seed=integer(0, 2**32 - 1),
)
@dataclass
class GRPOConfig:
    """Every knob of a GRPO run. Defaults are the CPU preset calibrated for notebook 08."""

    steps: int = 500  # rollout batches (each followed by `inner_updates` optimiser steps)
    prompts_per_step: int = 32  # distinct problems per batch
    group_size: int = 8  # G: completions sampled per problem (>= 2: a group of one has no baseline)
    temperature: float = 0.7  # sampling temperature of the rollouts, > 0 (1.0 = the policy itself; see grpo_preset)
    lr: float = 1e-4  # AdamW learning rate (constant after a short warm-up)
    warmup_steps: int = 10  # linear warm-up of the learning rate, in optimiser steps
    clip_eps: float = 0.2  # ε of the clipped surrogate
    beta: float = 0.04  # β: weight of the KL penalty to the reference model (0 = no reference needed)
    inner_updates: int = 1  # μ: optimiser steps per batch of rollouts
    aggregation: Aggregation = "sequence"  # how token terms become one loss (see grpo_loss)
    advantage: str = "group"  # "group" (GRPO), "group_mean" (Dr. GRPO: no std), "batch_mean" (REINFORCE)
    format_weight: float = 0.1  # reward for a well-formed answer, added to the 1.0 of a correct one
    balance_coef: float = 0.0  # weight of the MoE routers' balance loss in the RL loss (0 = dropped)
    update_router_biases: bool = False  # keep DeepSeek-V3's aux-loss-free bias rule running during RL
    grad_clip: float = 1.0  # clip the global gradient norm (0 = off)
    eval_every: int = 50  # held-out exact match every this many steps (and at the start and end)
    eval_problems: int = 500  # held-out problems per evaluation (greedy decoding)
    seed: int = 0  # seeds problem order and sampling

    def to_dict(self) -> dict:
        return asdict(self)


def grpo_preset(mode: Optional[str] = None) -> GRPOConfig:
    """The GRPO run of notebook 08 for a mode ("gpu", "cpu", "ci"; None = the mode runtime picks here).

    Calibrated on a 2-core CPU (README, "Figures measured on this 2-core CPU": the figures, their
    spread over seeds and their commands, `python -m moe_lab rl-spread`): temperature 0.7 (at 1.0
    fewer samples are right and learning is slower), router biases frozen during RL (the bias rule
    reacts to the narrow RL data and moves the reference's routing under the policy), β = 0.04 as in
    DeepSeekMath.
    """
    mode = check_mode(detect_mode() if mode is None else mode, "grpo_preset: mode")
    if mode == "ci":  # the spread of its 5 seeds: README, `python -m moe_lab rl-spread --mode ci --seeds 0-4`
        return GRPOConfig(steps=100, eval_every=50)
    if mode == "cpu":
        return GRPOConfig(steps=500, eval_every=50)
    if mode == "gpu":  # not yet measured on a GPU: larger batches of the same small model
        return GRPOConfig(steps=500, prompts_per_step=64, group_size=16, eval_every=50)
    raise AssertionError(mode)  # check_mode let through a mode this function does not know


# --------------------------------------------------------------------------------------------------
# 1. Rollouts
# --------------------------------------------------------------------------------------------------
@dataclass
class Rollouts:
    """A batch of P prompts x G completions, as one right-padded token tensor.

    Row i*G + j holds problem i's j-th completion: newline, prompt, completion, then padding.
    Because attention is causal, padding at the end changes nothing before it.
    """

    tokens: Tensor  # (P*G, L) token ids
    completion_mask: Tensor  # (P*G, L-1) 1.0 where target tokens[:, t+1] belongs to the completion
    texts: list[str]  # the P*G completions as text (up to and including the stop newline)
    problems: list[Problem]  # the P*G problems (each repeated G times)
    group_size: int

    @property
    def n_groups(self) -> int:
        return len(self.texts) // self.group_size

    @property
    def lengths(self) -> Tensor:
        """Completion length of each row in tokens (the stop newline included)."""
        return self.completion_mask.sum(1)


@torch.no_grad()
def sample_rollouts(model, problems: Sequence[Problem], group_size: int, temperature: float = 1.0,
                    max_new_tokens: Optional[int] = None, generator: Optional[torch.Generator] = None,
                    tok=TOKENIZER, use_cache: bool = True) -> Rollouts:
    """Step 1: sample `group_size` completions of every problem, stopping at the first newline.

    Prompts of equal length are generated together (no padding inside the prompt, see
    moe_lab.training.evaluation.generate_completions); the results are laid out as rows i*G + j and
    right-padded into one tensor for the loss. Generation uses the KV cache, the G samples of a
    prompt sharing its prefill (notebook 10); use_cache=False re-runs the prefix at every token
    and gives the same rollouts, slower.
    """
    _check_group_size(group_size, "sample_rollouts")
    if not problems:
        raise ValueError("sample_rollouts: no problems given")
    pairs = generate_completions(model, problems, group_size, temperature, generator=generator,
                                 max_new_tokens=max_new_tokens, tok=tok, use_cache=use_cache)
    rows = [prompt + completion for prompt, completion in pairs]
    prompt_lens = [len(prompt) for prompt, _ in pairs]
    device = next(model.parameters()).device

    L = max(len(r) for r in rows)
    tokens = torch.full((len(rows), L), tok.newline_id, dtype=torch.long)
    mask = torch.zeros(len(rows), L - 1)
    for r, (row, p0) in enumerate(zip(rows, prompt_lens)):
        tokens[r, : len(row)] = torch.tensor(row)
        mask[r, p0 - 1: len(row) - 1] = 1.0  # targets tokens[p0 .. len-1], predicted from positions p0-1 ..
    texts = [tok.decode(row[p0:], skip_special=False) for row, p0 in zip(rows, prompt_lens)]  # exactly what was written
    reps = [p for p in problems for _ in range(group_size)]
    return Rollouts(tokens.to(device), mask.to(device), texts, reps, group_size)


# --------------------------------------------------------------------------------------------------
# 2. Rewards
# --------------------------------------------------------------------------------------------------
def correctness_reward(task: ArithmeticTask, completion: str, problem: Problem) -> float:
    """1.0 when the answer is exactly right, else 0.0 (never raises, whatever the text)."""
    return task.reward(completion, problem)


def format_reward(task: ArithmeticTask, completion: str) -> float:
    """1.0 when the completion is shaped like an answer (digits, then one newline), else 0.0."""
    return 1.0 if task.format_ok(completion) else 0.0


def rewards(task: ArithmeticTask, texts: Sequence[str], problems: Sequence[Problem], format_weight: float = 0.1) -> Tensor:
    """Step 2: the reward of every completion: correctness + format_weight * format, as a float tensor.

    texts[i] is scored against problems[i]: the two must have the same length (never truncated).
    """
    if len(texts) != len(problems):
        raise ValueError(f"rewards: {len(texts)} texts but {len(problems)} problems: expected one problem per "
                         f"completion (Rollouts.problems repeats each problem G times)")
    return torch.tensor([correctness_reward(task, t, p) + format_weight * format_reward(task, t)
                         for t, p in zip(texts, problems)], dtype=torch.float32)


# --------------------------------------------------------------------------------------------------
# 3. Advantages
# --------------------------------------------------------------------------------------------------
def _check_group_size(group_size, where: str) -> None:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"{where}: group_size={group_size!r}: expected an integer >= 1")


def check_rewards(r: Tensor, group_size: int, where: str = "group_advantages") -> None:
    """Raise a ValueError naming the problem: a shape that does not split into groups, or a NaN/inf reward (by row)."""
    _check_group_size(group_size, where)
    if not isinstance(r, Tensor) or r.dim() != 1 or r.numel() == 0 or r.numel() % group_size:
        shape = tuple(r.shape) if isinstance(r, Tensor) else type(r).__name__
        raise ValueError(f"{where}: rewards of shape {shape} do not split into groups of {group_size}: "
                         f"expected a 1-d tensor of P*G rewards, G={group_size}")
    bad = (~torch.isfinite(r.double())).nonzero().flatten().tolist()
    if bad:
        rows = ", ".join(f"row {i} (group {i // group_size}, completion {i % group_size}) = {float(r[i])}" for i in bad[:5])
        raise ValueError(f"{where}: {len(bad)} reward(s) are not finite: {rows}{' ...' if len(bad) > 5 else ''}; "
                         f"every reward must be a finite number (check the reward function)")


def equal_reward_groups(r: Tensor, group_size: int) -> Tensor:
    """(P,) True where every reward of the group is exactly the same: such a group carries no signal."""
    g = r.view(-1, group_size)
    return (g == g[:, :1]).all(1)


def _scale(x: Tensor, dim=None) -> Tensor:
    """The largest |x| (along dim, kept), 1 where it is 0: dividing by it keeps sums and squares of
    rewards near ±1e308 finite."""
    s = x.abs().amax() if dim is None else x.abs().amax(dim, keepdim=True)
    return torch.where(s > 0, s, torch.ones_like(s))


def group_advantages(r: Tensor, group_size: int, mode: str = "group", eps: float = 1e-6) -> Tensor:
    """Step 3: the advantage of each completion from its reward (r has P*G entries, grouped in rows of G).

    mode="group"      (r - group mean) / (group std + eps): GRPO (DeepSeekMath eq. 3, outcome supervision)
    mode="group_mean" r - group mean: Dr. GRPO (Liu et al. 2025) drops the std, which over-weights easy and
                      hard prompts (tiny std) in plain GRPO
    mode="batch_mean" r - mean over the whole batch: REINFORCE with a mean baseline, for comparison

    A group whose rewards are all equal carries no signal: its advantages are exactly 0 (never NaN, and
    never the rounding error of a float32 mean: eight rewards of 0.1 would otherwise get about ±0.007);
    in "batch_mean" mode the same holds for a batch whose rewards are all equal. The std is the
    population std (divide by G), so a group of two rewards {0, 1} gets advantages ±1. A NaN or inf
    reward is an error naming its row; eps must be a finite number >= 0. Computed in float64 on rewards
    divided by the group's largest |reward| (so rewards like ±1e308 keep a finite mean and std and
    their signs), returned as float32.
    """
    if mode not in ADVANTAGES:
        raise ValueError(f"group_advantages(mode={mode!r}): expected one of {ADVANTAGES}")
    if not (isinstance(eps, numbers.Real) and not isinstance(eps, bool) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"group_advantages(eps={eps!r}): expected a finite number >= 0")
    check_rewards(r, group_size)
    r64 = r.detach().double()
    if mode == "batch_mean":
        if bool((r64 == r64[0]).all()):
            return torch.zeros_like(r64).float()
        s = _scale(r64)
        return ((r64 / s - (r64 / s).mean()) * s).float()
    g = r64.view(-1, group_size)  # (P, G)
    s = _scale(g, 1)  # (P, 1)
    gs = g / s  # in [-1, 1]: (r - mean) / (std + eps) = (r/s - mean(r/s)) / (std(r/s) + eps/s)
    centred = gs - gs.mean(1, keepdim=True)
    if mode == "group":
        centred = centred / (gs.std(1, unbiased=False, keepdim=True) + eps / s)
    else:
        centred = centred * s
    equal = equal_reward_groups(r64, group_size)[:, None]  # (P, 1)
    return torch.where(equal, torch.zeros_like(centred), centred).flatten().float()


def advantages_by_correct_count(n_correct: Sequence[int], group_size: int, mode: str = "group") -> list[dict]:
    """The advantage a right and a wrong answer get, for groups with n_correct[i] right answers out of G.

    The plain function behind notebook 08's advantage explorer. Rewards are 1 (right) or 0 (wrong);
    each row says how hard the update pushes a right answer up and a wrong one down in that group.
    """
    _check_group_size(group_size, "advantages_by_correct_count")
    if any(not 0 <= n <= group_size for n in n_correct):
        raise ValueError(f"advantages_by_correct_count: every count must lie in [0, group_size={group_size}], got {list(n_correct)}")
    r = torch.tensor([[1.0] * n + [0.0] * (group_size - n) for n in n_correct]).flatten()
    a = group_advantages(r, group_size, mode).view(len(n_correct), group_size)
    return [{"n_correct": n, "right": float(a[i, 0]) if n > 0 else None,
             "wrong": float(a[i, -1]) if n < group_size else None, "total_push": float(a[i].abs().sum())}
            for i, n in enumerate(n_correct)]


# --------------------------------------------------------------------------------------------------
# 4. Token log-probabilities
# --------------------------------------------------------------------------------------------------
def token_logprobs(model, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """Step 4: log π(tokens[:, t+1] | tokens[:, :t+1]) for every position: (B, L-1).

    Called with gradients for the policy, under torch.no_grad() for π_old and π_ref. `temperature`
    must be the one the rollouts were sampled at: the policy RL trains is then the distribution
    that produced the samples, softmax(logits / T), so the ratio and the k3 KL are computed on the
    policy the tokens really came from (as TRL and Liger do).
    """
    if not temperature > 0:
        raise ValueError(f"token_logprobs(temperature={temperature}): expected a number > 0")
    logits, _ = model(tokens[:, :-1])  # (B, L-1, V)
    logits = logits.float() / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, 1:, None]).squeeze(-1)


# --------------------------------------------------------------------------------------------------
# 5. The objective
# --------------------------------------------------------------------------------------------------
def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """The k3 estimator of KL(π_θ || π_ref) per token (Schulman 2020): e^x - x - 1 with x = log π_ref - log π_θ.

    Unbiased for the KL when tokens are sampled from π_θ, and >= 0 for every token (e^x >= 1 + x),
    exactly 0 where the two policies agree.
    """
    x = ref_logp - logp
    return torch.exp(x) - x - 1


@dataclass
class LossStats:
    """What one loss evaluation measured (floats, for logging)."""

    loss: float
    kl: float  # mean k3 KL per completion token
    clip_fraction: float  # share of completion tokens whose ratio was clipped (in the direction that matters)
    ratio_mean: float


def _selected(values: Tensor, mask: Tensor) -> Tensor:
    """values where mask is 1, exactly 0 elsewhere: selected, not multiplied (inf * 0 would be NaN)."""
    return torch.where(mask.bool(), values, torch.zeros((), dtype=values.dtype, device=values.device))


def aggregate(per_token: Tensor, mask: Tensor, how: Aggregation, max_len: Optional[int] = None) -> Tensor:
    """Turn per-token terms (B, L) into one number, over the tokens where mask is 1.

    "sequence"  mean over each completion's tokens, then mean over completions (DeepSeekMath: 1/G Σ 1/|o_i| Σ_t).
                Every completion weighs the same, so a token of a short answer weighs more than one of a long answer.
    "token"     sum over all completion tokens / their count (DAPO): every token weighs the same.
    "constant"  sum over all completion tokens / (B * max_len) (Dr. GRPO): no length-dependent weights at all,
                provided max_len is a fixed budget (the trainer passes its generation budget); without
                max_len the padded length of this batch is used, which varies from batch to batch.

    Positions where mask is 0 are selected out, never multiplied by 0: an inf or NaN there (a k3 term
    overflowing on a prompt token) cannot reach the result.
    """
    if per_token.shape != mask.shape:
        raise ValueError(f"aggregate: per_token {tuple(per_token.shape)} and mask {tuple(mask.shape)}: expected the same shape")
    if how not in AGGREGATIONS:
        raise ValueError(f"aggregate(how={how!r}): expected one of {AGGREGATIONS}")
    kept = _selected(per_token, mask)
    count = mask.bool().sum(1).to(per_token.dtype)  # (B,) completion tokens per row
    if how == "sequence":
        return (kept.sum(1) / count.clamp_min(1)).mean()
    if how == "token":
        return kept.sum() / count.sum().clamp_min(1)
    if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1):
        raise ValueError(f"aggregate: max_len={max_len!r}: expected a positive integer (the generation budget) or None")
    return kept.sum() / (mask.shape[0] * (max_len or mask.shape[1]))


def _check_loss_inputs(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, ref_logp: Optional[Tensor]) -> None:
    """Shapes must match, (B, L) per token and (B,) per completion; advantages finite; a mask of 0s and 1s."""
    if logp.dim() != 2:
        raise ValueError(f"grpo_loss: logp has shape {tuple(logp.shape)}: expected (completions, positions)")
    for name, t in (("old_logp", old_logp), ("mask", mask), ("ref_logp", ref_logp)):
        if t is not None and t.shape != logp.shape:
            raise ValueError(f"grpo_loss: {name} has shape {tuple(t.shape)} but logp has {tuple(logp.shape)}: "
                             f"expected the same (completions, positions)")
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"grpo_loss: advantages has shape {tuple(advantages.shape)}: expected one per completion, "
                         f"({logp.shape[0]},)")
    bad = (~torch.isfinite(advantages.detach())).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"grpo_loss: the advantages of rows {bad[:5]} are not finite: {advantages[bad[:5]].tolist()}")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("grpo_loss: mask must hold only 0 and 1 (1 = a completion token)")


def grpo_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip_eps: float = 0.2,
              beta: float = 0.0, ref_logp: Optional[Tensor] = None, aggregation: Aggregation = "sequence",
              max_len: Optional[int] = None):
    """Step 5: the GRPO loss (to minimise: minus the objective J) and its statistics.

    logp, old_logp, ref_logp, mask: (B, L) per token; advantages: (B,) per completion. max_len is
    the constant of the "constant" aggregation: the generation budget, the same for every batch.
    The clipped surrogate min(ρA, clip(ρ, 1-ε, 1+ε)A) has zero gradient once the ratio has moved
    past 1+ε for a positive advantage (or below 1-ε for a negative one): the policy may not move far
    from π_old on one batch. The KL term pulls it back towards π_ref.

    Only completion tokens (mask 1) count. The log-probs of the other positions are replaced by 0
    before any arithmetic (selected, never multiplied), so a huge or infinite value on a prompt token
    changes neither the loss nor its gradient.
    """
    # the knobs GRPOConfig also holds, checked by its own specs (a NaN clip_eps made a NaN loss, a NaN beta dropped the KL)
    check_argument("grpo_loss", "clip_eps", clip_eps, GRPOConfig.FIELD_SPECS["clip_eps"])
    check_argument("grpo_loss", "beta", beta, GRPOConfig.FIELD_SPECS["beta"])
    if beta > 0 and ref_logp is None:
        raise ValueError("grpo_loss: beta > 0 needs ref_logp (the reference model's log-probs)")
    _check_loss_inputs(logp, old_logp, advantages, mask, ref_logp)
    m = mask.bool()
    logp, old_logp = _selected(logp, m), _selected(old_logp, m)  # outside the mask: ratio 1, KL 0, gradient 0
    ref_logp = _selected(ref_logp, m) if ref_logp is not None else None
    ratio = torch.exp(logp - old_logp)  # ρ
    adv = advantages[:, None].to(logp.dtype)  # the same advantage for every token of a completion
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv
    surrogate = torch.minimum(unclipped, clipped)
    per_token = -surrogate
    kl = kl_k3(logp, ref_logp) if ref_logp is not None else torch.zeros_like(logp)
    if beta > 0:
        per_token = per_token + beta * kl
    loss = aggregate(per_token, mask, aggregation, max_len)
    with torch.no_grad():
        was_clipped = (clipped < unclipped) & m  # min() chose the clipped term: no gradient flows
        n = max(int(m.sum()), 1)
        stats = LossStats(loss=float(loss), kl=float(_selected(kl, m).sum() / n),
                          clip_fraction=float(was_clipped.sum()) / n, ratio_mean=float(_selected(ratio, m).sum() / n))
    return loss, stats


# --------------------------------------------------------------------------------------------------
# 6. The trainer: rollouts, μ updates, logging
# --------------------------------------------------------------------------------------------------
@dataclass
class GRPOHistory:
    """What a GRPO run logged, one entry per step (and per evaluation for the eval_* lists)."""

    step: list = field(default_factory=list)
    reward: list = field(default_factory=list)  # mean total reward of the step's rollouts
    correct: list = field(default_factory=list)  # share of rollouts exactly right (sampled, training problems)
    format_ok: list = field(default_factory=list)  # share of rollouts well-formed
    kl: list = field(default_factory=list)  # mean k3 KL to the reference per completion token (last of the μ updates)
    clip_fraction: list = field(default_factory=list)  # share of answer tokens clipped at the last μ update (0 when μ = 1)
    length: list = field(default_factory=list)  # mean completion length in tokens
    zero_signal: list = field(default_factory=list)  # share of groups whose rewards were all equal
    load: list = field(default_factory=list)  # (layers, E) expert load on the step's completion tokens
    time: list = field(default_factory=list)  # seconds since the start (evaluations excluded)
    eval_step: list = field(default_factory=list)
    eval_accuracy: list = field(default_factory=list)  # greedy exact match on held-out problems
    eval_time: list = field(default_factory=list)

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["load"] = [l.tolist() for l in self.load]
        return d


def completion_load(model, mask: Tensor) -> Optional[Tensor]:
    """(layers, E) routed assignments of the last forward pass, counting completion tokens only."""
    layers = model.moe_layers() if hasattr(model, "moe_layers") else []
    if not layers:
        return None
    # the last forward saw tokens[:, :-1]; position t predicts target t+1, so mask[:, t] marks the
    # positions that produced completion tokens
    keep = mask.reshape(-1).bool().cpu()
    loads = []
    for layer in layers:
        idx = layer.last_routing.expert_idx.cpu()[keep]  # (n, k)
        loads.append(torch.bincount(idx[idx >= 0], minlength=layer.cfg.n_experts))
    return torch.stack(loads)


class GRPOTrainer:
    """Runs GRPO on a model and a task. `run()` for a whole run, `step()` for one batch.

    The reference model π_ref is a frozen copy of the model as it was when the trainer was made.
    """

    def __init__(self, model, task: ArithmeticTask, cfg: GRPOConfig, reward_fn: Optional[Callable] = None):
        if not isinstance(cfg, GRPOConfig):
            raise TypeError(f"GRPOTrainer(cfg={cfg!r}): expected a GRPOConfig")
        cfg.check()  # again: a field changed since construction (cfg.clip_eps = nan) is named here
        model_cfg = getattr(model, "cfg", None)
        if hasattr(type(model_cfg), "FIELD_SPECS"):
            model_cfg.check()
        self.model, self.task, self.cfg = model, task, cfg
        self.device = next(model.parameters()).device
        self.reference = None
        if cfg.beta > 0:
            self.reference = copy.deepcopy(model).eval()
            for p in self.reference.parameters():
                p.requires_grad_(False)
        self.opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
        self.reward_fn = reward_fn or (lambda texts, probs: rewards(task, texts, probs, cfg.format_weight))
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        import random

        self.rng = random.Random(cfg.seed)
        self.updates = 0
        self.max_new_tokens = task.max_answer_len + 2  # the generation budget: the longest answer, its newline, one spare
        self.history = GRPOHistory()
        self.has_moe = hasattr(model, "moe_layers") and bool(model.moe_layers())

    def _lr(self) -> float:
        w = self.cfg.warmup_steps
        return self.cfg.lr * min(1.0, (self.updates + 1) / w) if w else self.cfg.lr

    def step(self) -> dict:
        """One GRPO iteration: sample, score, compute advantages, then μ optimiser steps. Returns its log."""
        cfg, model = self.cfg, self.model
        problems = [self.task.sample(self.rng, "train") for _ in range(cfg.prompts_per_step)]
        ro = sample_rollouts(model, problems, cfg.group_size, cfg.temperature, self.max_new_tokens,
                             generator=self.generator)  # 1.
        r = self.reward_fn(ro.texts, ro.problems).to(self.device)  # 2.
        adv = group_advantages(r, cfg.group_size, cfg.advantage)  # 3.
        T = cfg.temperature
        model.eval()  # (eval: these forwards must not count towards the router bias rule's load)
        with torch.no_grad():  # 4. π_old and π_ref: fixed for the μ updates of this batch
            old_logp = token_logprobs(model, ro.tokens, T)
            ref_logp = token_logprobs(self.reference, ro.tokens, T) if self.reference is not None else None
        model.train()
        load = None
        clip_fractions = []
        for _ in range(cfg.inner_updates):  # 6. μ updates on the same rollouts
            logp = token_logprobs(model, ro.tokens, T)
            if load is None and self.has_moe:
                load = completion_load(model, ro.completion_mask)
            loss, stats = grpo_loss(logp, old_logp, adv, ro.completion_mask, cfg.clip_eps, cfg.beta, ref_logp,
                                    cfg.aggregation, self.max_new_tokens)  # 5.
            clip_fractions.append(stats.clip_fraction)
            if cfg.balance_coef > 0 and self.has_moe:
                loss = loss + cfg.balance_coef * model.balance_loss()
            optimizer_step(model, self.opt, loss, self._lr(), cfg.grad_clip,
                           update_router_biases=self.has_moe and cfg.update_router_biases)  # the course's one update
            self.updates += 1
            if not math.isfinite(stats.loss):
                raise FloatingPointError(f"GRPO loss became {stats.loss}: lower the learning rate")
        correct = torch.tensor([self.task.verify(t, p) for t, p in zip(ro.texts, ro.problems)], dtype=torch.float32)
        groups_equal = equal_reward_groups(r, cfg.group_size).float().mean()
        return {"reward": float(r.mean()), "correct": float(correct.mean()),
                "format_ok": sum(self.task.format_ok(t) for t in ro.texts) / len(ro.texts),
                "kl": stats.kl, "clip_fraction": stats.clip_fraction, "length": float(ro.lengths.float().mean()),
                "zero_signal": float(groups_equal), "load": load, "texts": ro.texts[: cfg.group_size],
                "clip_fractions": clip_fractions}

    def evaluate(self, problems: Optional[list[Problem]] = None) -> float:
        """Greedy exact match on held-out problems (fixed: the same set at every evaluation)."""
        problems = problems or self.task.problems(self.cfg.eval_problems, "heldout", seed=1234)
        completions = solve(self.model, problems)
        return sum(self.task.verify(c, p) for c, p in zip(completions, problems)) / len(problems)

    def run(self, progress: bool = True, desc: str = "GRPO") -> GRPOHistory:
        """cfg.steps GRPO iterations, evaluating held-out exact match every cfg.eval_every steps."""
        from tqdm.auto import tqdm

        cfg, h = self.cfg, self.history
        eval_set = self.task.problems(cfg.eval_problems, "heldout", seed=1234)
        elapsed = 0.0
        h.eval_step.append(0), h.eval_accuracy.append(self.evaluate(eval_set)), h.eval_time.append(0.0)
        bar = tqdm(range(cfg.steps), desc=desc, disable=not progress, mininterval=1.0)
        for s in bar:
            t0 = time.perf_counter()
            log = self.step()
            elapsed += time.perf_counter() - t0
            h.step.append(s + 1)
            for key in ("reward", "correct", "format_ok", "kl", "clip_fraction", "length", "zero_signal"):
                getattr(h, key).append(log[key])
            if log["load"] is not None:
                h.load.append(log["load"])
            h.time.append(elapsed)
            if (s + 1) % cfg.eval_every == 0 or s + 1 == cfg.steps:
                h.eval_step.append(s + 1)
                h.eval_accuracy.append(self.evaluate(eval_set))
                h.eval_time.append(elapsed)
            bar.set_postfix(reward=f"{log['reward']:.2f}", acc=f"{h.eval_accuracy[-1]:.1%}", kl=f"{log['kl']:.3f}")
        return h


def train_grpo(model, task: ArithmeticTask, cfg: GRPOConfig, progress: bool = True, desc: str = "GRPO") -> GRPOHistory:
    """Run GRPO on model (in place) and return its history."""
    return GRPOTrainer(model, task, cfg).run(progress=progress, desc=desc)
