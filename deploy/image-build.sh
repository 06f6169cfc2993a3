#!/bin/sh
# The steps of deploy/Dockerfile, run inside the image build (one script for both targets).
#   image-build.sh build-packages   compilers, CMake, Ninja (and Python when the base has none)
#   image-build.sh run-packages     what the programs need at run time (OpenMP, libstdc++, Python)
#   image-build.sh venv             the venv with torch (TORCH_SPEC, TORCH_INDEX_URL)
#   image-build.sh toolchain DIR    the pinned llama.cpp, built by DIR/converters/llama/build.py alone (its own layer:
#                                   a change elsewhere in the source does not rebuild it) without looking at this
#                                   machine's CPU or GPU (GGUFBOT_PORTABLE=1, GGUFBOT_CUDA_ARCHS)
#   image-build.sh package SRC      ggufbot itself (with the PostgreSQL extra) into the venv
# pip reads PIP_INDEX_URL / PIP_EXTRA_INDEX_URL / PIP_FIND_LINKS / PIP_NO_INDEX from the environment (build args).
set -eu

apt_install() {
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@"
    rm -rf /var/lib/apt/lists/*
}

python_pkgs() {  # python3 and its venv module when the base lacks them (a CUDA base, a bare Debian)
    if python3 -c 'import ensurepip, venv' 2>/dev/null; then echo ""; else echo "python3 python3-venv"; fi
}

case "${1:-}" in
build-packages)
    # shellcheck disable=SC2046
    apt_install build-essential cmake ninja-build ca-certificates $(python_pkgs)
    ;;
run-packages)
    # shellcheck disable=SC2046
    apt_install libgomp1 libstdc++6 ca-certificates $(python_pkgs)
    ;;
venv)
    python3 -m venv /opt/ggufbot/venv
    pip=/opt/ggufbot/venv/bin/pip
    if [ -n "${TORCH_INDEX_URL:-}" ] && [ -z "${PIP_NO_INDEX:-}" ]; then
        "$pip" install --no-cache-dir --extra-index-url "$TORCH_INDEX_URL" "$TORCH_SPEC"
    else
        "$pip" install --no-cache-dir "$TORCH_SPEC"
    fi
    ;;
toolchain)
    # the build goes into the image (GGUFBOT_TOOLCHAIN_ROOT); the download cache does not
    GGUFBOT_CACHE=/tmp/ggufbot-build-cache PYTHONPATH="$2" /opt/ggufbot/venv/bin/python -c \
        'from converters.llama import build; print(build.install(on_line=print).describe())'
    rm -rf /tmp/ggufbot-build-cache "$2"
    ;;
package)
    /opt/ggufbot/venv/bin/pip install --no-cache-dir "$2[postgres]"
    rm -rf "$2"
    ;;
*)
    echo "usage: $0 build-packages|run-packages|venv|toolchain DIR|package SRC" >&2
    exit 2
    ;;
esac
