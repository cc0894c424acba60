"""APS: channel search with affine parameter sharing (Wang, Bai et al., NeurIPS 2020), on any
model's channel groups.

**Supernet.** The model is resized (:func:`fxconet.resize`) to the *meta widths*; the parameters
of that model are the meta-weights ``W``. Every dim of every parameter that carries a free
channel group is rewritten per candidate by a matrix, following the solver's slot layouts
(:meth:`fxconet.passes.view.SolutionView.tensors`: blocks ``(outer, slots, inner)`` of groups):

* conv / linear / transposed conv / depthwise weights (and their biases): ``P`` on the "out"
  dim and ``Q`` on the "in" dim, one ``[meta x c]`` matrix per (layer, dim, group, candidate),
  so the candidate kernel is ``W^{i,o} = Q^iT x2 W x1 P^o`` (paper Eq. 2). A block repeated
  ``outer``/``inner`` times (a grouped conv's slots, ``flatten`` before a linear) uses
  ``I_outer (x) M (x) I_inner``; a dim that concatenates several groups uses one matrix per
  group (block diagonal). A depthwise conv has only ``P`` (its "in" dim is 1; the reference
  uses an identity ``Q``). A group with divisor ``u > 1`` is projected in units of ``u``.
* BatchNorm on a free group: no affine (weight 1, bias 0, as the reference's
  ``affine=False``) and running statistics per candidate of the groups on its channels.
* any other parameter or buffer on a free group (LayerNorm/GroupNorm affine, PReLU, a raw layer
  scale): a fixed selection per candidate (the first channels, or the candidate's own block for
  independent sharing), never in the sharing level.

A sampled architecture runs as ``torch.func.functional_call`` of a weight-less skeleton
GraphModule of its widths (built on ``meta`` tensors by the resize machinery and verified by
its epilogue, so ``view``/``split`` literals and depthwise ``groups`` are rewritten) with the
effective tensors above.
Skeletons are LRU-cached by what a forward reads of the widths (rewritten literals and module
attributes other than channel counts), so all architectures of a ResNet share one. Measured on
ResNet-20 at batch 128 with one thread on a busy 2-core machine: a training step takes 0.35 s
on 8x8 digits and 2.6 s on 28x28 Fashion-MNIST; building a skeleton 0.03-0.15 s (once), the
effective weights 0.03-0.07 s and a transition step 0.2-0.3 s per step.

**Search** (paper Sec. 2-3, reference ``chann_cifar_learner.py``): one decision per free group
with at least two candidates (residual-tied widths share a decision); ``warmup_epochs`` of
uniform sampling with P/Q fixed, then ``search_epochs`` where each step (1) samples
architectures from the LSTM controller, rewards them with their accuracy on a validation batch
and a soft FLOPs penalty and takes a REINFORCE step, (2) trains the meta-weights on a training
batch with a fresh on-policy sample, (3) for transitionary sharing, takes a projected gradient
step on the sharing level (Eq. 4/5). After the search, best-first beam search over the policy
gives the ``top_n`` most likely architectures and the one closest to the FLOPs target wins
(paper).

Where this follows the paper, the reference code (``shared/reference/aps.md``) or neither:

1. Decisions are channel groups (residual sums tie widths), not one decision per conv with
   learned 1x1 shortcuts everywhere (reference, §4); decoded models keep the original topology.
2. P/Q per candidate (paper), not per (output, input) candidate pair (reference, n^2 each).
3. Candidates default to fractions {0.25, 0.5, 0.75, 1.0} of each group's width (per-stage
   scaled sets like the reference's ImageNet ones); an absolute set shared by every group
   (the reference's CIFAR ``4,8,16,32,64``) or a set per group is accepted. Widths are rounded
   to the group's divisor and deduplicated.
4. Meta width: the largest candidate for ordinal sharing, the sum of the candidates for
   independent and transitionary sharing. The sum is what the reference's compact CIFAR search
   uses for all three (``max_width 124 = 4+...+64``); it gives the transition unused rows to
   rotate columns into. With the largest candidate as meta width that candidate's P is a square
   orthogonal matrix whose terms in Eq. 4 cannot decrease.
5. Initialisation (reference §3.2): ordinal = the first ``c`` standard basis vectors, independent
   = disjoint consecutive blocks, plus N(0, ``init_noise``^2) noise (reference CIFAR: 1e-3),
   then unit columns. Meta-weights use PyTorch's default layer initialisation (reference),
   scaled by sqrt(meta fan-in / fan-in at the largest candidates): a layer at any candidate
   then starts at the scale of the largest candidate's layer, whatever the meta width (the
   reference initialises at the meta fan-in, so a wider meta-weight starts smaller and, behind
   BatchNorm, trains with a larger effective learning rate; on digits this slowed warm-up).
6. P/Q never get task-loss gradients (reference ``DETACH_PQ``); they are fixed for ordinal and
   independent sharing and change only by the transition.
7. Sharing level: per layer, Phi_l = (sum_{i<=i'} ||Q^iT Q^i'||_F^2) (sum_{o<=o'} ||P^oT P^o'||_F^2)
   (paper Eq. 4, product form; a side without a free group contributes 1; a dim that
   concatenates groups sums their terms). ``phi`` in the report is sum_l Phi_l; ``phi_relative``
   is the mean of Phi_l / Phi_l^ordinal, 1 for ordinal sharing and Phi^ind / Phi^ord for
   independent (Thm. 3.1 closed forms: sum_a c_a (n - a) and sum_a c_a for sorted candidates).
   The reference minimises a different, additive L1 surrogate (§5.2); this is the paper's.
8. Transition: after warm-up, every step ``p <- p - tau grad_p Phi_rel`` then unit columns
   (Eq. 5), where Phi_rel = sum_l Phi_l / Phi_l^ordinal. The paper gives no scale for Phi (its
   Appendix C is missing; its reported values cannot come from Eq. 4 as written, whose
   minimum with unit columns is sum_l Phi_l^independent) and its tau = 1e-3 goes with 39,200
   steps. The raw Eq. 4 gradient grows with width x candidates: at tau = 1e-3 a unit column
   of ResNet-20's last stage would move by about 3 per step. Normalising each layer by its
   maximum makes one rate fit every layer and model. ``tau`` defaults to 1.0; measured on
   ResNet-20 (fractions, sum meta width, noise 1e-3), ``phi_relative`` falls from 1 to 0.88,
   0.65, 0.52 and 0.33 after 50, 100, 150 and 300 steps (the minimum is 0.27); with tau = 0.1
   it is 0.995 after 300 steps, with tau = 1e-3 it does not move.
9. Gradient alignment cos(g, g~) (Eq. 3): every ``cos_every`` steps, the loss gradients of the
   meta-weights of two uniformly sampled architectures on the same (at most 32-image) training
   batch; the cosine per layer with P/Q, averaged over layers.
10. Controller (reference §6): two stacked LSTM cells, input = embedding of the previous action
    + a learned embedding of the group's position (the reference's one-hot needs fewer than 99
    decisions) + the remaining-FLOPs fraction (T - F_lb) / T, where F_lb is the MACs with the
    undecided groups at their smallest candidate (the reference counts decided layers only);
    a shared output layer masked to each group's candidates; U(-0.1, 0.1) initialisation; Adam
    with betas (0.5, 0.999) and weight decay 1e-3 (reference). Hidden size 64 (reference 100).
    Its lr defaults to 1e-2, not the reference's 1.6e-4, because the search is hundreds of
    steps here rather than 39,200; the reference's two warm-up LSTM passes are not reproduced.
11. Reward (reference CIFAR): accuracy on one validation batch (held out from the training
    split), BatchNorm in training mode, times (F/T)^alpha below the target and (F/T)^beta
    above (MnasNet-style soft penalty). ``flops_penalty`` defaults to (alpha, beta) =
    (0.1, -0.1), symmetric around the target; the reference's (0, -0.1) does not penalise small
    models, and when the supernet's accuracies are still near chance (APS-I early on) the policy
    then drifts to the smallest architectures, far from the target that the final pick is
    closest to. FLOPs are MACs from the IR (:class:`~fxconet.cost.CostModel`:
    every conv and linear, shortcuts and classifier included; the reference's CIFAR table
    leaves them out). Without validation data the training batch gives the reward (reference
    ImageNet). Each controller step samples ``reward_samples`` = 4 architectures, rewards them
    on the same batch and takes the REINFORCE step -sum_k log p(a_k) (R_k - b_k) / 4 - entropy
    bonus with b_k the mean reward of the other samples; the reference takes one sample with an
    EMA baseline (decay 0.99; ``reward_samples=1`` does that, the EMA starting at the first
    reward). Measured on digits (ResNet-20, 165 controller steps): with one sample the policy
    either stayed uniform (EMA decay 0.9) or collapsed onto early samples (0.99), and the beam
    search's architectures landed anywhere from 30% to 100% of the MACs; with four samples
    on a shared batch the sampled MACs settled at the 50% target and all top-8 architectures
    had 51-56%.
12. Beam search (reference ``beam_search.py``, bugs fixed): best-first by length-normalised
    log-probability, deeper nodes first on ties, controller inputs built exactly as in
    sampling; at most 20,000 expansions, then the best partial sequences are completed greedily.
    The winner is the candidate closest to the FLOPs target (paper), not the best supernet
    accuracy on the test set (reference). When none of the ``top_n`` is within
    ``flops_tolerance`` (5% of the model's MACs; with ``target_macs=`` the budget's tolerance of
    the target) of the target, a second search keeps only the prefixes that can still end within
    the tolerance (MACs grow with every width) and the most likely architecture within it wins:
    with a soft penalty the policy can prefer architectures far from the target (APS-I on
    Fashion-MNIST: all top-1024 at >= 66% for a 50% target), and a user who asks for 50% expects
    about 50%. That second search is a batched beam search (:func:`constrained_beam_search`,
    1024 prefixes per decision, the controller run once per decision on all of them): a
    best-first search over a flat policy expanded 20,000 prefixes and took most of the search's
    time (278 s of 386 s); the beam takes about a second on ResNet-20. The pick is written to
    ``pick.json`` in the output folder and read back on ``resume``.
13. Decoding: the effective weights of the winner (meta-weights through its P/Q) with its
    BatchNorm statistics recomputed on up to 20 training batches become ``init_state`` (used by
    ``optimize_channels(init="search")``); by default the final model is trained from scratch
    (paper, reference).
14. The meta-weights train with the built-in loop's SGD settings (``train_config``: lr, momentum,
    weight decay, schedule over warm-up + search epochs); the reference uses lr 0.1, momentum
    0.9, weight decay 2e-4 and 600 epochs (200 warm-up). Defaults here: 5 warm-up and 10 search
    epochs, sized for CPUs.
15. The meta-weights' gradient norm is clipped at ``grad_clip`` = 1 per step (the reference does
    not clip). Diagnosis: APS-I's supernet stayed at chance because it diverged. Its candidates
    use disjoint blocks of the meta-weights, so every step trains a different sub-network whose
    pieces were co-trained with other partners; at lr 0.1 with momentum 0.9 the training loss of
    uniformly sampled architectures rose from 2.35 to 3.1-3.9 (above chance, ln 10 = 2.30) on
    3,000 Fashion-MNIST images (ResNet-20, 200 steps), while a fixed architecture of the same
    supernet trained normally (0.64). A lower rate (0.02) or clipping keeps it stable: with
    clipping at 1 its loss falls to 1.79 in 300 steps (26% accuracy of sampled architectures),
    learning, though far slower than APS-O (0.68, 77%): without sharing, every block is trained
    by a fraction of the steps, which is the paper's argument for sharing. Clipping also
    smooths APS-O and APS-T (ordinal: 0.77 against 0.81 after 200 steps unclipped; masked
    momentum for unused blocks did not help APS-I). On ``benchmarks/aps.py`` (12 epochs of 21
    steps, cosine from lr 0.1) APS-I's loss stays at 2.3-2.4 for 7 epochs and falls (to 0.92,
    rewards 0.10 -> 0.58) only once the rate is below ~0.025
    (``benchmarks/results/aps_independent.md``). Learning rate and momentum are not the
    cause: at a fixed 0.03 or 0.3 without momentum its warm-up loss after 5 epochs is the same
    2.21-2.29 as at 0.1 with momentum 0.9. What it lacks is steps: each candidate block of a
    group is trained in a quarter of the steps and each (input, output) block pair of a conv in
    a sixteenth, which is the slower rise the paper reports for APS-I (its Fig. 4: "much
    slower ... especially during the warm-up", 200 warm-up epochs). Given 24 warm-up epochs
    instead of 4 (``benchmarks/results/aps_long_warmup.md``, 2 seeds) its warm-up loss falls
    from 2.40 to 1.90 (seeds: 2.21, 1.58; APS-T in the same epochs: 0.33) and its pick decodes
    to 42% validation accuracy (11% with 4), yet its models test at 82.55% against APS-T's
    83.75%. Use APS-T; APS-I is the paper's lower bound of sharing, kept for the comparison.
"""

