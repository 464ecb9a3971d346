# Sourced by the GPU scripts: use carried wheels and the carried CRIU build.
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1 && [ ! -d /tmp/site/pydantic ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH="$PWD/src:$PWD/tests:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
if [ -x .criu-bundle/criu ]; then
  export WARMSTART_CRIU="$PWD/.criu-bundle/criu"
  export LD_LIBRARY_PATH="$PWD/.criu-bundle/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
if [ -d .criu-bundle/bin ]; then  # runc and busybox for the container tests, when carried
  export PATH="$PATH:$PWD/.criu-bundle/bin"
fi
