"""Test-time search strategies (paper section 3; DESIGN section 1).

- ``sample``: one path, no judge.
- ``best_of_n``: N full paths; the ORM (outcome question) picks the final image.
- ``prm``: step-level search with the PRM (step question): after every step the live
  paths of a prompt are scored and the worse half is cut, so generation continues from
  the best paths until one is left (the paper's "keep the best path at each step",
  halved so that N matters).
- ``parm``: PARM's three stages per path. After each step, every live path that is not
  clear yet gets the clarity question; at its first clear step it gets the potential
  question and is **cut at once** (dropped from the batch and the KV cache) if
  P(yes) < ``potential_threshold``. Survivors finish; best-of-N' picks the final image by
  the outcome score. If a prompt would lose its last path, the path with the lowest
  P(no) (highest potential) among those being cut is kept and finished instead.
- ``parm_pp`` (PARM++, paper section 5): a PARM search, then the judge's outcome score
  decides; if it says no (P(yes) < ``accept_threshold``), the judge *reflects* (says
  what is wrong) and the self-correction generator (``corrector``,
  :mod:`cotgen.reflect.corrector`) regenerates, conditioned on the prompt, the previous
  image and the reflection, with PARM search again; at most ``max_rounds`` rounds in
  all (the first one included). The final image is the last round's. With
  ``reflection=False`` it regenerates from the previous image with an empty reflection
  (the ablation "PARM++ without reflection"). The result's ``rounds`` keep every
  round's image, score, reflection and trace.

Every result carries a trace per path (step at which it became clear, potential
verdict, scores, where it was cut, tokens, forward passes) and the compute spent
(image tokens, generator forward passes, judge calls, seconds).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from PIL import Image

from cotgen.generator.sampling import SamplingConfig, StepwiseSampler
from cotgen.reward.judge import Judge

STRATEGIES = ("sample", "best_of_n", "prm", "parm", "parm_pp")
FINAL_ROUNDS = ("last", "best")  # the image parm_pp returns when no round is accepted


@dataclass
class PathTrace:
    """What happened to one candidate path.

    Attributes:
        candidate: index among the prompt's N paths.
        clear_step: step (1-based) at which clarity was first judged yes; None if never.
        potential: P(yes) of the potential question at ``clear_step`` (None if not asked).
        cut_at_step: steps completed when the path was cut (None if it finished).
        outcome: P(yes) of the outcome question on the final image (None if not asked).
        step_scores: PRM P(yes) after each step (prm only).
        clarity_calls: clarity questions asked about this path (parm only).
        image_tokens, forward_passes: generator compute spent on this path.
    """

    candidate: int
    clear_step: int | None = None
    potential: float | None = None
    cut_at_step: int | None = None
    outcome: float | None = None
    step_scores: list[float] = field(default_factory=list)
    clarity_calls: int = 0
    image_tokens: int = 0
    forward_passes: int = 0


@dataclass
class SearchResult:
    """One prompt's search: the chosen final image, its scores and the trace.

    Attributes:
        prompt, strategy, n: what was asked.
        image: the chosen final image (RGB PIL, 64x64 in the embedded world).
        chosen: candidate index of the chosen path.
        score: the judge's outcome P(yes) of the chosen image (None for ``sample``).
        paths: one :class:`PathTrace` per candidate.
        compute: ``image_tokens``, ``forward_passes``, ``judge_calls``, ``seconds``
            (the batch's wall time shared equally among its prompts).
        steps: optional intermediate images per candidate (candidate -> list of images,
            one per step it lived), when ``keep_steps`` was asked.
        tokens: the chosen image's codes (raster order).
        rounds: ``parm_pp`` only: one dict per round: ``round`` (1-based), ``image``
            (chosen), ``tokens``, ``score`` (outcome P(yes)), ``accepted``,
            ``reflection`` (the judge's, None when accepted), ``condition_reflection``
            (the text the round was conditioned on; None in round 1), ``chosen``,
            ``paths`` (:class:`PathTrace` s), ``compute``, ``steps`` (with ``keep_steps``).
    """

    prompt: str
    strategy: str
    n: int
    image: Image.Image
    chosen: int
    score: float | None
    paths: list[PathTrace]
    compute: dict
    steps: dict[int, list[Image.Image]] | None = None
    tokens: list[int] | None = None
    rounds: list[dict] | None = None

    def trace(self) -> dict:
        """JSON-ready trace (no images)."""
        out = {
            "prompt": self.prompt,
            "strategy": self.strategy,
            "n": self.n,
            "chosen": self.chosen,
            "score": self.score,
            "paths": [asdict(p) for p in self.paths],
            "compute": self.compute,
        }
        if self.rounds is not None:
            out["rounds"] = [{k: ([asdict(p) for p in v] if k == "paths" else v) for k, v in r.items()
                              if k not in ("image", "steps", "tokens")} for r in self.rounds]
        return out


@dataclass
class SearchConfig:
    """Knobs of a search.

    Attributes:
        strategy: one of :data:`STRATEGIES`.
        clarity_threshold, potential_threshold: P(yes) at or above which a path is
            clear / has potential (parm).
        max_rounds: most generation rounds of ``parm_pp``, the first included (>= 1).
        accept_threshold: outcome P(yes) at or above which ``parm_pp`` accepts a round.
        reflection: ``parm_pp`` regenerates conditioned on the reflection (False: on
            the previous image only, an empty reflection).
        final_round: which round's image ``parm_pp`` returns when no round is accepted:
            ``"last"`` (the paper's loop, section 5) or ``"best"`` (the round with the
            highest outcome P(yes); an accepted round is always the last and the best).
    """

    strategy: str = "parm"
    clarity_threshold: float = 0.5
    potential_threshold: float = 0.5
    max_rounds: int = 3
    accept_threshold: float = 0.5
    reflection: bool = True
    final_round: str = "last"

    def check(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; expected one of {list(STRATEGIES)}")
        for name in ("clarity_threshold", "potential_threshold", "accept_threshold"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must lie in [0, 1]")
        if self.max_rounds < 1:
            raise ValueError(f"max_rounds must be >= 1, got {self.max_rounds}")
        if self.final_round not in FINAL_ROUNDS:
            raise ValueError(f"final_round must be one of {list(FINAL_ROUNDS)}, got {self.final_round!r}")


def _asker(judge: Judge | None):
    def ask(question, prompts, images, progress) -> np.ndarray:
        if not prompts:
            return np.zeros(0)
        return np.asarray(judge.score(question, prompts, images, progress), dtype=np.float64)

    return ask


def stepwise_sampler(generator, prompts: Sequence[str], config: SamplingConfig):
    """A step-wise sampler of ``config.n`` paths per prompt: the generator's own
    (``generator.stepwise_sampler``, e.g. :class:`cotgen.real.janus.JanusGenerator`) or a
    :class:`StepwiseSampler`. Raises ValueError for a bad knob or prompt."""
    make = getattr(generator, "stepwise_sampler", None)
    return make(prompts, config) if make is not None else StepwiseSampler(generator, prompts, config)


def search(
    generator,
    judge: Judge | None,
    prompts: Sequence[str],
    sampling: SamplingConfig,
    config: SearchConfig = SearchConfig(),
    keep_steps: bool = False,
    corrector=None,
    condition=None,
    null_condition=None,
) -> list[SearchResult]:
    """Run one strategy for a batch of prompts (``sampling.n`` candidate paths each).

    Args:
        generator: a Generator (e.g. :class:`~cotgen.generator.model.ShapesGenerator`, or one with a
            ``stepwise_sampler(prompts, config)`` method such as :class:`cotgen.real.janus.JanusGenerator`).
        judge: the reward model (None only for ``sample``).
        prompts: P prompts.
        sampling: sampling knobs; ``n`` is N (``sample`` uses candidate 0 only).
        config: the strategy and its thresholds.
        keep_steps: keep every path's intermediate image after each step (for grids).
        corrector: ``parm_pp``'s self-correction generator
            (:class:`cotgen.reflect.corrector.SelfCorrector`); ``judge`` must then also
            reflect (``reflect(prompts, images, force=True)``, e.g.
            :class:`cotgen.reflect.judge.ReflectiveJudge`).
        condition, null_condition: optional ``(P, C)`` token ids between each prompt
            block and ``<boi>`` (:class:`StepwiseSampler`), e.g. the corrector's first
            round (:meth:`SelfCorrector.first_round`).
    Returns:
        P :class:`SearchResult`, in prompt order.
    Raises:
        ValueError: unknown strategy, a bad knob, a missing judge, a bad prompt.
    """
    config.check()
    if config.strategy != "sample" and judge is None:
        raise ValueError(f"strategy {config.strategy!r} needs a judge")
    if config.strategy == "parm_pp":
        return _parm_pp(generator, judge, prompts, sampling, config, keep_steps, corrector, condition, null_condition)
    n = 1 if config.strategy == "sample" else sampling.n
    cfg = SamplingConfig(**{**asdict(sampling), "n": n})
    start = time.perf_counter()
    if condition is not None:
        sampler = StepwiseSampler(generator, prompts, cfg, condition=condition, null_condition=null_condition)
    else:  # a generator may bring its own step-wise sampler (the real-model adapters, cotgen/real)
        sampler = stepwise_sampler(generator, prompts, cfg)
    ask = _asker(judge)
    traces = [PathTrace(p.candidate) for p in sampler.paths]
    steps: dict[int, list[Image.Image]] = {p.id: [] for p in sampler.paths}
    strategy = config.strategy

    while not sampler.done:
        sampler.step()
        alive = sampler.alive()
        # decode only what is looked at: every live path for kept steps and PRM, the
        # paths not clear yet for PARM; final images are decoded once, below
        if keep_steps:
            ids = [p.id for p in alive]
        elif sampler.done or strategy not in ("prm", "parm"):
            continue
        elif strategy == "prm":
            ids = [p.id for p in alive]
        else:
            ids = [p.id for p in alive if traces[p.id].clear_step is None]
        images = dict(zip(ids, sampler.images(ids))) if ids else {}
        if keep_steps:
            for pid, im in images.items():
                steps[pid].append(im)
        if sampler.done:
            break
        progress = sampler.step_index / sampler.num_steps
        if strategy == "prm":
            _prm_step(sampler, ask, traces, images, progress)
        elif strategy == "parm":
            _parm_step(sampler, ask, traces, images, progress, config)

    # final images and choice
    for p in sampler.paths:
        traces[p.id].image_tokens, traces[p.id].forward_passes = p.image_tokens, p.forward_passes
        if not p.alive:
            traces[p.id].cut_at_step = p.dropped_at_step
    finished = [p for p in sampler.paths if p.alive]
    if keep_steps:  # already decoded at the last step
        final_images = {p.id: steps[p.id][-1] for p in finished}
    else:
        final_images = dict(zip([p.id for p in finished], sampler.images([p.id for p in finished])))
    if strategy in ("best_of_n", "parm", "prm"):
        ids = [p.id for p in finished]
        scores = ask("outcome", [prompts[p.prompt_index] for p in finished], [final_images[i] for i in ids], [1.0] * len(ids))
        for pid, s in zip(ids, scores):
            traces[pid].outcome = float(s)
    seconds = time.perf_counter() - start

    results = []
    for pi, prompt in enumerate(prompts):
        mine = [p for p in sampler.paths if p.prompt_index == pi]
        done = [p for p in mine if p.alive]
        if strategy == "sample":
            best = done[0]
        else:
            best = max(done, key=lambda p: traces[p.id].outcome)
        results.append(
            SearchResult(
                prompt=prompt,
                strategy=strategy,
                n=n,
                image=final_images[best.id],
                chosen=best.candidate,
                score=traces[best.id].outcome,
                paths=[traces[p.id] for p in mine],
                compute={
                    "image_tokens": sum(p.image_tokens for p in mine),
                    "forward_passes": sum(p.forward_passes for p in mine),
                    "judge_calls": sum(_judge_calls(traces[p.id]) for p in mine),
                    "seconds": seconds / len(prompts),
                },
                steps={p.candidate: steps[p.id] for p in mine} if keep_steps else None,
                tokens=list(best.tokens) if getattr(best, "tokens", None) is not None else None,
            )
        )
    return results


def _parm_pp(generator, judge, prompts, sampling, config, keep_steps, corrector, condition, null_condition):
    """PARM++ (see the module): rounds of PARM search, judged, reflected, regenerated."""
    from dataclasses import replace

    if corrector is None:
        raise ValueError("strategy 'parm_pp' needs a self-correction generator (corrector)")
    if not callable(getattr(judge, "reflect", None)):
        raise ValueError("strategy 'parm_pp' needs a judge that reflects (judge.reflect)")
    parm = replace(config, strategy="parm")
    rounds: list[list[dict]] = [[] for _ in prompts]
    pending = list(range(len(prompts)))
    gen, cond, null = generator, condition, null_condition
    given: dict[int, str] = {}  # prompt -> the reflection its current round is conditioned on
    for r in range(1, config.max_rounds + 1):
        seeded = SamplingConfig(**{**asdict(sampling), "seed": sampling.seed + 7919 * (r - 1)})
        results = search(gen, judge, [prompts[i] for i in pending], seeded, parm, keep_steps,
                         condition=cond, null_condition=null)
        rejected = [k for k, res in enumerate(results) if (res.score or 0.0) < config.accept_threshold]
        said = judge.reflect([prompts[pending[k]] for k in rejected], [results[k].image for k in rejected],
                             force=True) if rejected else []
        reflections = dict(zip(rejected, said))
        for k, (i, res) in enumerate(zip(pending, results)):
            compute = {**res.compute, "judge_calls": res.compute["judge_calls"] + int(k in reflections)}
            rounds[i].append({"round": r, "image": res.image, "tokens": res.tokens, "score": res.score,
                              "accepted": k not in reflections, "reflection": reflections.get(k),
                              "condition_reflection": given.get(i), "chosen": res.chosen, "paths": res.paths,
                              "compute": compute, "steps": res.steps})
        if not rejected or r == config.max_rounds:
            break
        pending = [pending[k] for k in rejected]
        given = {i: (reflections[k] if config.reflection else "") for i, k in zip(pending, rejected)}
        previous = torch.tensor([rounds[i][-1]["tokens"] for i in pending], dtype=torch.long)
        gen = corrector.generator
        cond = corrector.condition([given[i] for i in pending], previous)
        null = corrector.null_condition(previous)
    out = []
    for i, prompt in enumerate(prompts):
        final = rounds[i][-1]
        if config.final_round == "best":  # the first of the highest-scored rounds
            final = max(rounds[i], key=lambda rd: -1.0 if rd["score"] is None else rd["score"])
        compute = {k: sum(rd["compute"][k] for rd in rounds[i]) for k in ("image_tokens", "forward_passes",
                                                                          "judge_calls", "seconds")}
        compute["rounds"] = len(rounds[i])
        compute["returned_round"] = final["round"]
        out.append(SearchResult(prompt=prompt, strategy="parm_pp", n=sampling.n, image=final["image"],
                                chosen=final["chosen"], score=final["score"],
                                paths=[p for rd in rounds[i] for p in rd["paths"]], compute=compute,
                                steps=final["steps"], tokens=final["tokens"], rounds=rounds[i]))
    return out


def _judge_calls(t: PathTrace) -> int:
    return len(t.step_scores) + t.clarity_calls + (t.potential is not None) + (t.outcome is not None)


def _prm_step(sampler, ask, traces, images, progress) -> None:
    alive = sampler.alive()
    ids = [p.id for p in alive]
    scores = ask("step", [sampler.prompts[p.prompt_index] for p in alive], [images[i] for i in ids], [progress] * len(ids))
    for p, s in zip(alive, scores):
        traces[p.id].step_scores.append(float(s))
    cut = []
    for pi in {p.prompt_index for p in alive}:
        mine = sorted((p for p in alive if p.prompt_index == pi), key=lambda p: -traces[p.id].step_scores[-1])
        keep = max(1, (len(mine) + 1) // 2)
        cut += [p.id for p in mine[keep:]]
    sampler.drop(cut)


def _parm_step(sampler, ask, traces, images, progress, config: SearchConfig) -> None:
    alive = sampler.alive()
    unclear = [p for p in alive if traces[p.id].clear_step is None]
    if not unclear:
        return
    step = sampler.step_index
    clarity = ask("clarity", [sampler.prompts[p.prompt_index] for p in unclear], [images[p.id] for p in unclear], [progress] * len(unclear))
    for p in unclear:
        traces[p.id].clarity_calls += 1
    clear = [p for p, c in zip(unclear, clarity) if c >= config.clarity_threshold]
    if not clear:
        return
    potential = ask("potential", [sampler.prompts[p.prompt_index] for p in clear], [images[p.id] for p in clear], [progress] * len(clear))
    for p, s in zip(clear, potential):
        traces[p.id].clear_step = step
        traces[p.id].potential = float(s)
    cut = {p.id for p, s in zip(clear, potential) if s < config.potential_threshold}
    # never leave a prompt without a path: keep the lowest-P(no) one of those being cut
    for pi in {p.prompt_index for p in clear}:
        mine = [p for p in alive if p.prompt_index == pi]
        if mine and all(p.id in cut for p in mine):
            cut.discard(max(mine, key=lambda p: traces[p.id].potential).id)
    sampler.drop(cut)
