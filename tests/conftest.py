import os

import pytest

# Keep torch/numpy from fighting over the 2 cores of CI machines.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def racetrack_env():
    from pipeline.envs import make_env

    env = make_env("racetrack")
    yield env
    env.close()
