# TEMPORARY dev override (removed before hand-off)
import os
from pathlib import Path
import pytest
D = os.environ.get("DEV_ARTIFACTS")
if D:
    @pytest.fixture(scope="session")
    def two_runs():
        return [Path(D) / "runs/vqa", Path(D) / "runs/caption"]
    @pytest.fixture(scope="session")
    def bundle():
        return Path(D) / "bundle"
    @pytest.fixture(scope="session")
    def sample_image():
        return Path(D) / "scene.png"