from __future__ import annotations

import heapq
import itertools
import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from fxconet import distributed
from fxconet.api import resize
from fxconet.cost import CostModel
from fxconet.data import as_loader
from fxconet.errors import SearchError
from fxconet.ir import ChannelGraph, round_width
from fxconet.passes.resize_layers import ResizePlan, emit
from fxconet.passes.view import SolutionView
from fxconet.strategies import SearchContext, SearchOutcome
from fxconet.strategies.loop import Checkpoints, Progress, restoring, search_signature
from fxconet.train import TrainConfig, evaluate, select_device

__all__ = [
    "SHARING",
    "ApsConfig",
    "Controller",
    "Supernet",
    "aps_search",
    "beam_search",
    "candidate_widths",
    "constrained_beam_search",
    "decode",
    "independent_sharing",
    "init_projections",
    "ordinal_sharing",
    "flops_reward",
    "project_columns",
    "reinforce_step",
    "run",
    "sharing_level",
]

SHARING = ("ordinal", "independent", "transitionary")
_CONV_KINDS = ("conv", "linear", "conv_transpose", "depthwise")
_DEFAULT_FRACTIONS = (0.25, 0.5, 0.75, 1.0)
_MAX_EXPANSIONS = 20_000
_CALIBRATION_BATCHES = 20


