"""The model registry: verified generators in the BentoML model store (DESIGN section 4).

A *verified generator* is everything the service needs to answer a prompt: the
generator (with its text and image tokenizers), the judge (reward model), and the
chosen search strategy with its settings. It is stored as one BentoML model:

- ``cotgen-candidate:<version>``: every run that reached the gate;
- ``cotgen-verified:<version>``: the promoted ones. ``cotgen-verified:latest`` (BentoML's
  newest version) is *the* promoted model: the service and ``bentofile.yaml`` load it.

Promotion copies a candidate into ``cotgen-verified`` under the same version, so a
failed gate never touches what is promoted. The store is BentoML's
(``$BENTOML_HOME``, default ``~/bentoml``).

Layout of a model directory::

    generator/   ShapesGenerator.save_pretrained (model + text + image tokenizers)
    judge/       ObjectJudge.save_pretrained; with PARM++ also reflector/
                 (cotgen.reflect.judge.ReflectiveJudge: same judge weights + reflection head)
    corrector/   PARM++ only: cotgen.reflect.corrector.SelfCorrector.save_pretrained
    verified.json  {"strategy", "n", "sampling": {...}, "search": {...}}

A model with ``corrector/`` (and a reflective judge) also answers ``parm_pp`` (issue 8;
``cotgen stage package_parm_pp`` adds them to the promoted model).

Metadata (``bentoml models get TAG``): GenEval-Shapes scores of the strategy
(``geneval_overall``, ``geneval_<tag>``), git revision, sha256 of ``dvc.lock``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

CANDIDATE_MODEL = "cotgen-candidate"
PROMOTED_MODEL = "cotgen-verified"
VERIFIED_FILE = "verified.json"


class NoPromotedModelError(LookupError):
    """There is no promoted model (or no model under the requested tag)."""


@dataclass
class VerifiedGenerator:
    """A loaded verified generator.

    Attributes:
        generator: :class:`cotgen.generator.model.ShapesGenerator`.
        judge: :class:`cotgen.reward.object_judge.ObjectJudge` (None for a strategy
            without a judge).
        sampling: :class:`cotgen.generator.sampling.SamplingConfig` (its ``n`` = N).
        search: :class:`cotgen.search.SearchConfig` (strategy and thresholds).
        tag: the BentoML tag it was loaded from (``name:version``); real models:
            ``coco:<generator>+<judge>``.
        info: the model's metadata (GenEval scores, git revision, dvc.lock hash).
        world: ``shapes`` (from the model store) or ``coco`` (real models,
            :func:`cotgen.real.config.verified_from_real`).
        sources: where the generator and judge came from: ``{"generator": {"kind",
            "source"}, "judge": {...}}``.
        corrector: PARM++'s self-correction generator
            (:class:`cotgen.reflect.corrector.SelfCorrector`), or None; with one, ``judge``
            is a :class:`cotgen.reflect.judge.ReflectiveJudge` and ``parm_pp`` is served.

    Both worlds' generators offer ``check_prompt``, ``max_prompt_tokens``,
    ``image_size``, ``codebook_size``, ``grid_size`` and ``num_image_tokens``; both
    judges ``score`` and ``required_image_size`` (None: any size), which is what the
    service (:class:`cotgen.serve.core.VerifiedService`) relies on.
    """

    generator: object
    judge: object | None
    sampling: object
    search: object
    tag: str
    info: dict = field(default_factory=dict)
    world: str = "shapes"
    sources: dict = field(default_factory=dict)
    corrector: object | None = None


def _git_revision(root: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "none"


def model_metadata(root: Path, scores: dict) -> dict:
    """Metadata stored with a model: ``scores`` (a GenEval summary, as written by
    :func:`cotgen.geneval.report.write_summary`) flattened to ``geneval_overall`` and
    ``geneval_<tag>``, plus ``git_revision`` and ``dvc_lock_sha256``."""
    meta = {"geneval_overall": float(scores["overall"])}
    meta.update({f"geneval_{t}": float(v) for t, v in scores.get("tags", {}).items()})
    for key in ("image_tokens_per_image", "images", "prompts", "parm_pp_overall"):
        if key in scores:
            meta[key] = scores[key]
    meta["git_revision"] = _git_revision(root)
    meta["dvc_lock_sha256"] = _sha256(root / "dvc.lock")
    return meta


def save_candidate(
    generator_dir: Path,
    judge_dir: Path | None,
    sampling,
    search,
    scores: dict,
    root: Path = Path("."),
    labels: dict | None = None,
    corrector_dir: Path | None = None,
):
    """Save a verified generator as ``cotgen-candidate:<new version>``.

    Args:
        generator_dir: a saved ShapesGenerator (``data/generator``).
        judge_dir: a saved judge (``data/judge``); None for ``sample``.
        sampling: SamplingConfig of the search (its ``n`` is N).
        search: SearchConfig (strategy, thresholds).
        scores: the strategy's GenEval summary (``overall`` and ``tags``).
        root: repository root (for git revision and dvc.lock).
        labels: extra BentoML labels.
        corrector_dir: PARM++ only: a saved SelfCorrector (``data/reflect/corrector``);
            ``judge_dir`` must then hold a ReflectiveJudge (``data/reflect/judge``).
    Returns:
        the new model's ``bentoml.Tag``.
    Raises:
        FileNotFoundError: a missing input directory (named).
        ValueError: a corrector without a reflective judge.
    """
    import bentoml

    generator_dir = Path(generator_dir)
    extra = [Path(d) for d in (judge_dir, corrector_dir) if d is not None]
    for d in [generator_dir] + extra:
        if not d.is_dir():
            raise FileNotFoundError(f"{d} is missing; run `dvc repro` first")
    if corrector_dir is not None and not _is_reflective(Path(judge_dir) if judge_dir is not None else None):
        raise ValueError(f"a corrector ({corrector_dir}) needs a reflective judge (data/reflect/judge), got {judge_dir}")
    spec = {"strategy": search.strategy, "n": sampling.n, "sampling": asdict(sampling), "search": asdict(search)}
    all_labels = {"world": "shapes", "strategy": search.strategy, "stage": "candidate", **(labels or {})}
    with bentoml.models.create(CANDIDATE_MODEL, labels=all_labels,
                               metadata=model_metadata(Path(root), scores)) as model:
        target = Path(model.path)
        shutil.copytree(generator_dir, target / "generator")
        if judge_dir is not None:
            shutil.copytree(judge_dir, target / "judge")
        if corrector_dir is not None:
            shutil.copytree(corrector_dir, target / "corrector")
        (target / VERIFIED_FILE).write_text(json.dumps(spec, indent=2))
    return model.tag


def promote(tag):
    """Copy candidate ``tag`` into ``cotgen-verified`` (same version): it becomes
    ``cotgen-verified:latest``. Returns the promoted tag. Promoting a version twice
    returns the existing tag.

    Raises:
        NoPromotedModelError: no candidate under ``tag``.
    """
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        cand = bentoml.models.get(tag)
    except NotFound as e:
        raise NoPromotedModelError(f"no candidate model {tag}: {e}") from e
    promoted_tag = f"{PROMOTED_MODEL}:{cand.tag.version}"
    try:
        return bentoml.models.get(promoted_tag).tag
    except NotFound:
        pass
    labels = {**cand.info.labels, "stage": "promoted", "candidate": str(cand.tag)}
    with bentoml.models.create(promoted_tag, labels=labels, metadata=dict(cand.info.metadata)) as model:
        for child in Path(cand.path).iterdir():
            if child.is_dir():
                shutil.copytree(child, Path(model.path) / child.name)
            elif child.name == VERIFIED_FILE:
                shutil.copy2(child, Path(model.path) / child.name)
    return model.tag


def promoted_model():
    """The promoted ``bentoml.Model`` (``cotgen-verified:latest``), or None if none."""
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        return bentoml.models.get(f"{PROMOTED_MODEL}:latest")
    except NotFound:
        return None


def load_verified(tag: str | None = None) -> VerifiedGenerator:
    """Load a verified generator from the BentoML model store.

    Args:
        tag: a model tag; None = the promoted model (``cotgen-verified:latest``).
    Raises:
        NoPromotedModelError: nothing under ``tag`` / nothing promoted; the message
            says how to make one (``dvc repro`` or ``python flows/retrain.py``).
    """
    import bentoml
    from bentoml.exceptions import NotFound

    from cotgen.generator.model import ShapesGenerator
    from cotgen.generator.sampling import SamplingConfig
    from cotgen.reward.object_judge import ObjectJudge
    from cotgen.search import SearchConfig

    wanted = tag or f"{PROMOTED_MODEL}:latest"
    try:
        model = bentoml.models.get(wanted)
    except NotFound as e:
        raise NoPromotedModelError(
            f"no model {wanted} in the BentoML model store ({bentoml.models.list.__module__}); make one with "
            "`dvc repro` (stage `package`) or `python flows/retrain.py`, which train, evaluate, gate and promote"
        ) from e
    path = Path(model.path)
    spec = json.loads((path / VERIFIED_FILE).read_text())
    generator = ShapesGenerator.from_pretrained(path / "generator")
    judge = ObjectJudge.from_pretrained(path / "judge") if (path / "judge").is_dir() else None
    sources = {"generator": {"kind": "shapes", "source": f"{model.tag}/generator"}}
    if judge is not None:
        sources["judge"] = {"kind": "object_judge", "source": f"{model.tag}/judge"}
    corrector = None
    if (path / "corrector").is_dir():  # PARM++: the reflective judge (same weights) and the self-correction generator
        from cotgen.reflect.corrector import SelfCorrector
        from cotgen.reflect.judge import ReflectiveJudge

        judge, corrector = ReflectiveJudge.from_pretrained(path / "judge"), SelfCorrector.from_pretrained(path / "corrector")
        sources["judge"]["kind"] = "object_judge+reflector"
        sources["corrector"] = {"kind": "self_correction", "source": f"{model.tag}/corrector"}
    return VerifiedGenerator(generator, judge, SamplingConfig(**spec["sampling"]), SearchConfig(**spec["search"]),
                             str(model.tag), dict(model.info.metadata), sources=sources, corrector=corrector)


def _is_reflective(judge_dir: Path | None) -> bool:
    """Whether ``judge_dir`` holds a ReflectiveJudge (its ``reflector/config.json``)."""
    from cotgen.reflect.judge import REFLECTOR_DIR

    return judge_dir is not None and (judge_dir / REFLECTOR_DIR / "config.json").is_file()
