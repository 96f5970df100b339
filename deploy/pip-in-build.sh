#!/usr/bin/env bash
# pip in the build stage of deploy/agent.Dockerfile and deploy/coordinator.Dockerfile.
#
#   pip-in-build.sh dependencies [EXTRA] [PIP OPTION...]   pyproject.toml's dependencies (+ EXTRA's)
#   pip-in-build.sh package                                  the project itself, then `pip check`
#
# Dependencies go in a layer of their own, keyed on pyproject.toml alone: a change to the code
# reinstalls only the package (seconds), not NumPy or Ray.
#
# Whatever the host's pip needs to reach its package index arrives as BuildKit secrets, mounted
# for the one RUN and never written to a layer (deploy/build-images.sh passes them when the host
# has them): pip_cert, a CA bundle (a TLS-inspecting proxy's CA, say), and pip_conf, a pip.conf
# with the index URLs. Without them pip uses its defaults.
set -euo pipefail

if [[ -f /run/secrets/pip_cert ]]; then export PIP_CERT=/run/secrets/pip_cert; fi
if [[ -f /run/secrets/pip_conf ]]; then export PIP_CONFIG_FILE=/run/secrets/pip_conf; fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
venv=/opt/skipfleet

case ${1:-} in
dependencies)
  extra=${2:-}
  shift $(($# < 2 ? $# : 2))
  requirements=$(mktemp)
  "$venv/bin/python" - "$extra" >"$requirements" <<'PY'
import sys
import tomllib

with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
extra = sys.argv[1]
print("\n".join(project["dependencies"] + (project["optional-dependencies"][extra] if extra else [])))
PY
  "$venv/bin/pip" install "$@" -r "$requirements"
  rm -f "$requirements"
  ;;
package)
  "$venv/bin/pip" install --no-deps .
  "$venv/bin/pip" check
  ;;
*)
  echo "usage: $0 dependencies [EXTRA] [PIP OPTION...] | package" >&2
  exit 64
  ;;
esac