# ---------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class ApsConfig:
    """Hyper-parameters of the APS search (module docstring: paper and reference values).

    Attributes:
        flops_target: target MACs as a fraction of the model's (None: no FLOPs penalty).
        sharing: ``"ordinal"`` (APS-O), ``"independent"`` (APS-I) or ``"transitionary"``
            (APS-T).
        candidates: ``None`` (fractions 0.25, 0.5, 0.75, 1.0 of each group's width), a sequence
            of floats (fractions), a sequence of ints (absolute widths for every group) or a
            mapping group id -> sequence of ints (groups left out keep their width).
        warmup_epochs: epochs of uniform sampling with P/Q fixed (reference: 200 of 600).
        search_epochs: epochs with the controller (and the transition for APS-T), >= 1.
        meta_width: ``None`` (max candidate for ordinal, sum for independent/transitionary),
            ``"max"``, ``"sum"`` or a float factor of the largest candidate.
        tau: transition rate of Eq. 5 on the layer-normalised sharing level.
        transition_every: take the transition step every this many training steps (1: every
            step, as the reference's CIFAR search; its ImageNet search uses 10). A step costs
            about meta x (sum of candidates)^2 multiply-adds per projected layer side: 0.2 s on
            ResNet-20, but a minute on a CPU for MobileNetV2 (1280-channel last conv).
        entropy_coeff: entropy bonus of the controller's loss (reference CIFAR: 4e-3).
        controller_lr: Adam learning rate of the controller.
        flops_penalty: exponents (alpha, beta) of (F/T) below / above the target, or one float
            beta (alpha = 0; the reference is (0, -0.1)).
        top_n: architectures from the final beam search.
        flops_tolerance: the winner's MACs must be within this fraction of the model's MACs of
            the target; when none of the ``top_n`` is, the beam search runs again over the
            architectures within it and the most likely one wins (``None``: the paper's rule
            alone).
        decode_init: provide the winner's weights decoded from the meta-weights.
        search_batches_per_epoch: cap on the steps per epoch (``None``: the training loop's
            ``max_batches_per_epoch``, else all batches).
        init_noise: standard deviation of the noise added to the P/Q initialisation.
        cos_every: measure the gradient alignment every this many steps (0: never).
        baseline_decay: decay of the reward's moving-average baseline (the baseline of the
            policy gradient when ``reward_samples`` is 1).
        reward_samples: architectures sampled per controller step, all rewarded on the same
            validation batch, each against the mean reward of the others (reference: 1).
        grad_clip: clip the meta-weights' gradient norm per step (None: no clipping, the
            reference); see the module docstring (item 15).
        seed: seeds everything; epoch ``e`` reseeds with ``seed + e`` (resume reproduces).
    """

    flops_target: float | None = 0.5
    sharing: str = "transitionary"
    candidates: Any = None
    warmup_epochs: int = 5
    search_epochs: int = 10
    meta_width: str | float | None = None
    tau: float = 1.0
    transition_every: int = 1
    entropy_coeff: float = 4e-3
    controller_lr: float = 1e-2
    flops_penalty: float | tuple[float, float] = (0.1, -0.1)
    top_n: int = 8
    flops_tolerance: float | None = 0.05
    decode_init: bool = True
    search_batches_per_epoch: int | None = None
    init_noise: float = 1e-3
    cos_every: int = 10
    baseline_decay: float = 0.99
    reward_samples: int = 4
    grad_clip: float | None = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            (
                "flops_target",
                self.flops_target is None or self.flops_target > 0,
                "must be None or > 0",
            ),
            ("sharing", self.sharing in SHARING, f"must be one of {', '.join(SHARING)}"),
            ("warmup_epochs", self.warmup_epochs >= 0, "must be >= 0"),
            ("search_epochs", self.search_epochs >= 1, "must be >= 1"),
            (
                "meta_width",
                self.meta_width in (None, "max", "sum")
                or (isinstance(self.meta_width, int | float) and self.meta_width >= 1),
                "must be None, 'max', 'sum' or a factor >= 1",
            ),
            ("tau", self.tau >= 0, "must be >= 0"),
            ("transition_every", self.transition_every >= 1, "must be >= 1"),
            ("entropy_coeff", self.entropy_coeff >= 0, "must be >= 0"),
            ("controller_lr", self.controller_lr > 0, "must be > 0"),
            ("top_n", self.top_n >= 1, "must be >= 1"),
            (
                "flops_tolerance",
                self.flops_tolerance is None or self.flops_tolerance > 0,
                "must be None or > 0",
            ),
            (
                "search_batches_per_epoch",
                self.search_batches_per_epoch is None or self.search_batches_per_epoch >= 1,
                "must be None or >= 1",
            ),
            ("init_noise", self.init_noise >= 0, "must be >= 0"),
            ("cos_every", self.cos_every >= 0, "must be >= 0"),
            ("baseline_decay", 0 <= self.baseline_decay < 1, "must be in [0, 1)"),
            ("reward_samples", self.reward_samples >= 1, "must be >= 1"),
            ("grad_clip", self.grad_clip is None or self.grad_clip > 0, "must be None or > 0"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"ApsConfig.{name}={getattr(self, name)!r}: {why}")
        alpha, beta = self.penalty
        if not (math.isfinite(alpha) and math.isfinite(beta)):
            raise ValueError(f"ApsConfig.flops_penalty={self.flops_penalty!r}: must be finite")

    @property
    def penalty(self) -> tuple[float, float]:
        """``(alpha, beta)`` of the soft FLOPs penalty."""
        p = self.flops_penalty
        if isinstance(p, int | float):
            return 0.0, float(p)
        alpha, beta = p
        return float(alpha), float(beta)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (candidate mappings keyed by strings)."""
        d = asdict(self)
        c = self.candidates
        if isinstance(c, Mapping):
            d["candidates"] = {str(k): list(v) for k, v in c.items()}
        elif c is not None:
            d["candidates"] = list(c)
        if not isinstance(self.flops_penalty, int | float):
            d["flops_penalty"] = list(self.penalty)
        return d


def candidate_widths(graph: ChannelGraph, candidates: Any = None) -> dict[int, tuple[int, ...]]:
    """Sorted candidate widths of every free group (multiples of its divisor, deduplicated).

    Args:
        graph: the model's channel graph.
        candidates: see :attr:`ApsConfig.candidates`.

    Raises:
        ValueError: empty or non-positive candidates, or a mapping naming a frozen group.

    Example:
        >>> candidate_widths(graph)[1]          # a group of 16 channels
        (4, 8, 12, 16)
        >>> candidate_widths(graph, [4, 8, 64])[1]
        (4, 8, 64)
    """
    free = {g.id: g for g in graph.free}
    out: dict[int, tuple[int, ...]] = {}
    if isinstance(candidates, Mapping):
        unknown = sorted(set(candidates) - set(free))
        if unknown:
            raise ValueError(f"candidates: groups {unknown} are not free groups of the model")
    elif candidates is not None:
        candidates = list(candidates)
        if not candidates or any(
            not isinstance(c, int | float) or isinstance(c, bool) or c <= 0 for c in candidates
        ):
            raise ValueError(f"candidates={candidates!r}: need positive numbers")
    for gid, g in free.items():
        if isinstance(candidates, Mapping):
            values = [float(v) for v in candidates.get(gid, [g.size])]
            absolute = True
        elif candidates is None:
            values, absolute = list(_DEFAULT_FRACTIONS), False
        else:
            absolute = all(isinstance(c, int) for c in candidates)
            if not absolute and any(isinstance(c, int) for c in candidates):
                raise ValueError(
                    f"candidates={candidates!r}: give ints (absolute widths) or floats "
                    "(fractions of each group's width), not both"
                )
            values = [float(c) for c in candidates]
        if not values or min(values) <= 0:
            raise ValueError(f"candidates for group {gid}: need positive widths, got {values}")
        widths = {round_width(v if absolute else v * g.size, g.divisor) for v in values}
        out[gid] = tuple(sorted(widths))
    return out


def _meta_width(cands: Sequence[int], sharing: str, meta_width: Any, divisor: int) -> int:
    mode = meta_width if meta_width is not None else ("max" if sharing == "ordinal" else "sum")
    if mode == "max":
        width = max(cands)
    elif mode == "sum":
        width = sum(cands)
    else:
        width = divisor * math.ceil(float(mode) * max(cands) / divisor)
    if sharing == "independent" and width < sum(cands):
        raise ValueError(
            f"meta_width={meta_width!r}: independent sharing needs room for disjoint candidates "
            f"{list(cands)} (>= {sum(cands)} channels), got {width}"
        )
    return width


# ---------------------------------------------------------------------------------------------
# projections and the sharing level


def init_projections(
    meta: int,
    sizes: Sequence[int],
    sharing: str,
    *,
    noise: float = 0.0,
    generator: torch.Generator | None = None,
) -> list[Tensor]:
    """Initial ``[meta, c]`` matrices of one (layer, dim), one per candidate size ``c``.

    Ordinal (also the start of transitionary): the first ``c`` standard basis vectors;
    independent: disjoint consecutive blocks. Then ``N(0, noise^2)`` and unit columns.

    Example:
        >>> [m.shape for m in init_projections(6, [2, 4], "independent")]
        [torch.Size([6, 2]), torch.Size([6, 4])]
    """
    out = []
    offset = 0
    for c in sizes:
        m = torch.zeros(meta, c)
        start = offset if sharing == "independent" else 0
        if start + c > meta:
            raise ValueError(f"{sharing} sharing of candidates {list(sizes)} needs meta >= {c}")
        m[start : start + c] = torch.eye(c)
        offset += c
        if noise > 0:
            m += noise * torch.randn(meta, c, generator=generator)
        out.append(project_columns(m))
    return out


def project_columns(m: Tensor) -> Tensor:
    """Paper Eq. 5's projection ``u / ||u||_2`` of every column onto the unit sphere.

    Example:
        >>> project_columns(torch.tensor([[3.0], [4.0]])).flatten().tolist()
        [0.6000000238418579, 0.800000011920929]
    """
    return m / m.norm(dim=0, keepdim=True).clamp_min(1e-12)


def sharing_level(mats: Sequence[Tensor]) -> Tensor:
    """``sum_{a <= b} ||M_a^T M_b||_F^2`` over the candidates' matrices of one side of a layer.

    Computed from one Gram matrix of all columns: the sum over ``a < b`` is half the
    off-diagonal blocks. Differentiable.

    Example:
        >>> float(sharing_level(init_projections(4, [1, 2], "ordinal")))   # ordinal: 1+1+2
        4.0
    """
    if len(mats) == 1:
        return (mats[0].T @ mats[0]).pow(2).sum()
    stacked = torch.cat(list(mats), dim=1)
    gram = (stacked.T @ stacked).pow(2)
    total = gram.sum()
    diag = stacked.new_zeros(())
    start = 0
    for m in mats:
        c = m.shape[1]
        diag = diag + gram[start : start + c, start : start + c].sum()
        start += c
    return (total + diag) / 2


def ordinal_sharing(sizes: Sequence[int]) -> int:
    """Thm. 3.1's maximum of :func:`sharing_level` (nested ranges, orthonormal columns):
    ``sum_a c_a (n - a)`` over the sorted candidates.

    Example:
        >>> ordinal_sharing([1, 2])
        4
    """
    s = sorted(sizes)
    return sum(c * (len(s) - a) for a, c in enumerate(s))


def independent_sharing(sizes: Sequence[int]) -> int:
    """Thm. 3.1's minimum of :func:`sharing_level` (orthogonal ranges): ``sum_a c_a``.

    Example:
        >>> independent_sharing([1, 2])
        3
    """
    return sum(sizes)


# ---------------------------------------------------------------------------------------------
# the supernet


# module attributes that only describe channel counts: a forward reads the tensors' shapes
_SHAPE_ONLY: tuple[tuple[type, tuple[str, ...]], ...] = (
    (nn.modules.conv._ConvNd, ("in_channels", "out_channels")),
    (nn.Linear, ("in_features", "out_features")),
    (nn.modules.batchnorm._BatchNorm, ("num_features",)),
    (nn.GroupNorm, ("num_channels",)),
    (nn.PReLU, ("num_parameters",)),
)


def _shape_only(module: nn.Module, attr: str) -> bool:
    return any(isinstance(module, t) and attr in names for t, names in _SHAPE_ONLY)


@dataclass(frozen=True)
class _Segment:
    """Positions ``[offset, offset + outer * n * inner)`` of a meta-tensor dim: one slot block."""

    offset: int
    outer: int
    n: int  # meta slots
    inner: int
    key: int | None  # matrix set, or None (the block keeps its size)


@dataclass(frozen=True)
class _Recipe:
    name: str
    kind: str  # plain | project | bn_weight | bn_bias | bn_stat
    dims: tuple[tuple[int, tuple[_Segment, ...]], ...] = ()
    layer: str = ""
    groups: tuple[int, ...] = ()  # free groups on a BatchNorm's channels
    fan_in_dims: tuple[int, ...] = ()  # the dim of PyTorch's default fan-in, if it changes


@dataclass(frozen=True)
class _MatrixSet:
    gid: int
    layer: str
    role: str  # "out" (P), "in" (Q), "fixed" (selection) or "bn" (sizes only)
    meta: int  # slots
    sizes: tuple[int, ...]  # slots per candidate


class Supernet:
    """The APS supernet of a model: meta-weights, projections, per-candidate BatchNorm statistics.

    Args:
        graph: the model's channel graph (:func:`fxconet.analyze`).
        candidates: sorted candidate widths per free group (:func:`candidate_widths`).
        sharing: one of :data:`SHARING`.
        meta_width: see :attr:`ApsConfig.meta_width`.
        noise: P/Q initialisation noise.
        seed: seeds the meta-weights and the noise.
        device: where the tensors live.
        max_skeletons: skeleton GraphModules kept (least recently used ones are dropped).

    Attributes:
        groups: free group ids with candidates, in graph order.
        decisions: those with more than one candidate (the controller's sequence).
        meta_widths: width of every free group in the meta model.

    Example:
        >>> net = Supernet(graph, candidate_widths(graph), sharing="ordinal")
        >>> logits = net.forward({g: 0 for g in net.groups}, torch.randn(2, 1, 8, 8))
    """

    def __init__(
        self,
        graph: ChannelGraph,
        candidates: Mapping[int, Sequence[int]],
        *,
        sharing: str = "transitionary",
        meta_width: str | float | None = None,
        noise: float = 0.0,
        seed: int = 0,
        device: str | torch.device = "cpu",
        max_skeletons: int = 64,
    ) -> None:
        if sharing not in SHARING:
            raise ValueError(f"sharing={sharing!r}: choose one of {', '.join(SHARING)}")
        self.graph = graph
        self.sharing = sharing
        self.device = torch.device(device)
        self.view = SolutionView(graph)
        self.candidates = {g: tuple(int(w) for w in c) for g, c in candidates.items()}
        self.groups = tuple(sorted(self.candidates))
        self.decisions = tuple(g for g in self.groups if len(self.candidates[g]) > 1)
        self.meta_widths = {
            g: _meta_width(c, sharing, meta_width, graph.groups[g].divisor)
            for g, c in self.candidates.items()
        }
        self.training = True
        self._skeletons: OrderedDict[tuple[Any, ...], torch.fx.GraphModule] = OrderedDict()
        self._signatures: dict[tuple[tuple[int, int], ...], tuple[Any, ...]] = {}
        self._max_skeletons = max_skeletons
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.meta = resize(graph, self.meta_widths, init="reset").to(self.device)
        generator = torch.Generator().manual_seed(seed + 1)
        self.sets: list[_MatrixSet] = []
        self._set_index: dict[tuple[str, str, int], int] = {}
        self.recipes = self._build_recipes()
        self.mats: list[list[Tensor]] = []
        mode = "independent" if sharing == "independent" else "ordinal"
        for s in self.sets:
            if s.role == "bn":
                self.mats.append([])
                continue
            fixed = s.role == "fixed"
            mats = init_projections(
                s.meta, s.sizes, mode, noise=0.0 if fixed else noise, generator=generator
            )
            self.mats.append([m.to(self.device) for m in mats])
        self.bn_stats: dict[str, Tensor] = {}
        self._tensors = {**dict(self.meta.named_parameters()), **dict(self.meta.named_buffers())}
        for r in self.recipes:
            if r.kind in ("bn_weight", "bn_bias"):
                self._tensors[r.name].requires_grad_(False)
        self._layers = self._phi_layers()
        self._rescale_init()

    # -- construction ---------------------------------------------------------------------------

    def _key(self, layer: str, role: str, gid: int, meta: int, sizes: tuple[int, ...]) -> int:
        k = (layer, role, gid)
        idx = self._set_index.get(k)
        if idx is None:
            idx = len(self.sets)
            self._set_index[k] = idx
            self.sets.append(_MatrixSet(gid, layer, role, meta, sizes))
        return idx

    def _build_recipes(self) -> list[_Recipe]:
        layouts = self.view.tensors()
        recipes = []
        names = [n for n, _ in self.meta.named_parameters()] + [
            n for n, _ in self.meta.named_buffers()
        ]
        for name in names:
            tl = layouts.get(name)
            if tl is None:
                recipes.append(_Recipe(name, "plain"))
                continue
            attr = name.rsplit(".", 1)[-1]
            is_bn = (
                tl.module_type is not None
                and issubclass(tl.module_type, nn.modules.batchnorm._BatchNorm)
                and attr in ("weight", "bias", "running_mean", "running_var")
            )
            dims = []
            gids_all: list[int] = []
            for d, blocks in enumerate(tl.dims):
                segs = []
                offset = 0
                touched = False
                for b in blocks:
                    gid = b.group if b.group in self.candidates else None
                    if gid is None:
                        n = b.n
                        segs.append(_Segment(offset, b.outer, n, b.inner, None))
                    else:
                        unit = self.graph.groups[gid].divisor
                        n = self.meta_widths[gid] // unit
                        sizes = tuple(c // unit for c in self.candidates[gid])
                        role = tl.roles.get(d)
                        if is_bn:  # sizes only: BatchNorm is rebuilt per candidate
                            key = self._key(tl.layer, "bn", gid, n, sizes)
                        elif role in ("in", "out") and tl.kind in _CONV_KINDS:
                            key = self._key(tl.layer, role, gid, n, sizes)
                        else:
                            key = self._key(name, f"fixed{d}", gid, n, sizes)
                        segs.append(_Segment(offset, b.outer, n, b.inner, key))
                        touched = True
                        if gid not in gids_all:
                            gids_all.append(gid)
                    offset += b.outer * n * b.inner
                if touched:
                    dims.append((d, tuple(segs)))
            if not dims:
                recipes.append(_Recipe(name, "plain"))
                continue
            if is_bn:
                kind = {"weight": "bn_weight", "bias": "bn_bias"}.get(attr, "bn_stat")
                recipes.append(_Recipe(name, kind, tuple(dims), tl.layer, tuple(gids_all)))
                continue
            # PyTorch's default init scales by the fan-in of dim 1 (conv, linear, transposed conv)
            conv_like = tl.kind in _CONV_KINDS and len(tl.dims) >= 2
            fan_in = (1,) if conv_like and any(d == 1 for d, _ in dims) else ()
            recipes.append(_Recipe(name, "project", tuple(dims), tl.layer, fan_in_dims=fan_in))
        return recipes

    def _rescale_init(self) -> None:
        """Scale each layer's default initialisation from its meta fan-in to the fan-in at the
        largest candidates, so that the meta width does not change the candidates' scale."""
        ratio: dict[str, float] = {}
        for r in self.recipes:
            for d, segs in r.dims:
                if d not in r.fan_in_dims:
                    continue
                meta = sum(s.outer * s.n * s.inner for s in segs)
                top = sum(
                    s.outer * (s.n if s.key is None else max(self.sets[s.key].sizes)) * s.inner
                    for s in segs
                )
                ratio[r.layer] = meta / top
        with torch.no_grad():
            for r in self.recipes:
                if r.kind == "project" and ratio.get(r.layer, 1.0) != 1.0:
                    self._tensors[r.name].mul_(math.sqrt(ratio[r.layer]))

    def _phi_layers(self) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """(Q sets, P sets) of every layer with a learnable projection."""
        by_layer: dict[str, tuple[list[int], list[int]]] = {}
        for idx, s in enumerate(self.sets):
            if s.role not in ("in", "out"):
                continue
            q, p = by_layer.setdefault(s.layer, ([], []))
            (q if s.role == "in" else p).append(idx)
        return [(tuple(q), tuple(p)) for q, p in by_layer.values()]

    # -- architectures ----------------------------------------------------------------------------

    def widths(self, choice: Mapping[int, int]) -> dict[int, int]:
        """Widths of every group with candidates for a choice (group id -> candidate index;
        groups missing from ``choice`` take their only/first candidate)."""
        return {g: self.candidates[g][int(choice.get(g, 0))] for g in self.groups}

    def skeleton(self, choice: Mapping[int, int]) -> torch.fx.GraphModule:
        """A weight-less GraphModule that runs the choice's widths (LRU-cached), built and
        verified by the rewrite's own epilogue (:func:`fxconet.passes.resize_layers.emit`).

        Choices whose forward code is the same share one skeleton: same rewritten graph
        literals (``view``/``split`` sizes) and same module attributes, except the channel
        counts that a forward never reads (conv/linear/norm sizes; the weights' shapes decide).
        A shared skeleton's modules may therefore name another choice's channel counts.
        """
        widths = self.widths(choice)
        widths_key = tuple(sorted(widths.items()))
        key = self._signatures.get(widths_key)
        plan = None
        if key is None:
            plan = self.view.plan(widths)
            key = self._signatures[widths_key] = self._signature(plan)
        gm = self._skeletons.get(key)
        if gm is not None:
            self._skeletons.move_to_end(key)
            return gm
        gm = emit(plan if plan is not None else self.view.plan(widths), meta=True)
        self._skeletons[key] = gm
        if len(self._skeletons) > self._max_skeletons:
            self._skeletons.popitem(last=False)
        return gm

    def _signature(self, plan: ResizePlan) -> tuple[Any, ...]:
        """What a forward reads of the widths: graph rewrites and module attributes."""
        try:
            attrs = self.view.updated_attributes(plan, ignore=_shape_only)
        except Exception:  # an update that fails on a copy of its module: no sharing
            return ("widths", tuple(sorted(plan.widths.items())))
        parts: list[Any] = list(self.view.rewritten_args(plan))
        for path, changed in attrs.items():
            parts.append((path, tuple(sorted((k, repr(v)) for k, v in changed.items()))))
        return tuple(parts)

    def _bn_key(self, recipe: _Recipe, choice: Mapping[int, int]) -> str:
        idx = ",".join(str(int(choice.get(g, 0))) for g in recipe.groups)
        return f"{recipe.name}|{idx}"

    def _size(self, segs: Sequence[_Segment], choice: Mapping[int, int]) -> int:
        total = 0
        for s in segs:
            n = (
                s.n
                if s.key is None
                else self.sets[s.key].sizes[int(choice.get(self.sets[s.key].gid, 0))]
            )
            total += s.outer * n * s.inner
        return total

    def effective(self, choice: Mapping[int, int], *, live_stats: bool = True) -> dict[str, Tensor]:
        """Every parameter and buffer of the choice's network: meta-tensors through P/Q,
        BatchNorm without affine and with the choice's running statistics.

        Args:
            choice: group id -> candidate index.
            live_stats: hand out the stored BatchNorm statistics (a training-mode forward then
                updates them); False gives copies.
        """
        out: dict[str, Tensor] = {}
        for r in self.recipes:
            t = self._tensors[r.name]
            if r.kind == "plain":
                out[r.name] = t
            elif r.kind == "project":
                for d, segs in r.dims:
                    t = self._contract(t, d, segs, choice)
                out[r.name] = t
            else:
                ((_, segs),) = r.dims
                size = self._size(segs, choice)
                if r.kind == "bn_weight":
                    out[r.name] = torch.ones(size, device=t.device, dtype=t.dtype)
                elif r.kind == "bn_bias":
                    out[r.name] = torch.zeros(size, device=t.device, dtype=t.dtype)
                else:
                    key = self._bn_key(r, choice)
                    stat = self.bn_stats.get(key)
                    if stat is None:
                        fill = 1.0 if r.name.endswith("running_var") else 0.0
                        stat = torch.full((size,), fill, device=t.device, dtype=t.dtype)
                        self.bn_stats[key] = stat
                    out[r.name] = stat if live_stats else stat.clone()
        return out

    def _contract(
        self, t: Tensor, d: int, segs: Sequence[_Segment], choice: Mapping[int, int]
    ) -> Tensor:
        pieces = []
        shape = list(t.shape)
        for s in segs:
            part = t.narrow(d, s.offset, s.outer * s.n * s.inner)
            if s.key is None:
                pieces.append(part)
                continue
            mset = self.sets[s.key]
            m = self.mats[s.key][int(choice.get(mset.gid, 0))].detach()  # no task gradient
            c = m.shape[1]
            part = part.reshape(shape[:d] + [s.outer, s.n, s.inner] + shape[d + 1 :])
            part = torch.tensordot(part, m, dims=([d + 1], [0])).movedim(-1, d + 1)
            pieces.append(part.reshape(shape[:d] + [s.outer * c * s.inner] + shape[d + 1 :]))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, d)

    def forward(self, choice: Mapping[int, int], *args: Any, update_stats: bool = True) -> Any:
        """Run the choice's network on ``args`` (training mode per :meth:`train`)."""
        gm = self.skeleton(choice)
        gm.train(self.training)
        tensors = self.effective(choice, live_stats=update_stats)
        return torch.func.functional_call(gm, tensors, args)

    __call__ = forward

    def train(self, mode: bool = True) -> Supernet:
        """Training (batch statistics) or evaluation mode (stored statistics) for forwards."""
        self.training = mode
        return self

    def eval(self) -> Supernet:
        return self.train(False)

    def parameters(self) -> list[Tensor]:
        """The trainable meta-weights (BatchNorm affine on free groups excluded)."""
        return [p for p in self.meta.parameters() if p.requires_grad]

    def shared_weights(self) -> dict[str, Tensor]:
        """Meta-weights with a learnable P or Q (the ``W`` of Eq. 3)."""
        return {
            r.name: self._tensors[r.name]
            for r in self.recipes
            if r.kind == "project"
            and isinstance(self._tensors[r.name], nn.Parameter)
            and any(
                self.sets[s.key].role in ("in", "out")
                for _, segs in r.dims
                for s in segs
                if s.key is not None
            )
        }

    # -- sharing level ----------------------------------------------------------------------------

    def _side(self, sets: Sequence[int], mats: Sequence[Sequence[Tensor]]) -> Tensor | float:
        if not sets:
            return 1.0
        return sum(sharing_level(mats[k]) for k in sets)

    def _side_bound(self, sets: Sequence[int], fn: Callable[[Sequence[int]], int]) -> float:
        if not sets:
            return 1.0
        return float(sum(fn(self.sets[k].sizes) for k in sets))

    def phi(self) -> tuple[float, float]:
        """``(sum_l Phi_l, mean_l Phi_l / Phi_l^ordinal)`` of the current projections."""
        with torch.no_grad():
            raw, rel = self._phi_terms(self.mats)
        return float(raw), float(rel)

    def _phi_terms(self, mats: Sequence[Sequence[Tensor]]) -> tuple[Tensor, Tensor]:
        raw = torch.zeros((), device=self.device)
        rel = torch.zeros((), device=self.device)
        for q, p in self._layers:
            value = self._side(q, mats) * self._side(p, mats)
            bound = self._side_bound(q, ordinal_sharing) * self._side_bound(p, ordinal_sharing)
            raw = raw + value
            rel = rel + value / bound
        n = max(1, len(self._layers))
        return raw, rel / n

    def phi_bounds(self) -> dict[str, float]:
        """Thm. 3.1's closed forms of ``sum_l Phi_l``: ordinal (maximum), independent (minimum)."""
        ordinal = independent = 0.0
        for q, p in self._layers:
            ordinal += self._side_bound(q, ordinal_sharing) * self._side_bound(p, ordinal_sharing)
            independent += self._side_bound(q, independent_sharing) * self._side_bound(
                p, independent_sharing
            )
        return {"ordinal": ordinal, "independent": independent}

    def pgd_step(self, tau: float) -> None:
        """One projected gradient step (Eq. 5) on ``sum_l Phi_l / Phi_l^ordinal``."""
        learn = [k for k, s in enumerate(self.sets) if s.role in ("in", "out")]
        if tau <= 0 or not learn:
            return
        mats = [
            [m.detach().requires_grad_(k in learn) for m in ms] for k, ms in enumerate(self.mats)
        ]
        _, rel = self._phi_terms(mats)
        params = [m for k in learn for m in mats[k]]
        grads = torch.autograd.grad(rel * len(self._layers), params, allow_unused=True)
        it = iter(grads)
        with torch.no_grad():
            for k in learn:
                new = []
                for m in mats[k]:
                    g = next(it)
                    step = m.detach() if g is None else m.detach() - tau * g
                    new.append(project_columns(step))
                self.mats[k] = new

    # -- gradient alignment -----------------------------------------------------------------------

    def gradient_alignment(
        self, a: Mapping[int, int], b: Mapping[int, int], x: Tensor, y: Tensor
    ) -> float | None:
        """Mean over layers of cos(g, g~) (Eq. 3): loss gradients of the shared meta-weights
        under choices ``a`` and ``b`` on the same batch (statistics are not updated)."""
        weights = self.shared_weights()
        if not weights:
            return None
        names = list(weights)
        grads = []
        for choice in (a, b):
            loss = F.cross_entropy(self.forward(choice, x, update_stats=False), y)
            grads.append(torch.autograd.grad(loss, [weights[n] for n in names], allow_unused=True))
        cosines = []
        for ga, gb in zip(*grads, strict=True):
            if ga is None or gb is None:
                continue
            na, nb = ga.norm(), gb.norm()
            if na > 0 and nb > 0:
                cosines.append(float((ga * gb).sum() / (na * nb)))
        return sum(cosines) / len(cosines) if cosines else None

    # -- state ------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Meta-weights, projections and BatchNorm statistics (for checkpoints)."""
        return {
            "meta": {k: v.detach().clone() for k, v in self.meta.state_dict().items()},
            "mats": [[m.detach().clone() for m in ms] for ms in self.mats],
            "bn": {k: v.detach().clone() for k, v in self.bn_stats.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (meta-weights are copied in place: optimisers keep them)."""
        self.meta.load_state_dict(state["meta"])
        if len(state["mats"]) != len(self.mats):
            raise SearchError("checkpoint projections do not match this supernet")
        self.mats = [[m.to(self.device) for m in ms] for ms in state["mats"]]
        self.bn_stats = {k: v.to(self.device) for k, v in state["bn"].items()}


# ---------------------------------------------------------------------------------------------
# the controller


class Controller(nn.Module):
    """LSTM policy over the searched groups (reference ENAS-style ``ArchMaster``).

    Args:
        choices: number of candidates of every decision, in order.
        hidden: LSTM width.
        layers: stacked LSTM cells.

    Example:
        >>> ctrl = Controller([4, 4, 3])
        >>> actions, logp, entropy = ctrl.sample(lambda prefix: 1.0)
        >>> len(actions)
        3
    """

    mask: Tensor  # (decisions, max candidates): valid candidates

    def __init__(self, choices: Sequence[int], hidden: int = 64, layers: int = 2) -> None:
        super().__init__()
        if not choices or min(choices) < 1:
            raise ValueError(f"Controller: choices={list(choices)!r} must be >= 1 each")
        self.choices = tuple(int(c) for c in choices)
        n_max = max(self.choices)
        self.n_max = n_max
        self.action = nn.Embedding(n_max + 1, hidden // 2)  # token n_max: start
        self.position = nn.Embedding(len(self.choices), hidden - hidden // 2 - 1)
        self.cells = nn.ModuleList(nn.LSTMCell(hidden, hidden) for _ in range(layers))
        self.head = nn.Linear(hidden, n_max)
        mask = torch.zeros(len(self.choices), n_max, dtype=torch.bool)
        for k, n in enumerate(self.choices):
            mask[k, :n] = True
        self.register_buffer("mask", mask)
        for p in self.parameters():
            nn.init.uniform_(p, -0.1, 0.1)
        nn.init.zeros_(self.head.bias)

    def step(
        self, token: int, position: int, budget: float, state: Any = None
    ) -> tuple[Tensor, Any]:
        """Logits (invalid candidates at -inf) of decision ``position`` and the new state."""
        dev = self.mask.device
        logits, new = self.step_batch(
            torch.tensor([token], device=dev),
            position,
            torch.tensor([float(budget)], device=dev),
            state,
        )
        return logits[0], new

    def step_batch(
        self, tokens: Tensor, position: int, budgets: Tensor, state: Any = None
    ) -> tuple[Tensor, Any]:
        """:meth:`step` for a batch of prefixes of the same length: ``(B, candidates)`` logits."""
        x = torch.cat(
            [
                self.action(tokens),
                self.position(torch.full_like(tokens, position)),
                budgets.reshape(-1, 1).to(self.mask.device, torch.float32),
            ],
            dim=1,
        )
        new = []
        for k, cell in enumerate(self.cells):
            h, c = cell(x, None if state is None else state[k])
            new.append((h, c))
            x = h
        logits = self.head(x).masked_fill(~self.mask[position], float("-inf"))
        return logits, tuple(new)

    def sample(
        self,
        budget: Callable[[Sequence[int]], float],
        *,
        generator: torch.Generator | None = None,
        greedy: bool = False,
    ) -> tuple[list[int], Tensor, Tensor]:
        """Sample one architecture: (candidate indices, sum of log-probs, sum of entropies).

        Args:
            budget: remaining-FLOPs fraction after a prefix of decisions.
            generator: random source of the samples.
            greedy: take the most likely candidate at every step.
        """
        token, state = self.n_max, None
        actions: list[int] = []
        logp = torch.zeros(())
        entropy = torch.zeros(())
        for pos, n in enumerate(self.choices):
            logits, state = self.step(token, pos, budget(actions), state)
            logits = logits[:n]
            log_probs = F.log_softmax(logits, dim=0)
            probs = log_probs.exp()
            if greedy:
                a = int(torch.argmax(probs))
            else:
                a = int(torch.multinomial(probs.detach().cpu(), 1, generator=generator))
            logp = logp + log_probs[a]
            entropy = entropy - (probs * log_probs).sum()
            actions.append(a)
            token = a
        return actions, logp, entropy


def flops_reward(
    accuracy: float, macs: float, target: float | None, penalty: tuple[float, float]
) -> float:
    """The controller's reward (paper, MnasNet-style soft penalty): ``accuracy * (F / T) **
    alpha`` below the target ``T``, ``** beta`` above it (``accuracy`` without a target).

    Example:
        >>> round(flops_reward(0.9, 200, 100, (0.1, -0.1)), 4)   # 2x the target: 0.9 * 2**-0.1
        0.8397
    """
    if target is None:
        return accuracy
    alpha, beta = penalty
    return accuracy * (macs / target) ** (alpha if macs <= target else beta)


def reinforce_step(
    optimizer: torch.optim.Optimizer,
    samples: Sequence[tuple[Tensor, Tensor, float]],
    baseline: float | None,
    *,
    entropy_coeff: float,
    baseline_decay: float,
) -> float:
    """One REINFORCE step of the controller on sampled architectures, and the new baseline.

    ``samples`` are ``(log-probability, entropy, reward)`` of architectures rewarded on the
    same batch. The loss is ``-sum_k log p(a_k) (R_k - b_k) / K - entropy_coeff * entropy``
    with ``b_k`` the mean reward of the other samples (leave-one-out), or, for one sample, the
    moving average ``baseline`` (reference: decay 0.99, starting at the first reward). Returns
    the moving average updated with this step's mean reward.
    """
    rs = [r for _, _, r in samples]
    k = len(rs)
    mean_r = sum(rs) / k
    if baseline is None:
        baseline = mean_r
    bases = [(k * mean_r - r) / (k - 1) for r in rs] if k > 1 else [baseline]
    terms = [
        -logp * (r - b) - entropy_coeff * ent
        for (logp, ent, r), b in zip(samples, bases, strict=True)
    ]
    loss = torch.stack(terms).sum() / k
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return baseline_decay * baseline + (1 - baseline_decay) * mean_r


def _search_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The settings a checkpoint must share to be resumed: all but those of the final pick
    (``top_n``, ``flops_tolerance``, ``decode_init``), which may change on resume."""
    return {k: v for k, v in config.items() if k not in ("top_n", "flops_tolerance", "decode_init")}


def beam_search(
    controller: Controller,
    budget: Callable[[Sequence[int]], float],
    top_n: int = 8,
    *,
    max_expansions: int = _MAX_EXPANSIONS,
    feasible: Callable[[Sequence[int]], bool] | None = None,
    normalise: bool = True,
) -> list[tuple[list[int], float]]:
    """The ``top_n`` most likely architectures by best-first search over the policy.

    Nodes are ordered by length-normalised log-probability (reference), deeper first on ties;
    the inputs of each step are built exactly as when sampling. After ``max_expansions`` the
    best open prefixes are completed greedily. With ``feasible``, prefixes it rejects are
    pruned (and greedy completions it rejects dropped), so only feasible architectures return.
    ``normalise=False`` orders by the log-probability itself: as it only falls with depth, the
    architectures then come out exactly in order of likelihood (within ``max_expansions``).

    Returns:
        ``(candidate indices, log-probability)`` pairs, most likely first.

    Example:
        >>> [len(a) for a, _ in beam_search(Controller([2, 2]), lambda p: 1.0, top_n=3)]
        [2, 2, 2]
    """
    n_steps = len(controller.choices)
    counter = itertools.count()
    heap: list[Any] = [(0.0, 0, next(counter), (), 0.0, None)]
    done: list[tuple[list[int], float]] = []
    expansions = 0
    with torch.no_grad():
        while heap and len(done) < top_n:
            _, neg_depth, _, actions, logp, state = heapq.heappop(heap)
            depth = -neg_depth
            if depth == n_steps:
                done.append((list(actions), logp))
                continue
            if expansions >= max_expansions:
                completed = _complete(controller, budget, list(actions), logp, state)
                if feasible is None or feasible(completed[0]):
                    done.append(completed)
                continue
            expansions += 1
            token = actions[-1] if actions else controller.n_max
            logits, new = controller.step(token, depth, budget(list(actions)), state)
            n = controller.choices[depth]
            log_probs = F.log_softmax(logits[:n], dim=0)
            for a in range(n):
                if feasible is not None and not feasible((*actions, a)):
                    continue
                lp = logp + float(log_probs[a])
                key = -lp / (depth + 1) if normalise else -lp
                heapq.heappush(heap, (key, -(depth + 1), next(counter), (*actions, a), lp, new))
    done.sort(key=lambda item: -item[1])
    return done[:top_n]


def pick_architecture(
    controller: Controller,
    budget: Callable[[Sequence[int]], float],
    cost: Callable[[Sequence[int]], float],
    target: float | None,
    *,
    top_n: int = 8,
    tolerance: float | None = None,
    beam: int = 1024,
) -> tuple[list[tuple[list[int], float]], int]:
    """The final pick: the ``top_n`` most likely architectures and the index of the winner.

    The winner is the one whose ``cost`` (MACs of a full list of candidate indices, which must
    grow with every index: candidates are sorted) is closest to ``target`` (paper), the more
    likely on a tie. With ``tolerance`` (absolute MACs) and none of the ``top_n`` within it,
    the beam search runs again over the architectures within the tolerance only (a prefix is
    pruned when filling the remaining decisions with the smallest candidates already costs too
    much, or with the largest too little; ordered by exact log-probability), and the most likely
    of those wins; if there is none,
    the closest of the unconstrained top-N.

    Returns:
        the architectures (``(candidate indices, log-probability)``, most likely first) and the
        winner's index among them.
    """
    top = beam_search(controller, budget, top_n)
    if target is None:
        return top, 0
    costs = [cost(actions) for actions, _ in top]
    closest = min(range(len(top)), key=lambda k: (abs(costs[k] - target), -top[k][1]))
    if tolerance is None or abs(costs[closest] - target) <= tolerance:
        return top, closest
    choices = controller.choices
    memo: dict[tuple[int, ...], bool] = {}

    def feasible(prefix: Sequence[int]) -> bool:
        key = tuple(prefix)
        hit = memo.get(key)
        if hit is None:
            rest = range(len(key), len(choices))
            low = cost([*key, *(0 for _ in rest)])
            high = cost([*key, *(choices[d] - 1 for d in rest)])
            hit = memo[key] = low <= target + tolerance and high >= target - tolerance
        return hit

    constrained = constrained_beam_search(controller, budget, feasible, top_n, beam=beam)
    if constrained:
        return constrained, 0
    return top, closest


def constrained_beam_search(
    controller: Controller,
    budget: Callable[[Sequence[int]], float],
    feasible: Callable[[Sequence[int]], bool],
    top_n: int = 8,
    *,
    beam: int = 1024,
) -> list[tuple[list[int], float]]:
    """The most likely architectures among those ``feasible`` accepts, by a beam search over
    the policy: at every decision, every kept prefix is extended by each of its candidates,
    prefixes ``feasible`` rejects are dropped, and the ``beam`` most likely are kept (the
    controller runs once per decision on the whole beam). Exact when ``beam`` is at least the
    number of feasible prefixes at every depth; the cost is ``decisions x beam`` controller
    evaluations, whatever the policy's entropy (a best-first search expands every prefix more
    likely than the answer: tens of thousands when the policy is flat).

    Returns:
        Up to ``top_n`` ``(candidate indices, log-probability)``, most likely first.

    Example:
        >>> ctrl = Controller([2, 2, 2])
        >>> [a for a, _ in constrained_beam_search(ctrl, lambda p: 1.0, lambda p: sum(p) <= 1)]
        [...]                                     # the 4 architectures with at most one 1
    """
    n_steps = len(controller.choices)
    prefixes: list[tuple[int, ...]] = [()]
    logps = torch.zeros(1)
    state: Any = None
    with torch.no_grad():
        for depth in range(n_steps):
            n = controller.choices[depth]
            tokens = torch.tensor(
                [p[-1] if p else controller.n_max for p in prefixes], device=controller.mask.device
            )
            budgets = torch.tensor([budget(list(p)) for p in prefixes])
            logits, new = controller.step_batch(tokens, depth, budgets, state)
            log_probs = F.log_softmax(logits[:, :n], dim=1).cpu()
            rows, cols, scores = [], [], []
            for r, p in enumerate(prefixes):
                for a in range(n):
                    if feasible((*p, a)):
                        rows.append(r)
                        cols.append(a)
                        scores.append(float(logps[r] + log_probs[r, a]))
            if not rows:
                return []
            order = sorted(range(len(rows)), key=lambda k: -scores[k])[:beam]
            keep = torch.tensor([rows[k] for k in order])
            prefixes = [(*prefixes[rows[k]], cols[k]) for k in order]
            logps = torch.tensor([scores[k] for k in order])
            state = tuple((h[keep], c[keep]) for h, c in new)
    best = sorted(zip(prefixes, logps.tolist(), strict=True), key=lambda item: -item[1])
    return [(list(p), lp) for p, lp in best[:top_n]]


def _complete(
    controller: Controller,
    budget: Callable[[Sequence[int]], float],
    actions: list[int],
    logp: float,
    state: Any,
) -> tuple[list[int], float]:
    for depth in range(len(actions), len(controller.choices)):
        token = actions[-1] if actions else controller.n_max
        logits, state = controller.step(token, depth, budget(actions), state)
        log_probs = F.log_softmax(logits[: controller.choices[depth]], dim=0)
        a = int(torch.argmax(log_probs))
        logp += float(log_probs[a])
        actions.append(a)
    return actions, logp


# ---------------------------------------------------------------------------------------------
# the search loop


def _cycle(loader: Any) -> Iterator[Any]:
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            return


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def aps_search(
    model: nn.Module,
    graph: ChannelGraph,
    config: ApsConfig,
    *,
    train_data: Any,
    val_data: Any = None,
    train_config: TrainConfig | None = None,
    out: str | os.PathLike[str] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> SearchOutcome:
    """Run the APS search on ``model`` and return the chosen widths, history and weights.

    Args:
        model: the model (never modified; its graph gives the search space).
        graph: ``fxconet.analyze(model, example_inputs)``.
        config: the search's hyper-parameters.
        train_data: training data for the meta-weights (Dataset or DataLoader).
        val_data: held-out part of the training data for the rewards (None: the training
            batch, as the reference's ImageNet search).
        train_config: SGD settings of the meta-weights, batch size, device and
            ``max_batches_per_epoch``.
        out: folder for one ``trial_NNN.json`` checkpoint per epoch, and the last epoch's
            ``trial_NNN.pt`` state (supernet, controller, optimisers) for resuming.
        resume: continue from the last epoch in ``out``.
        progress: progress bars.
        log: receives one line per epoch.

    Returns:
        The :class:`~fxconet.strategies.SearchOutcome`; ``extra`` holds ``phi`` (one value per
        epoch), ``phi_relative``, ``gradient_cosine``, ``candidates``, ``top`` (the beam
        search's architectures) and ``macs_target``.

    Raises:
        SearchError: no data, or checkpoints from another model or configuration.

    Example:
        >>> outcome = aps_search(model, fxconet.analyze(model, x), ApsConfig(search_epochs=2),
        ...                      train_data=load_dataset("digits"))
    """
    if train_data is None:
        raise SearchError("the APS search needs training data (data=...); a train_fn is not used")
    started = time.perf_counter()
    train_config = train_config or TrainConfig()
    sharded = distributed.is_distributed()  # torchrun: each rank a slice of every batch
    device = select_device(train_config.device)  # under torchrun: this rank's device
    cands = candidate_widths(graph, config.candidates)
    if not cands:
        raise SearchError(f"{graph.model_name} has no free channel group to search")
    supernet = Supernet(
        graph,
        cands,
        sharing=config.sharing,
        meta_width=config.meta_width,
        noise=config.init_noise,
        seed=config.seed,
        device=device,
    )
    decisions = supernet.decisions
    with torch.random.fork_rng():
        torch.manual_seed(config.seed + 2)
        controller = Controller([len(cands[g]) for g in decisions] or [1])
    cost = CostModel(graph)
    macs = cost.macs
    macs_before = cost.macs_before
    target = None if config.flops_target is None else config.flops_target * macs_before
    scale = target if target is not None else float(macs_before)
    smallest = {g: 0 for g in supernet.groups}

    def choice_of(actions: Sequence[int]) -> dict[int, int]:
        c = dict(smallest)
        c.update({g: int(a) for g, a in zip(decisions, actions, strict=False)})
        return c

    def budget(prefix: Sequence[int]) -> float:
        return (scale - macs(supernet.widths(choice_of(prefix)))) / scale

    def reward(acc: float, f: int) -> float:
        return flops_reward(acc, f, target, config.penalty)

    opt_w = train_config.sgd(supernet.parameters())
    opt_c = torch.optim.Adam(
        controller.parameters(), lr=config.controller_lr, betas=(0.5, 0.999), weight_decay=1e-3
    )
    total = config.warmup_epochs + config.search_epochs
    schedule = replace(train_config, epochs=total)
    limits = [x for x in (config.search_batches_per_epoch, train_config.max_batches_per_epoch) if x]
    limit = min(limits) if limits else None
    checkpoints = Checkpoints(
        Path(out) if out is not None else None,
        search_signature(
            model,
            graph,
            _search_settings(config.to_dict()),
            train_config,
            train_data=train_data,
            val_data=val_data,
        ),
        keep_tensors="last",  # resuming needs the last state only; the JSON keeps the history
        resume=resume,
        overwrite=overwrite,
    )
    history: list[dict[str, Any]] = []
    baseline: float | None = None
    step = 0
    first = 0
    bounds = supernet.phi_bounds()
    phi0 = supernet.phi()
    if checkpoints.resume:
        found = checkpoints.load()
        first = found.next_step
        with restoring(checkpoints.out):
            state = checkpoints.load_tensors(first - 1)
            supernet.load_state_dict(state["supernet"])
            controller.load_state_dict(state["controller"])
            opt_w.load_state_dict(state["opt_w"])
            opt_c.load_state_dict(state["opt_c"])
            baseline, step = state["baseline"], state["step"]
            history = found.records
    bar = Progress("APS epochs", total, initial=first, enabled=progress, log=log, unit="epoch")
    for epoch in range(first, total):
        searching = epoch >= config.warmup_epochs
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=_cuda(device)):
            torch.manual_seed(config.seed + epoch)
            gen = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
            lr = schedule.lr_at(epoch)
            for group in opt_w.param_groups:
                group["lr"] = lr
            loader = as_loader(
                train_data,
                batch_size=train_config.batch_size,
                shuffle=True,
                seed=config.seed + epoch,
            )
            val_iter = None
            if val_data is not None:
                val_iter = _cycle(
                    as_loader(
                        val_data,
                        batch_size=train_config.batch_size,
                        shuffle=True,
                        seed=config.seed + epoch + 7919,
                    )
                )
            sums: dict[str, float] = {"loss": 0.0, "correct": 0.0, "seen": 0.0}
            rewards: list[float] = []
            accs: list[float] = []
            sampled_macs: list[int] = []
            entropies: list[float] = []
            cosines: list[float] = []
            batches = loader if limit is None else itertools.islice(loader, limit)
            try:
                n_batches: int | None = len(loader) if limit is None else min(limit, len(loader))
            except TypeError:
                n_batches = limit
            inner = tqdm(
                batches,
                total=n_batches,
                desc=f"{'search' if searching else 'warm-up'} {epoch + 1}/{total}",
                leave=False,
                disable=None if progress else True,
            )
            supernet.train()
            for x, y in inner:
                if sharded and len(y) < distributed.world_size():
                    continue  # a last batch too small to split (every rank skips it)
                # under torchrun every rank draws the same global batch and takes its slice
                x, y = distributed.shard_batch(x, y)
                x, y = x.to(device), y.to(device)
                if searching:
                    xv, yv = (
                        (x, y) if val_iter is None else distributed.shard_batch(*next(val_iter))
                    )
                    xv, yv = xv.to(device), yv.to(device)
                    drawn = []
                    for _ in range(config.reward_samples):
                        actions, logp, ent = controller.sample(budget, generator=gen)
                        choice = choice_of(actions)
                        with torch.no_grad():
                            pred = supernet(choice, xv).argmax(1) if len(yv) else yv
                        drawn.append((logp, ent, choice, float((pred == yv).sum())))
                    # the rewards' accuracies over the global batch: equal on every rank
                    counts = distributed.all_sum(
                        [c for *_, c in drawn] + [float(len(yv))], "APS's rewards"
                    )
                    samples = []
                    for (logp, ent, choice, _), correct in zip(drawn, counts, strict=False):
                        acc = correct / max(counts[-1], 1.0)
                        f = macs(supernet.widths(choice))
                        samples.append((logp, ent, reward(acc, f)))
                        accs.append(acc)
                        sampled_macs.append(f)
                        entropies.append(float(ent.detach()))
                    baseline = reinforce_step(
                        opt_c,
                        samples,
                        baseline,
                        entropy_coeff=config.entropy_coeff,
                        baseline_decay=config.baseline_decay,
                    )
                    rewards.extend(r for _, _, r in samples)
                    with torch.no_grad():
                        actions, _, _ = controller.sample(budget, generator=gen)
                else:
                    actions = [
                        int(torch.randint(len(cands[g]), (1,), generator=gen)) for g in decisions
                    ]
                choice = choice_of(actions)
                logits = supernet(choice, x)
                loss = F.cross_entropy(logits, y)
                opt_w.zero_grad(set_to_none=True)
                loss.backward()
                distributed.average_gradients(supernet.parameters(), len(y), "APS's training")
                if config.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(supernet.parameters(), config.grad_clip)
                opt_w.step()
                sums["loss"] += float(loss.detach()) * len(y)
                sums["correct"] += float((logits.detach().argmax(1) == y).sum())
                sums["seen"] += len(y)
                if (
                    searching
                    and config.sharing == "transitionary"
                    and step % config.transition_every == 0
                ):
                    supernet.pgd_step(config.tau)
                if config.cos_every and step % config.cos_every == 0 and decisions:
                    a = choice_of(
                        [int(torch.randint(len(cands[g]), (1,), generator=gen)) for g in decisions]
                    )
                    b = choice_of(
                        [int(torch.randint(len(cands[g]), (1,), generator=gen)) for g in decisions]
                    )
                    cos = supernet.gradient_alignment(a, b, x[:32], y[:32])
                    if cos is not None:
                        cosines.append(cos)
                step += 1
            inner.close()
            if sharded:
                sums = dict(zip(sums, distributed.all_sum(list(sums.values())), strict=True))
                # BatchNorm statistics are per rank (as under DDP): rank 0's go everywhere, and
                # with them its projections and controller, so the ranks cannot drift apart
                state = distributed.broadcast_object(
                    {"supernet": supernet.state_dict(), "controller": controller.state_dict()}
                )
                supernet.load_state_dict(state["supernet"])
                controller.load_state_dict(state["controller"])
            if sums["seen"] == 0:
                raise SearchError("training data yielded no batch")
            greedy, _, _ = controller.sample(budget, greedy=True)
            likely = supernet.widths(choice_of(greedy))
            val_acc = None
            if val_data is not None:
                val_acc = _supernet_accuracy(
                    supernet, choice_of(greedy), val_data, train_config, device
                )
        phi, phi_rel = supernet.phi()
        record: dict[str, Any] = {
            "trial": epoch,
            "phase": "search" if searching else "warmup",
            "lr": lr,
            "train_loss": sums["loss"] / sums["seen"],
            "train_accuracy": sums["correct"] / sums["seen"],
            "reward": _mean(rewards),
            "reward_accuracy": _mean(accs),
            "sampled_macs": _mean(sampled_macs),
            "entropy": _mean(entropies),
            "baseline": baseline,
            "phi": phi,
            "phi_relative": phi_rel,
            "gradient_cosine": _mean(cosines),
            "widths": {str(g): w for g, w in likely.items()},
            "macs": macs(likely),
            "params": cost.params(likely),
            "val_accuracy": val_acc,
            "seconds": time.perf_counter() - t0,
        }
        history.append(record)
        checkpoints.save(
            epoch,
            record,
            tensors={
                "supernet": supernet.state_dict(),
                "controller": controller.state_dict(),
                "opt_w": opt_w.state_dict(),
                "opt_c": opt_c.state_dict(),
                "baseline": baseline,
                "step": step,
            },
            done=epoch == total - 1,
        )
        acc_s = "" if val_acc is None else f", likely val acc {val_acc:.3f}"
        rew = "" if not rewards else f", reward {record['reward']:.3f}"
        bar.log(
            f"epoch {epoch} ({record['phase']}): loss {record['train_loss']:.3f}{rew}, "
            f"phi {phi_rel:.3f} of ordinal, likely {record['macs'] / macs_before:.0%} "
            f"MACs{acc_s}, {record['seconds']:.1f}s"
        )
        bar.step()
    bar.close()

    # -- top-N by beam search, closest to the target, decode -----------------------------------
    pick_started = time.perf_counter()
    settings = {"top_n": config.top_n, "flops_tolerance": config.flops_tolerance}
    saved = checkpoints.load_final("pick", settings) if checkpoints.resume else None
    if saved is not None:
        top = [(list(a), float(lp)) for a, lp in saved["top"]]
        pick = int(saved["pick"])
    elif decisions:
        top, pick = pick_architecture(
            controller,
            budget,
            lambda actions: macs(supernet.widths(choice_of(actions)), check=False),
            target,
            top_n=config.top_n,
            tolerance=None
            if config.flops_tolerance is None
            else config.flops_tolerance * macs_before,
        )
    else:
        top, pick = [([], 0.0)], 0
    checkpoints.save_final("pick", {"settings": settings, "top": top, "pick": pick})
    pick_seconds = time.perf_counter() - pick_started
    options = [(choice_of(actions), logp) for actions, logp in top]
    costs = [macs(supernet.widths(c)) for c, _ in options]
    best_choice = options[pick][0]
    chosen = supernet.widths(best_choice)
    ranked = [
        {"widths": {str(g): w for g, w in supernet.widths(c).items()}, "macs": f, "log_prob": lp}
        for (c, lp), f in zip(options, costs, strict=True)
    ]
    init_state = None
    decoded_acc = None
    if config.decode_init:
        with torch.random.fork_rng(devices=_cuda(device)):
            torch.manual_seed(config.seed + total)
            final = decode(supernet, best_choice)
            _recalibrate(final, train_data, train_config, device, seed=config.seed + total)
            if val_data is not None:
                decoded_acc = evaluate(final, val_data, batch_size=train_config.batch_size).accuracy
        init_state = {k: v.detach().cpu().clone() for k, v in final.state_dict().items()}
    extra = {
        "phi": [h["phi"] for h in history],
        "phi_relative": [h["phi_relative"] for h in history],
        "phi_initial": phi0[0],
        "phi_bounds": bounds,
        "gradient_cosine": [h["gradient_cosine"] for h in history],
        "candidates": {str(g): list(c) for g, c in cands.items()},
        "meta_widths": {str(g): w for g, w in supernet.meta_widths.items()},
        "macs_target": target,
        "chosen_macs": macs(chosen),
        "top": ranked,
        "decoded_val_accuracy": decoded_acc,
        "search_seconds": time.perf_counter() - started,
        "pick_seconds": pick_seconds,
    }
    return SearchOutcome(
        widths=chosen,
        history=history,
        extra=extra,
        init_state=init_state,
        config=config.to_dict(),
    )


def decode(supernet: Supernet, choice: Mapping[int, int]) -> torch.fx.GraphModule:
    """A plain resized GraphModule of the choice's widths holding its effective weights.

    Example:
        >>> gm = decode(supernet, {g: 0 for g in supernet.groups})
    """
    widths = supernet.widths(choice)
    model = resize(supernet.graph, widths, init="reset")
    assert isinstance(model, torch.fx.GraphModule)  # a supernet is built on one traced graph
    with torch.no_grad():
        tensors = supernet.effective(choice, live_stats=False)
        model.load_state_dict({k: v.detach().clone() for k, v in tensors.items()})
    return model.to(supernet.device)


def _recalibrate(
    model: nn.Module, data: Any, cfg: TrainConfig, device: torch.device, *, seed: int
) -> None:
    """Recompute every BatchNorm's statistics on a few training batches (cumulative mean)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    loader = as_loader(data, batch_size=cfg.batch_size, shuffle=True, seed=seed)
    with torch.no_grad():
        for x, _ in itertools.islice(loader, _CALIBRATION_BATCHES):
            model(x.to(device))
    for m, momentum in zip(norms, saved, strict=True):
        m.momentum = momentum


def _supernet_accuracy(
    supernet: Supernet, choice: Mapping[int, int], data: Any, cfg: TrainConfig, device: torch.device
) -> float:
    """Accuracy of a choice on up to 8 batches (batch statistics, stored ones untouched)."""
    loader = as_loader(data, batch_size=cfg.batch_size)
    correct = seen = 0
    with torch.no_grad():
        for x, y in itertools.islice(loader, 8):
            x, y = x.to(device), y.to(device)
            correct += int((supernet(choice, x, update_stats=False).argmax(1) == y).sum())
            seen += len(y)
    return correct / max(1, seen)


def _mean(values: Sequence[float]) -> float | None:
    return float(sum(values) / len(values)) if values else None


def _cuda(device: torch.device) -> list[int]:
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def run(ctx: SearchContext) -> SearchOutcome:
    """``method="aps"`` for :func:`fxconet.optimize_channels`. A MACs budget
    (``target_macs=``) becomes the search's ``flops_target`` and its tolerance the final
    pick's ``flops_tolerance``.

    Example:
        >>> result = fxconet.optimize_channels(fxconet.models.cifar_resnet20(in_channels=1),
        ...                                    data="digits", method="aps", target_macs=0.5)
        >>> result.macs_after / result.macs_before    # about 0.5
    """
    config: ApsConfig = ctx.config
    budget, cost = ctx.budget, ctx.cost
    if budget is not None and budget.macs is not None and cost is not None:
        target = budget.targets(cost)["macs"] / cost.macs_before
        # the pick's tolerance is a fraction of the model's MACs, the budget's of the target
        config = replace(config, flops_target=target, flops_tolerance=budget.tolerance * target)
    return aps_search(
        ctx.model,
        ctx.graph,
        config,
        train_data=ctx.train_data,
        val_data=ctx.val_data,
        train_config=ctx.train_config,
        out=ctx.out,
        resume=ctx.resume,
        overwrite=ctx.overwrite,
        progress=ctx.progress,
        log=ctx.log,
    )
