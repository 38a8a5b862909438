"""Fixtures shared by the e2e tests on the two-node Slurm cluster on localhost (tests/slurm_cluster.py)."""

from __future__ import annotations

import os

import pytest

from tests.conftest import ROOT
from tests.slurm_cluster import SlurmCluster, SlurmUnavailable, ensure_installed


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A two-node Slurm cluster (n1, n2; 2 CPUs each) on localhost for the whole session."""
    try:
        ensure_installed()
    except SlurmUnavailable as e:
        pytest.skip(str(e))
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"), cpus=2, nodes=2)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def slurm_env(slurm_cluster) -> dict:
    """Environment for Slurm commands and the jobs they submit (sbatch exports it): SLURM_CONF,
    the repository on PYTHONPATH, one thread per rank."""
    env = slurm_cluster.command_env()
    env.update(PYTHONPATH=f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}".rstrip(os.pathsep), OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")
    return env
