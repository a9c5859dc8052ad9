import os
import tempfile
from pathlib import Path

import pytest

# Tests never touch the user's BentoML store: one throw-away store per test session, set
# before bentoml is imported (its home is read once) and inherited by `bentoml serve`.
os.environ["BENTOML_HOME"] = tempfile.mkdtemp(prefix="cotgen-bentoml-")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def geneval_data() -> Path:
    path = SHARED / "data" / "geneval"
    if not (path / "evaluation_metadata.jsonl").is_file():
        pytest.fail(f"GenEval's official metadata is missing at {path} (shared/ should sit beside the repo)")
    return path


#: Stages of the main job in order (the tiny pipeline runs them all).
ORDER = ["prompts", "detector", "render_ground_truth", "score_ground_truth", "validate_evaluator",
         "tokenizer", "tokenizer_check", "generator", "sample_baseline", "score_baseline",
         "trajectories", "judge", "search_parm", "gate", "package"]
#: Preference-alignment stages (cotgen/align), after the main job's in dvc.yaml; tiny_run
#: leaves them out (tests/test_align.py runs them on a copy of its root).
ALIGN_STAGES = [f"{s}{v}" for v in ("dpo", "dpo_iter", "parm_dpo", "parm_dpo_iter")
                for s in ("pairs_", "", "sample_", "score_")]
ORDER += ALIGN_STAGES
#: Stages that touch the BentoML model store (promotion): tiny_run stops before them;
#: tests/test_flows.py runs them through DVC and the retrain flow.
STORE_STAGES = ("package",)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The whole pipeline on the tiny profile in a temporary root (shared by test modules):
    ``(root, params, metrics by stage)``. Tests must not modify its outputs."""
    from cotgen.pipeline.params import load_params
    from cotgen.pipeline.stages import run_stage

    root = tmp_path_factory.mktemp("pipeline")
    params = load_params(REPO / "params.yaml", "tiny")
    metrics = {name: run_stage(name, params, root) for name in ORDER
               if name not in STORE_STAGES and name not in ALIGN_STAGES}
    return root, params, metrics
