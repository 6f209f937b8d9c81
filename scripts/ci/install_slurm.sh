#!/usr/bin/env bash
# Install Debian's Slurm (slurmctld, slurmd, the client commands) and munge, for tests/test_multinode_ray.py,
# which starts its own controller and two slurmd on this machine (its own config, ports and munge socket;
# the packages' system services are not used). Needs root and apt-get; otherwise it says why and does nothing,
# and the Slurm tests then fail with that reason (they never skip).
set -euo pipefail
if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null &&
    command -v munged >/dev/null; then
    echo "Slurm is installed: $(slurmctld -V)"
    exit 0
fi
if [[ $(id -u) != 0 ]]; then
    echo "not installing Slurm: needs root (apt-get install slurm-wlm munge); the Slurm tests will fail without it"
    exit 0
fi
if ! command -v apt-get >/dev/null; then
    echo "not installing Slurm: no apt-get on this machine (install slurmctld, slurmd, sbatch and munged yourself)"
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -q --no-install-recommends slurm-wlm munge
echo "installed $(slurmctld -V)"
