# meshnet/meshnet: meshnetd, meshnetctl and the standalone `meshnet` CNI binary.
#   docker build -t meshnet/meshnet:0.1.0 .     (or `make docker`)

# --- build: the CNI binary, compiled with Nuitka into a directory that needs no Python ---------
# Debian 11 (glibc 2.31) on purpose: the binary runs on the *host*, and a binary built against an
# older glibc runs on every newer one (Debian 11+, Ubuntu 20.04+, kind's nodes).
FROM python:3.11-slim-bullseye AS cni-binary
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev patchelf \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY requirements-dev.txt ./
# Only Nuitka: the shim itself is standard library only.
RUN pip install --no-cache-dir "$(grep -i '^nuitka==' requirements-dev.txt)"
COPY meshnet/ meshnet/
COPY scripts/build-cni-binary scripts/
RUN python scripts/build-cni-binary /out/meshnet-cni

# --- runtime -----------------------------------------------------------------------------------
FROM python:3.11-slim-bookworm
# iproute2: meshnetd builds every link with `ip -batch`. iptables: delegate plugins such as portmap
# and bridge (ipMasq) call it from inside this container.
RUN apt-get update \
 && apt-get install -y --no-install-recommends iproute2 iptables \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/meshnet
COPY requirements.txt ./
RUN pip install --no-cache-dir -r requirements.txt
COPY pyproject.toml ./
COPY meshnet/ meshnet/
RUN pip install --no-cache-dir --no-deps . \
 && rm -rf build meshnet.egg-info
# The standalone build, with its entry point where install-cni (--binary) and people look for it.
# It replaces pip's `meshnet` script, which would need this image's Python on the host.
COPY --from=cni-binary /out/meshnet-cni /usr/local/lib/meshnet-cni
RUN ln -sf /usr/local/lib/meshnet-cni/meshnet /usr/local/bin/meshnet \
 && meshnetctl --help >/dev/null \
 && env -i CNI_COMMAND=VERSION /usr/local/bin/meshnet </dev/null
ENTRYPOINT ["meshnetd"]
