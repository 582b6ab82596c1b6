# se-deploy on a GPU server or a Jetson. TensorRT, CUDA and Python come from BASE_IMAGE; this image
# adds se-deploy and the packages the base lacks. Engines are built inside it, on the target device,
# into the engines/ volume (README, "Docker").
#
# BASE_IMAGE                            for                                 TensorRT  CUDA    Python
# nvcr.io/nvidia/tensorrt:26.05-py3     x86_64 servers (default) and        10.16.1   13.2.1  3.12
#                                       JetPack 7.2+ (the arm64 variant)
# nvcr.io/nvidia/l4t-jetpack:r36.4.0    JetPack 6 (Jetson Orin)             10.3      12.6    3.10
# nvcr.io/nvidia/tensorrt:26.08-py3     x86_64 servers with TensorRT 11     11.2.1    13.4.1  3.12
ARG BASE_IMAGE=nvcr.io/nvidia/tensorrt:26.05-py3
FROM ${BASE_IMAGE}

# INSTALL_TORCH=1 adds torch (from TORCH_INDEX_URL, CPU build by default) and the export tools, for
# `se-deploy export` inside the container. CUDA_MAJOR picks cuda-python; empty means "the base's".
# APP_UID/APP_GID: the owner of files written to mounted folders (match your host user).
ARG INSTALL_TORCH=0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG CUDA_MAJOR=
ARG APP_UID=1000
ARG APP_GID=1000

# pip installs into the base's own Python, where TensorRT is, even if it is marked externally managed.
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# pip: the NGC images carry it, the L4T ones may not (the version is the base distribution's own).
# hadolint ignore=DL3008
RUN if ! python3 -m pip --version >/dev/null 2>&1; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3-pip \
        && rm -rf /var/lib/apt/lists/*; \
    fi

# TensorRT must come from the base, built for its CUDA and (on Jetson) its L4T: never pip-install
# one over it. find_spec does not load libnvinfer, which on Jetson is only mounted at run time.
RUN python3 -c "import importlib.util as u, sys; u.find_spec('tensorrt') or sys.exit('BASE_IMAGE has no TensorRT')"

WORKDIR /opt/se-deploy
COPY pyproject.toml README.md ./
COPY se_deploy ./se_deploy
COPY models ./models

# se-deploy with its inference dependencies, plus cuda-python for the CUDA major the base carries
# (CUDA_MAJOR, else the base's CUDA_VERSION, else the libcudart in the linker cache). Versions come
# from pyproject's ranges: one pin cannot fit every base's Python and architecture.
# hadolint ignore=DL3013
RUN cuda_major="${CUDA_MAJOR:-${CUDA_VERSION%%.*}}" \
    && cuda_major="${cuda_major:-$(ldconfig -p \
         | awk '$1 ~ /^libcudart\.so\.[0-9]+$/ && !n++ { sub(/.*\.so\./, "", $1); print $1 }')}" \
    && case "${cuda_major}" in \
         ''|*[!0-9]*) echo "CUDA major unknown ('${cuda_major}'): pass --build-arg CUDA_MAJOR=12 or 13" >&2; exit 1 ;; \
       esac \
    && extras="" \
    && case "${INSTALL_TORCH}" in \
         0) ;; \
         1) python3 -m pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" torch && extras="[export,quantize]" ;; \
         *) echo "INSTALL_TORCH must be 0 or 1, not '${INSTALL_TORCH}'" >&2; exit 1 ;; \
       esac \
    && python3 -m pip install --no-cache-dir ".${extras}" "cuda-python>=${cuda_major},<$((cuda_major + 1))" \
    && se-deploy --help >/dev/null

# The user that runs se-deploy. Ubuntu 24.04 bases already hold uid 1000 ("ubuntu"): it makes way, so
# that what lands in mounted folders belongs to APP_UID. The video group opens the Jetson GPU devices.
RUN if [ "${APP_UID}" = 0 ]; then echo "APP_UID must not be 0 (root)" >&2; exit 1; fi \
    && existing="$(getent passwd "${APP_UID}" | cut -d: -f1)" \
    && if [ -n "${existing}" ]; then userdel --remove "${existing}"; fi \
    && if ! getent group "${APP_GID}" >/dev/null; then groupadd --gid "${APP_GID}" sedeploy; fi \
    && useradd --create-home --uid "${APP_UID}" --gid "${APP_GID}" --groups video --shell /bin/bash sedeploy \
    && mkdir -p /workspace/engines \
    && chown -R "${APP_UID}:${APP_GID}" /workspace

USER ${APP_UID}:${APP_GID}
WORKDIR /workspace
VOLUME ["/workspace/engines"]
ENTRYPOINT ["se-deploy"]
CMD ["--help"]
