from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def geneval_data() -> Path:
    path = SHARED / "data" / "geneval"
    if not (path / "evaluation_metadata.jsonl").is_file():
        pytest.fail(f"GenEval's official metadata is missing at {path} (shared/ should sit beside the repo)")
    return path
