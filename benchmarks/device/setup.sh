# Sourced by the scripts beside it, from the repository root on a lent GPU machine: installs the wheels
# carried in .whl/ (the ones the machine lacks; see rl_sweep.sh) into /tmp/site -- skipped with
# SKIP_INSTALL=1 where they are installed -- and puts a copy of the package on PYTHONPATH with the role
# folders as vgrpo subpackages (run python with its cwd outside the repository, or ./vgrpo shadows it).
[ -n "$SKIP_INSTALL" ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
rm -rf /tmp/pkg && mkdir -p /tmp/pkg && cp -r vgrpo /tmp/pkg/ && for d in learner rollout_workers reward_servers proto; do cp -r $d /tmp/pkg/vgrpo/$d; done
export PYTHONPATH=/tmp/site:/tmp/pkg PYTHONUNBUFFERED=1
